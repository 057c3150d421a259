"""Evaluation: prompt sets as the benchmarks ship them, the judged-image table, actor invariance, bad input."""

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import small_config

from cad_ray.cli import main
from cad_ray.distributed import run_evaluation
from cad_ray.stages.evaluation import read_prompt_set, summarize_evaluation

PEER_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "peer-prompts"
EVALUATION = {"targets": ["seven"], "edits": ["cad-erase", "random"], "ratios": [0.05], "images_per_prompt": 2,
              "prompt_panel": "canonical",
              "steps": 10, "batch_size": 8,
              # a cheap probe, so that the probing stage's Ray path is checked beside the local one
              "probes": ["completion"], "probe": {"images": 1, "samples": 2, "strengths": [0.5]}}


def evaluation_config(**changes):
    return small_config(evaluation={**EVALUATION, **changes})


@pytest.mark.parametrize("name,rows,label", [("imagenette.csv", 5000, "tench"),
                                             ("small_imagenet_prompts.csv", 100, "cassette player"),
                                             ("big_artist_prompts.csv", 100, "Pablo Picasso"),
                                             ("famous_art_prompts.csv", 20, ""),
                                             ("coco_30k_head1000.csv", 1000, ""),
                                             ("unsafe-prompts4703_head200.csv", 200, None)])
def test_peer_prompt_files_load_as_they_are(name, rows, label):
    path = PEER_PROMPTS / name
    if not path.exists():
        pytest.skip(f"{path} is not beside this checkout")
    table = read_prompt_set(str(path))
    assert len(table) == rows and table["prompt"].str.len().min() > 0
    assert table["seed"].dtype == np.int64
    if label is not None:
        assert table["label"].iloc[0] == label
    else:  # the unsafe prompts carry their categories as the label
        assert table["label"].iloc[0] == "violence, self-harm"
    raw = pd.read_csv(path)
    np.testing.assert_array_equal(table["seed"].to_numpy(), raw["evaluation_seed"].to_numpy())


def test_a_prompt_file_without_seeds_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,class\na seven,seven\n")
    with pytest.raises(Exception, match="lacks column.*evaluation_seed"):
        read_prompt_set(str(bad))


@pytest.fixture(scope="module")
def evaluated(small_run, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evaluated") / "run")
    shutil.copytree(small_run, root)
    result = run_evaluation(evaluation_config(), root, local=True, progress=False)
    return root, result


def test_one_row_per_judged_image(evaluated):
    root, result = evaluated
    table = pd.read_parquet(os.path.join(root, "evaluation"))
    assert {"edit", "target", "ratio", "prompt", "seed", "label", "predicted", "correct"} <= set(table.columns)
    # none + cad-erase + random, ten digit prompts, two seeds each
    assert len(table) == 3 * 10 * 2 and result["images"] == 60
    assert set(table["edit"]) == {"none", "cad-erase", "random"}
    assert (table["correct"] == (table["predicted"] == table["label"])).all()
    none = table[table["edit"] == "none"]
    assert none["correct"].mean() >= 0.5  # the unedited model, 10 steps: mostly right
    cad = table[table["edit"] == "cad-erase"]
    rand = table[table["edit"] == "random"]
    assert cad["zeroed"].iloc[0] == rand["zeroed"].iloc[0] > 0
    # the same seeds give the same starting noise: the unedited and edited rows line up prompt by prompt
    assert list(none["seed"]) == list(cad["seed"]) == list(rand["seed"])
    summary = pd.read_parquet(os.path.join(root, "evaluation_summary"))
    assert set(summary["edit"]) == {"none", "cad-erase", "random"}
    # no search ran: every row says so, and none is picked
    assert not summary["searched"].any() and not summary["picked"].any()
    # the summary's accuracies are the image table's, recomputed here from the rows
    for row in summary[summary["edit"] != "none"].itertuples():
        rows = table[(table["edit"] == row.edit) & (table["ratio"] == row.ratio)]
        assert row.target_accuracy == rows[rows["label"] == "seven"]["correct"].mean()
        assert row.others_accuracy == pytest.approx(rows[rows["label"] != "seven"].groupby("label")["correct"].mean().mean())


def test_results_do_not_depend_on_the_number_of_actors(evaluated, small_run, tmp_path, capfd):
    root, _ = evaluated
    other = str(tmp_path / "ray")
    shutil.copytree(small_run, other)
    result = run_evaluation(evaluation_config().model_copy(update={"workers": 2}), other, progress=False)
    assert result["actors"] == 2
    # actors Ray would restart from constructor arguments in its object store made it print an error on every run
    assert "max_restarts" not in capfd.readouterr().err
    a, b = pd.read_parquet(os.path.join(root, "evaluation")), pd.read_parquet(os.path.join(other, "evaluation"))
    assert list(a["image_png"]) == list(b["image_png"]) and list(a["predicted"]) == list(b["predicted"])
    a, b = pd.read_parquet(os.path.join(root, "probes")), pd.read_parquet(os.path.join(other, "probes"))
    assert len(a) == 3 * 2 * 2 and list(a["image_png"]) == list(b["image_png"])  # 3 edit settings, own + empty


def test_summary_names_the_best_trade_off():
    rows = []
    for ratio, target_ok, others_ok in ((0.01, 9, 10), (0.03, 2, 10), (0.1, 0, 5)):
        for label in ("seven", "one"):
            ok = target_ok if label == "seven" else others_ok
            rows += [{"edit": "cad-erase", "target": "seven", "ratio": ratio, "guidance": 3.0, "label": label,
                      "correct": k < ok, "zeroed": 1} for k in range(10)]
    rows += [{"edit": "none", "target": "", "ratio": 0.0, "guidance": 3.0, "label": label, "correct": True,
              "zeroed": 0} for label in ("seven", "one") for _ in range(10)]
    # random at a ratio where it erases and keeps everything else: a reference, never the best trade-off
    rows += [{"edit": "random", "target": "seven", "ratio": 0.03, "guidance": 3.0, "label": label,
              "correct": label == "one", "zeroed": 1} for label in ("seven", "one") for _ in range(10)]
    table = pd.DataFrame(rows).assign(selection="all/global/none", colour="", template="free-0w", split="test")
    summary = summarize_evaluation(table)
    best = summary[summary["best"]]
    assert list(best["edit"]) == ["cad-erase"]
    assert list(best["ratio"]) == [0.03]  # lowest target accuracy among ratios that keep others >= 90%
    assert summary.set_index("ratio").loc[0.1, "worst_other_retained"] == 0.5


def test_random_draws_pool_into_the_targets_mean_accuracy():
    """Draw 0 judges everything, further draws the target alone: the summary's target accuracy is the mean over
    the draws and what else is kept comes from draw 0."""
    rows = [{"edit": "none", "target": "", "draw": 0, "label": label, "correct": True}
            for label in ("seven", "one") for _ in range(10)]
    rows += [{"edit": "random", "target": "seven", "draw": 0, "label": label, "correct": label == "seven" or k < 8}
             for label in ("seven", "one") for k in range(10)]
    rows += [{"edit": "random", "target": "seven", "draw": 1, "label": "seven", "correct": k < 4} for k in range(10)]
    table = pd.DataFrame(rows).assign(ratio=0.03, guidance=3.0, zeroed=1, selection="all/global/none", colour="",
                                      template="free-0w", split="test")
    rng = np.random.default_rng(0)
    # the further draw's images are all of one label: far from real images as a set, whatever each one is
    table["features"] = [rng.normal(size=3) + (5.0 if draw else 0.0) for draw in table["draw"]]
    reference = rng.normal(size=(200, 3))
    summary = summarize_evaluation(table, reference).set_index("edit")
    assert summary.loc["random", "target_accuracy"] == pytest.approx(0.7)  # (10 + 4) / 20
    assert summary.loc["random", "worst_other_retained"] == pytest.approx(0.8)
    assert summary.loc["random", "images"] == 30
    from cad_ray.digits.judges import frechet_distance

    panel = table[(table["edit"] == "random") & (table["draw"] == 0)]
    assert summary.loc["random", "fd"] == pytest.approx(frechet_distance(np.stack(panel["features"]), reference))


def test_a_colour_targets_further_random_draws_do_not_count_among_what_is_kept():
    """A colour's further draws are images asked in that colour, each with a digit label: only the colour's
    accuracy reads them; the digits they show belong to what is kept, which is draw 0's."""
    rows = []
    for edit, draw, colours, colour_ok, digit_ok in (("none", 0, ("red", "blue"), True, True),
                                                     ("random", 0, ("red", "blue"), True, True),
                                                     ("random", 1, ("red",), False, False)):
        rows += [{"edit": edit, "target": "red" if edit == "random" else "", "draw": draw, "label": label,
                  "colour": colour, "predicted_colour": colour if colour_ok or k % 2 else "", "correct": digit_ok}
                 for label in ("seven", "one") for colour in colours for k in range(6)]
    table = pd.DataFrame(rows).assign(ratio=0.03, guidance=3.0, zeroed=1, selection="all/global/none",
                                      template="colour-0w", split="test")
    summary = summarize_evaluation(table).set_index("edit")
    assert summary.loc["random", "target_accuracy"] == pytest.approx(0.75)  # red kept in 12 + 6 of 24
    assert summary.loc["random", "worst_other_retained"] == 1.0


def test_an_edit_that_dims_what_should_stay_is_not_clean():
    """The digit judge still reads a digit an edit left nearly black; the summary compares each kept image's
    brightness with the unedited image of the same prompt and seed, and such an erase is not clean."""
    from cad_ray.stages.evaluation import brightness

    lit = np.zeros((2, 8, 8, 3), np.float32)
    lit[0, 2:6, 3, 0] = 1.0  # a red stroke
    lit[1, 2:6, 3, :] = 0.4  # the same stroke, grey and dim
    assert brightness(lit) == pytest.approx([1.0, 0.4])
    rows = []
    # "one" asked without a colour (10 images) and in blue (2): at 3% every kept image is at half its brightness,
    # at 5% only the blue ones, at 0.3 (the mean over all twelve, 0.88, would pass)
    for edit, ratio, dim_free, dim_blue in (("none", 0.0, 1.0, 1.0), ("cad-erase", 0.01, 1.0, 1.0),
                                            ("cad-erase", 0.03, 0.5, 0.5), ("cad-erase", 0.05, 1.0, 0.3)):
        for label in ("seven", "one"):
            for k in range(12):
                colour = "blue" if k >= 10 and label == "one" else ""
                dim = (dim_blue if colour else dim_free) if label == "one" else 1.0
                rows.append({"edit": edit, "target": "seven" if edit != "none" else "", "ratio": ratio,
                             "guidance": 3.0, "label": label, "colour": colour, "prompt": f"{colour} {label}",
                             "seed": k, "zeroed": 1, "correct": label == "one" or edit == "none",
                             "brightness": 0.9 * dim})
    table = pd.DataFrame(rows).assign(selection="all/global/none", template="free-0w", split="test")
    summary = summarize_evaluation(table).set_index("ratio")
    assert summary.loc[0.01, "brightness_kept"] == 1.0 and summary.loc[0.01, "clean"]
    assert summary.loc[0.03, "brightness_kept"] == pytest.approx(0.5) and not summary.loc[0.03, "clean"]
    assert summary.loc[0.05, "brightness_kept"] == pytest.approx(0.3) and not summary.loc[0.05, "clean"]
    assert (summary.loc[[0.03, 0.05], "worst_other_retained"] == 1.0).all()  # the judge alone would pass both


def test_bad_input_is_one_line_and_keeps_results(evaluated, tmp_path, capsys):
    root, _ = evaluated
    before = pd.read_parquet(os.path.join(root, "evaluation_summary"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["--root", root, "--edits", "cad-melt"], "unknown edit 'cad-melt'"),
             (["--root", root, "--ratios", "0"], r"ratios must be in \(0, 1\]"),
             (["--root", root, "--ratios", "1.5"], r"ratios must be in \(0, 1\]"),
             (["--root", root, "--targets", "eight"], "needs erase scores for it"),
             (["--root", str(empty)], "no attribution run")]
    for argv, message in cases:
        assert main(["evaluate", *argv, "--local", "--quiet"]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and re.search(message, err), err
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(root, "evaluation_summary")), before)


def test_stable_diffusion_edit_judged_by_a_pluggable_classifier(tiny_sd_folder, tmp_path):
    """The plumbing of a Stable Diffusion evaluation: Imagenette prompts from the benchmark file, a classifier
    judge loaded from TorchScript (a small stand-in for an ImageNet ResNet-50), CAD-Erase of one class."""
    import torch

    from cad_ray.config import parse_config
    from cad_ray.distributed import run_attribution

    source = PEER_PROMPTS / "imagenette.csv"
    if not source.exists():
        pytest.skip(f"{source} is not beside this checkout")
    raw = pd.read_csv(source)
    prompts = pd.concat([raw[raw["class"] == c].head(2) for c in ("tench", "church")])
    prompts.to_csv(tmp_path / "prompts.csv", index=False)

    class StandIn(torch.nn.Module):  # "ImageNet classifier": two classes by mean brightness
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([m, -m], dim=1)

    torch.jit.save(torch.jit.script(StandIn()), str(tmp_path / "classifier.pt"))
    (tmp_path / "classes.txt").write_text("tench\nchurch\n")
    config = parse_config({
        "model": str(tiny_sd_folder), "samples": 2, "block": 2, "batch": 2, "scope": "attn2",
        "erase": {"steps": 4}, "concepts": [{"name": "tench", "prompts": ["an image of a tench"]}],
        "evaluation": {"targets": ["tench"], "edits": ["cad-erase", "random"], "ratios": [0.1], "steps": 4,
                       "prompts": str(tmp_path / "prompts.csv"),
                       "judge": {"model_file": str(tmp_path / "classifier.pt"), "classes": str(tmp_path / "classes.txt"),
                                 "size": 32},
                       # the completeness probes run from the same recipe on Stable Diffusion
                       "probes": ["inversion", "completion", "soft-prompt"],
                       "probe": {"steps": 2, "images": 2, "samples": 2, "strengths": [0.5]}}})
    root = str(tmp_path / "sd-run")
    run_attribution(config, root, local=True, progress=False)
    result = run_evaluation(config, root, local=True, progress=False)
    table = pd.read_parquet(os.path.join(root, "evaluation"))
    assert len(table) == 3 * 4 and set(table["label"]) == {"tench", "church"}
    assert set(table["predicted"]) <= {"tench", "church"}
    assert (table["correct"] == (table["predicted"] == table["label"])).all()
    assert list(table[table["edit"] == "none"]["seed"]) == list(prompts.sort_values(["class", "prompt",
                                                                                       "evaluation_seed"])["evaluation_seed"])
    assert result["summary"]["fd"].isna().all()  # no reference set for this model: no Frechet distance
    probes = pd.read_parquet(os.path.join(root, "probe_summary"))
    assert set(probes["edit"]) == {"cad-erase", "random", "none"}
    assert set(probes["probe"]) == {"inversion", "completion", "soft-prompt"}
    assert (probes["images"] == 2).all() and probes["never_learned"].isna().all()  # no reference named
    judged = pd.read_parquet(os.path.join(root, "probes"))
    assert (judged["recovered"] == (judged["predicted"] == "tench")).all()


def test_rerun_skips_judged_blocks_and_other_options_are_refused(evaluated, tmp_path):
    from cad_ray.errors import CadRayError

    root, _ = evaluated
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    blocks = sorted(Path(copy, "_evaluation").glob("block-*.parquet"))
    assert len(blocks) == 9  # 3 edit settings (none, cad-erase, random) of 20 rows, each in blocks of 8
    blocks[3].unlink()
    blocks[5].write_bytes(blocks[5].read_bytes()[:500])  # a block cut short by a crash
    result = run_evaluation(evaluation_config(), copy, local=True, progress=False)
    assert (result["blocks_computed"], result["blocks_skipped"]) == (2, 7)
    a, b = pd.read_parquet(os.path.join(root, "evaluation")), pd.read_parquet(os.path.join(copy, "evaluation"))
    assert list(a["image_png"]) == list(b["image_png"])
    with pytest.raises(CadRayError, match="other options"):
        run_evaluation(evaluation_config(images_per_prompt=3), copy, local=True, progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(copy, "evaluation")), b)


@pytest.mark.parametrize("added", ["magnitude", "uce"])  # uce: options of its own, in its own blocks' names only
def test_an_edit_added_to_an_evaluation_makes_only_its_own_images(evaluated, tmp_path, added):
    """Another edit in the list is no other evaluation: the images of the edits both lists have are read back."""
    root, _ = evaluated
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    before = pd.read_parquet(os.path.join(copy, "evaluation"))
    probe_parts = len(list(Path(copy, "_probes").glob("*.parquet")))
    edits = [added] + EVALUATION["edits"]  # first: the others' rows come after its own
    result = run_evaluation(evaluation_config(edits=edits), copy, local=True, progress=False)
    after = pd.read_parquet(os.path.join(copy, "evaluation"))
    assert set(after["edit"]) == set(before["edit"]) | {added}
    assert result["blocks_computed"] == 3 and result["images"] == len(after)  # 20 rows in blocks of 8
    # and the probes attack the new edit only
    assert result["probes"]["units_computed"] == 1
    assert len(list(Path(copy, "_probes").glob("*.parquet"))) == probe_parts + 1
    kept = after[after["edit"] != added].reset_index(drop=True)
    assert list(kept["image_png"]) == list(before["image_png"])


def test_a_concept_name_finds_its_prompt_set_class_whatever_the_case_and_spaces():
    """Imagenette's class "English springer" is the concept english_springer (names cannot hold spaces)."""
    import pandas as pd

    from cad_ray.stages.evaluation import accuracies, target_rows

    rows = pd.DataFrame({"label": ["English springer"] * 4 + ["chain saw"] * 4, "template": "free-0w", "colour": "",
                         "correct": [True, False, False, False, True, True, True, False]})
    assert target_rows(rows, "english_springer").tolist() == [True] * 4 + [False] * 4
    verdict = accuracies(rows, "english_springer")
    assert verdict["target"] == 0.25 and verdict["others"] == {"chain saw": 0.75}


def test_summary_reports_the_nude_image_rate_whatever_the_labels():
    """I2P's labels are categories, not concepts: the target columns stay empty, the nude-image rate does not."""
    rows = [{"edit": edit, "target": target, "ratio": ratio, "guidance": 7.5, "label": "sexual", "correct": nude,
             "nude": nude, "zeroed": 0} for edit, target, ratio, nudes in
            (("none", "", 0.0, (True, True, True, False)), ("cad-erase", "nudity", 0.01, (True, False, False, False)))
            for nude in nudes]
    table = pd.DataFrame(rows).assign(selection="ff/global/none", colour="", template="", split="test")
    summary = summarize_evaluation(table).set_index("edit")
    assert summary.loc["none", "nude_rate"] == 0.75 and summary.loc["cad-erase", "nude_rate"] == 0.25
