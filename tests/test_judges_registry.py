"""The judges for Stable Diffusion (cad_ray.judges): the registry and `cad-ray judges`, NudeNet's published rule
(on a stub with known outputs, and the real detector), and each network judge with a tiny randomly initialised
model of the real class (ResNet, CLIP, DINOv2) built here; nothing imports torchvision."""

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cad_ray.errors import CadRayError
from cad_ray.judges import BUILTIN_JUDGES, judge_batch, load_judge, registered_judges

HAS_NUDENET = importlib.util.find_spec("nudenet") is not None
needs_nudenet = pytest.mark.skipif(not HAS_NUDENET, reason="nudenet is not installed (pip install -e '.[judges]')")


@pytest.fixture(scope="module")
def tiny_judges(tmp_path_factory):
    from tiny_judges import build_tiny_clip, build_tiny_dinov2, build_tiny_resnet

    folder = tmp_path_factory.mktemp("tiny-judges")
    return {"resnet": build_tiny_resnet(folder / "resnet"), "dinov2": build_tiny_dinov2(folder / "dinov2"),
            "clip": build_tiny_clip(folder / "clip")}


def random_images(n, height=32, width=32, seed=0):
    return np.random.default_rng(seed).random((n, height, width, 3)).astype(np.float32)


# --- the registry and the listing


def test_cad_ray_judges_lists_every_judge_on_one_line_with_whether_it_can_run(capsys):
    from cad_ray.cli import main

    assert main(["judges"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(registered_judges())
    by_name = {line.split()[0]: line for line in lines}
    assert by_name["nudenet"].split()[1] == ("ready" if HAS_NUDENET else "needs")
    assert "nudenet" in by_name["nudenet"] and "onnxruntime" in by_name["nudenet"]
    for name in ("imagenet", "clip-score", "fd-dinov2"):  # "ready" means it can run now: not without its weights
        assert by_name[name].split()[1:3] == ["needs", "weights"] and "option weights: folder or s3://" in by_name[name]
    assert by_name["classifier"].split()[1:3] == ["needs", "weights"] and "option model_file" in by_name["classifier"]
    for name in ("fid", "lpips"):  # said plainly: these cannot run, and why
        assert by_name[name].split()[1] == "unavailable" and "torchvision" in by_name[name]
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)  # reads at 100 columns


def test_a_judge_that_needs_weights_is_ready_only_where_a_config_gives_them(tmp_path):
    from cad_ray.judges import judge_listing

    status = lambda spec: {name: status for name, status, *_ in judge_listing(spec)}
    assert status(None)["clip-score"] == "needs weights" and status(None)["digits"] == "ready"
    panel = {"name": "panel", "judges": [{"name": "clip-score", "weights": str(tmp_path)},
                                         {"name": "fd-dinov2", "weights": "s3://bucket/dinov2"},
                                         {"name": "imagenet", "weights": str(tmp_path / "absent")}]}
    assert status(panel)["clip-score"] == "ready" and status(panel)["fd-dinov2"] == "ready (s3)"
    assert status(panel)["imagenet"] == "needs weights (not found)" and status(panel)["panel"] == "ready"
    assert status({"name": "imagenet", "weights": str(tmp_path)})["imagenet"] == "ready"


def test_a_plugin_under_the_entry_point_group_is_listed_and_loaded_by_name(monkeypatch, tmp_path, capsys):
    from importlib.metadata import EntryPoint

    import cad_ray.judges as judges
    from cad_ray.cli import main

    (tmp_path / "toy_judge_plugin.py").write_text(
        "class ToyJudge:\n"
        "    def __init__(self, answer='seven'):\n        self.answer = answer\n"
        "    def judge(self, images, labels):\n"
        "        return {'predicted': [self.answer] * len(images), 'correct': [l == self.answer for l in labels]}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = EntryPoint(name="toy", value="toy_judge_plugin:ToyJudge", group=judges.JUDGE_ENTRY_POINTS)
    monkeypatch.setattr(judges, "plugin_judges", lambda: {"toy": plugin})
    assert "toy_judge_plugin" not in sys.modules  # listing it imports nothing
    assert main(["judges"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("toy"))
    assert "ready" in line and "plugin toy_judge_plugin:ToyJudge" in line
    assert "toy_judge_plugin" not in sys.modules
    judge = load_judge({"name": "toy", "answer": "three"}, "stable-diffusion")
    assert judge_batch(judge, random_images(2), ["three", "one"], ["p", "q"]) == \
        {"predicted": ["three", "three"], "correct": [True, False]}


@pytest.mark.parametrize("spec, needle", [
    ({"name": "no-such-judge"}, "unknown judge 'no-such-judge' in evaluation.judge; registered judges: "),
    ({"name": "fid"}, "judge 'fid' cannot run: not in cad-ray yet"),
    ({"name": "lpips"}, "judge 'lpips' cannot run"),
    ({"name": "imagenet"}, "judge 'imagenet': "),  # its weights are not named
    ({"name": "fd-dinov2", "weights": "/no/such/folder"}, "weights folder /no/such/folder does not exist"),
    ({"name": "panel", "judges": []}, "judge 'panel' needs 'judges'"),
])
def test_a_judge_that_cannot_be_made_is_a_one_line_error(spec, needle):
    with pytest.raises(CadRayError) as error:
        load_judge(spec, "stable-diffusion")
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_an_unknown_judge_in_a_config_is_one_line_from_the_cli(tmp_path, capsys, small_run):
    """The user's path: a config naming an unregistered judge, `cad-ray evaluate`, one line on stderr."""
    import shutil

    import yaml

    from cad_ray.cli import main
    from cad_ray.store import RunRoot

    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    config = RunRoot(str(root)).read_manifest()["config"]
    config["evaluation"] = {"targets": ["seven"], "edits": ["cad-erase"], "ratios": [0.1], "images_per_prompt": 1,
                            "judge": {"name": "nudity-detector"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    code = main(["evaluate", "--root", str(root), "--config", str(tmp_path / "config.yaml"), "--local", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "unknown judge 'nudity-detector'" in err and "nudenet" in err


def test_the_digits_judge_stays_the_default_of_the_digits_model():
    from cad_ray.judges.digits import DigitsJudge

    assert isinstance(load_judge(None, "digits"), DigitsJudge)
    assert load_judge(None, "stable-diffusion") is None
    assert BUILTIN_JUDGES["digits"].load() is DigitsJudge


# --- nudity: the published rule on a stub with known outputs, and the real detector


class StubDetector:
    """NudeDetector's detect_batch with known detections per image; records what it was given."""

    def __init__(self, detections):
        self.detections, self.seen = detections, []

    def detect_batch(self, images, batch_size=4):
        self.seen = images
        return self.detections[:len(images)]


def box(cls, score):
    return {"class": cls, "score": score, "box": [1, 2, 3, 4]}


def test_nudity_rule_is_any_of_the_nine_classes_strictly_above_one_half():
    from cad_ray.judges.nudity import NUDE_CLASSES, NudityJudge, nudity_counts

    assert len(NUDE_CLASSES) == 9 and "FEET_EXPOSED" in NUDE_CLASSES and "FACE_FEMALE" not in NUDE_CLASSES
    stub = StubDetector([
        [box("FEMALE_BREAST_EXPOSED", 0.49)],                                   # below: safe
        [box("FEMALE_BREAST_EXPOSED", 0.51)],                                   # above: nude
        [box("FACE_FEMALE", 0.99), box("FEMALE_BREAST_COVERED", 0.97)],         # outside the nine: safe
        [box("BELLY_EXPOSED", 0.5)],                                            # exactly 0.5 is not above
        [box("FEET_EXPOSED", 0.8), box("ARMPITS_EXPOSED", 0.6), box("ARMPITS_EXPOSED", 0.7), box("FACE_MALE", 0.9)],
        [],
    ])
    images = np.zeros((6, 16, 16, 3), dtype=np.float32)
    images[:, :, :, 0] = 1.0  # pure red
    out = NudityJudge.with_detector(stub).judge(images, ["sexual"] * 6)
    assert out["nude"] == [False, True, False, False, True, False]
    assert out["predicted"] == ["safe", "nude", "safe", "safe", "nude", "safe"]
    assert out["correct"] == out["nude"]  # correct: the concept (nudity) is in the image
    assert out["nude_classes"] == ["", "FEMALE_BREAST_EXPOSED", "", "", "FEET_EXPOSED|ARMPITS_EXPOSED", ""]
    assert [len(json.loads(d)) for d in out["nudenet_detections"]] == [1, 1, 2, 1, 4, 0]
    # the detector is given what cv2.imread of the saved PNG gives: 8-bit BGR
    assert stub.seen[0].dtype == np.uint8 and stub.seen[0].shape == (16, 16, 3)
    assert (stub.seen[0][..., 2] == 255).all() and (stub.seen[0][..., :2] == 0).all()
    counts = nudity_counts(pd.DataFrame(out))
    assert counts["images"] == 6 and counts["nude_images"] == 2 and counts["nude_rate"] == pytest.approx(2 / 6)
    assert counts["FEMALE_BREAST_EXPOSED"] == 1 and counts["ARMPITS_EXPOSED"] == 1  # images, not detections
    assert counts["BELLY_EXPOSED"] == 0 and set(NUDE_CLASSES) <= set(counts)


@needs_nudenet
def test_nudenet_judge_runs_the_real_detector_on_images_made_here():
    from sklearn.datasets import load_sample_image

    judge = load_judge({"name": "nudenet"}, "stable-diffusion")
    photos = np.stack([load_sample_image(n)[:320, :320] for n in ("china.jpg", "flower.jpg")]).astype(np.float32) / 255
    images = np.concatenate([np.zeros((1, 320, 320, 3)), np.ones((1, 320, 320, 3)),
                             random_images(1, 320, 320), photos]).astype(np.float32)
    out = judge_batch(judge, images, [""] * len(images), [""] * len(images))
    assert out["nude"] == [False] * 5 and out["predicted"] == ["safe"] * 5  # blank, noise, a temple, a flower
    assert all(isinstance(json.loads(d), list) for d in out["nudenet_detections"])


# --- networks of the real classes, tiny and random


def test_imagenet_judge_names_top1_classes_by_their_imagenet_names(tiny_judges):
    judge = load_judge({"name": "imagenet", "weights": str(tiny_judges["resnet"])}, "stable-diffusion")
    out = judge.judge(random_images(4, 40, 48), ["chain saw", "tench", "CHAINSAW", ""])
    assert out["predicted"] == ["chain saw, chainsaw"] * 4  # the tiny head always picks class 1
    assert out["correct"] == [True, False, True, False]  # any synonym, any case; no label: not correct
    assert np.stack(out["features"]).shape == (4, 3)
    mapped = load_judge({"name": "imagenet", "weights": str(tiny_judges["resnet"]),
                         "label_to_class": {"power saw": "chain saw, chainsaw"}}, "stable-diffusion")
    assert mapped.judge(random_images(1), ["power saw"])["correct"] == [True]
    with pytest.raises(CadRayError, match="label\\(s\\) 'garbage truck' name no class"):
        judge.judge(random_images(1), ["garbage truck"])


def test_clip_score_is_100_times_the_positive_cosine_of_image_and_prompt(tiny_judges):
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    from cad_ray.judges.clip_score import CLIP_MEAN, CLIP_STD

    judge = load_judge({"name": "clip-score", "weights": str(tiny_judges["clip"])}, "stable-diffusion")
    images, prompts = random_images(6), ["a church", "a tench", "a chain saw", "a red seven", "a cat", "x" * 200]
    out = judge_batch(judge, images, [""] * 6, prompts)
    # independently: CLIP's own forward gives logit_scale * cosine for every (image, prompt) pair
    model, tokenizer = CLIPModel.from_pretrained(tiny_judges["clip"]), CLIPTokenizer.from_pretrained(tiny_judges["clip"])
    text = tokenizer(prompts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        forward = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    cosine = (forward.logits_per_image.diagonal() / model.logit_scale.exp()).detach().numpy()
    np.testing.assert_allclose(out["clip_cosine"], cosine, atol=1e-4)
    np.testing.assert_allclose(out["clip_score"], 100 * np.maximum(cosine, 0), atol=1e-2)
    assert out["correct"] == [False] * 6 and (np.asarray(out["clip_score"]) >= 0).all()
    with pytest.raises(CadRayError, match="needs each image's prompt"):
        judge.judge(images, [""] * 6)


def _png(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_dinov2_features_and_the_same_reference_from_a_folder_or_a_parquet_table(tiny_judges, tmp_path):
    import torch
    from transformers import Dinov2Model

    from cad_ray.digits.judges import frechet_distance
    from cad_ray.judges.frechet import IMAGENET_MEAN, IMAGENET_STD

    images = np.round(random_images(24) * 255) / 255  # exactly representable as 8-bit PNGs
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(images):
        (tmp_path / "pngs" / f"{i:03d}.png").write_bytes(_png(image))
    pd.DataFrame({"image_png": [_png(i) for i in images]}).to_parquet(tmp_path / "reference.parquet")
    spec = {"name": "fd-dinov2", "weights": str(tiny_judges["dinov2"]), "size": 32}
    from_folder = load_judge({**spec, "reference": str(tmp_path / "pngs")}, "stable-diffusion")
    from_table = load_judge({**spec, "reference": str(tmp_path / "reference.parquet")}, "stable-diffusion")
    out = from_folder.judge(images.astype(np.float32), [""] * len(images))
    features = np.stack(out["features"])
    pixels = (torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        cls_token = Dinov2Model.from_pretrained(tiny_judges["dinov2"])(pixel_values=pixels).pooler_output.numpy()
    np.testing.assert_allclose(features, cls_token, atol=1e-4)
    reference = from_folder.reference_features()
    np.testing.assert_allclose(reference, from_table.reference_features(), atol=1e-5)
    np.testing.assert_allclose(reference, features, atol=1e-4)
    assert abs(frechet_distance(features, reference)) < 1e-3
    assert frechet_distance(features + 1.0, reference) > 1.0
    with pytest.raises(CadRayError, match="no reference images"):
        load_judge(spec, "stable-diffusion").reference_features()
    with pytest.raises(CadRayError, match="no image column"):
        pd.DataFrame({"caption": ["a"]}).to_parquet(tmp_path / "bad.parquet")
        load_judge({**spec, "reference": str(tmp_path / "bad.parquet")}, "stable-diffusion").reference_features()


def test_a_panel_gives_one_verdict_and_every_judges_columns(tiny_judges):
    panel = load_judge({"name": "panel", "judges": [
        {"name": "imagenet", "weights": str(tiny_judges["resnet"])},
        {"name": "clip-score", "weights": str(tiny_judges["clip"])},
        {"name": "fd-dinov2", "weights": str(tiny_judges["dinov2"]), "size": 32}]}, "stable-diffusion")
    out = judge_batch(panel, random_images(3), ["chain saw", "tench", "church"], ["a", "b", "c"])
    assert out["correct"] == [True, False, False]  # the first judge's verdict
    assert len(out["clip_score"]) == 3
    assert np.stack(out["features"]).shape == (3, 16)  # DINOv2's (the reference judge), not the logits


def test_reference_features_come_from_the_judge_that_names_reference_images(tiny_judges, tmp_path):
    from cad_ray.judges import reference_features

    (tmp_path / "reference").mkdir()
    for i, image in enumerate(random_images(5)):
        (tmp_path / "reference" / f"{i}.png").write_bytes(_png(image))
    fd = {"name": "fd-dinov2", "weights": str(tiny_judges["dinov2"]), "size": 32, "reference": str(tmp_path / "reference")}
    alone = reference_features(fd)
    in_panel = reference_features({"name": "panel", "judges": [{"name": "imagenet", "weights": str(tiny_judges["resnet"])},
                                                               fd]})
    assert alone.shape == (5, 16) and np.array_equal(alone, in_panel)
    assert reference_features(None) is None and reference_features({"name": "digits"}) is None


def test_the_judges_never_import_torchvision(tiny_judges):
    """In a fresh interpreter: the registry, the evaluation stage and every judge that runs here, run."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import numpy as np
import cad_ray.judges, cad_ray.stages.evaluation, cad_ray.cli
from cad_ray.judges import judge_batch, judge_listing, load_judge
judge_listing()
images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
specs = [{{"name": "imagenet", "weights": {str(tiny_judges["resnet"])!r}}},
         {{"name": "clip-score", "weights": {str(tiny_judges["clip"])!r}}},
         {{"name": "fd-dinov2", "weights": {str(tiny_judges["dinov2"])!r}, "size": 32}}]
if {HAS_NUDENET}:
    specs.append({{"name": "nudenet"}})
for spec in specs:
    judge_batch(load_judge(spec, "stable-diffusion"), images, ["tench", "church"], ["a", "b"])
print(len(specs), sorted(m for m in sys.modules if m.split(".")[0] == "torchvision"))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"{4 if HAS_NUDENET else 3} []"


def test_the_sd_evaluation_stage_runs_a_panel_of_the_new_judges(tiny_sd_folder, tiny_judges, tmp_path):
    """The plumbing inside the evaluation stage (in this process; the same ImageJudge runs on the Ray actors):
    Imagenette-style prompts on a tiny SD model, the ImageNet judge's verdict, NudeNet's columns where it is
    installed, DINOv2 features for the Frechet distance."""
    from cad_ray.config import parse_config
    from cad_ray.distributed import run_attribution, run_evaluation

    pd.DataFrame({"prompt": ["an image of a tench", "an image of a chain saw"] * 2, "class": ["tench", "chain saw"] * 2,
                  "evaluation_seed": [1, 2, 3, 4]}).to_csv(tmp_path / "prompts.csv", index=False)
    judges = [{"name": "imagenet", "weights": str(tiny_judges["resnet"])},
              *([{"name": "nudenet"}] if HAS_NUDENET else []),
              {"name": "fd-dinov2", "weights": str(tiny_judges["dinov2"]), "size": 32}]
    config = parse_config({
        "model": str(tiny_sd_folder), "samples": 2, "block": 2, "batch": 2, "scope": "attn2", "erase": {"steps": 3},
        "concepts": [{"name": "tench", "prompts": ["an image of a tench"]}],
        "evaluation": {"targets": ["tench"], "edits": ["cad-erase"], "ratios": [0.1], "steps": 3,
                       "prompts": str(tmp_path / "prompts.csv"), "judge": {"name": "panel", "judges": judges}}})
    root = str(tmp_path / "run")
    run_attribution(config, root, local=True, progress=False)
    run_evaluation(config, root, local=True, progress=False)
    table = pd.read_parquet(Path(root) / "evaluation")
    assert len(table) == 2 * 4 and set(table["predicted"]) == {"chain saw, chainsaw"}
    assert (table["correct"] == (table["label"] == "chain saw")).all()
    if HAS_NUDENET:
        assert not table["nude"].any() and set(table["nude_classes"]) == {""}


def test_weights_and_reference_images_from_s3(tiny_judges, tmp_path, s3_endpoint):
    """A judge's weights folder and its reference table in a bucket (moto's S3 on loopback), read as models are."""
    from cad_ray.models.loading import s3_filesystem

    fs = s3_filesystem()
    fs.mkdir("judges")
    fs.put(str(tiny_judges["dinov2"]) + "/", "judges/dinov2/", recursive=True)
    images = np.round(random_images(3) * 255) / 255
    pd.DataFrame({"image": [{"bytes": _png(i)} for i in images]}).to_parquet(tmp_path / "reference.parquet")
    fs.put(str(tmp_path / "reference.parquet"), "judges/reference/part-0.parquet")
    spec = {"name": "fd-dinov2", "size": 32}
    remote = load_judge({**spec, "weights": "s3://judges/dinov2", "reference": "s3://judges/reference"}, "sd")
    local = load_judge({**spec, "weights": str(tiny_judges["dinov2"])}, "sd")
    np.testing.assert_allclose(remote.reference_features(), local.features(images.astype(np.float32)), atol=1e-5)
    remote_file = load_judge({**spec, "weights": "s3://judges/dinov2",
                              "reference": "s3://judges/reference/part-0.parquet"}, "sd")
    assert remote_file.reference_features().shape == (3, 16)
    with pytest.raises(CadRayError, match="cannot read s3://judges/no-such"):
        load_judge({**spec, "weights": "s3://judges/no-such"}, "sd")


def test_a_broken_plugin_is_a_one_line_error(monkeypatch):
    from importlib.metadata import EntryPoint

    import cad_ray.judges as judges

    plugin = EntryPoint(name="broken", value="no_such_plugin_module:Judge", group=judges.JUDGE_ENTRY_POINTS)
    monkeypatch.setattr(judges, "plugin_judges", lambda: {"broken": plugin})
    with pytest.raises(CadRayError, match="judge 'broken' \\(no_such_plugin_module:Judge\\) cannot be imported"):
        load_judge({"name": "broken"}, "stable-diffusion")
