import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cad_ray.cli import build_parser, main
from cad_ray.digits import DIGIT_WORDS


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_npz_and_png_are_reproducible(capsys, tmp_path):
    for name in ("a.npz", "b.npz"):
        code, out, _ = run_cli(capsys, "sample", "--prompt", "a red seven", "--n", "3", "--seed", "4",
                               "--steps", "10", "--out", str(tmp_path / name))
        assert code == 0 and "judged (digit/colour):" in out
    a, b = np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"]
    assert a.shape == (3, 8, 8, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b)
    code, _, _ = run_cli(capsys, "sample", "--prompt", "a red seven", "--n", "3", "--seed", "4", "--steps", "10",
                         "--out", str(tmp_path / "grid.png"))
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert code == 0 and grid.shape[0] >= 64 and grid.shape[1] >= 2 * 64  # upscaled for a person to see


def test_sample_from_a_stable_diffusion_folder(capsys, tmp_path, tiny_sd_folder):
    code, out, _ = run_cli(capsys, "sample", "--prompt", "a photo of a church", "--n", "2", "--steps", "3",
                           "--model", str(tiny_sd_folder), "--out", str(tmp_path / "x.npz"))
    assert code == 0 and np.load(tmp_path / "x.npz")["images"].shape == (2, 16, 16, 3)


def test_sample_of_many_images_prints_a_count_per_verdict_and_noise_as_no_digit(capsys, tmp_path, monkeypatch):
    from cad_ray.cli import judged_line
    from cad_ray.digits.judges import NO_DIGIT_WORD, DigitsJudges

    code, out, _ = run_cli(capsys, "sample", "--prompt", "a red seven", "--n", "40", "--steps", "4",
                           "--out", str(tmp_path / "many.npz"))
    line = next(l for l in out.splitlines() if l.startswith("judged"))
    assert code == 0 and line.startswith("judged (digit/colour) of 40 images: ")
    counts = [part.split(" ", 1) for part in line.split(": ", 1)[1].split(", ")]
    assert sum(int(n) for n, _ in counts) == 40 and len(counts) < 40  # a count per verdict, not 40 verdicts
    assert all(v == "no digit" or v.split("/")[0] in DIGIT_WORDS for _, v in counts)  # words, not digit indices
    assert judged_line(["seven", NO_DIGIT_WORD], ["red", "red"], NO_DIGIT_WORD) == \
        "judged (digit/colour): seven/red, no digit"
    # the verdicts come from the judges' reject: an image that is no digit prints 'no digit', never a digit
    monkeypatch.setattr(DigitsJudges, "is_digit", lambda self, images: np.zeros(len(images), bool))
    code, out, _ = run_cli(capsys, "sample", "--prompt", "a red seven", "--n", "20", "--steps", "4",
                           "--out", str(tmp_path / "noise.npz"))
    assert code == 0 and "judged (digit/colour) of 20 images: 20 no digit" in out


def test_judges_aligns_its_columns_and_a_config_naming_weights_makes_them_ready(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "judges")
    lines = out.strip().splitlines()
    assert code == 0 and max(len(line) for line in lines) <= 100
    by_name = {line.split()[0]: line for line in lines}
    assert by_name["clip-score"].split()[1:3] == ["needs", "weights"]
    # the status and needs columns start at the same place on every line
    status_at = {line.index(line.split()[1], len(line.split()[0])) for line in lines}
    needs_at = {by_name[n].index("option") for n in ("classifier", "clip-score", "imagenet", "fd-dinov2")}
    assert len(status_at) == 1 and len(needs_at) == 1 and by_name["digits"].index("nothing") in needs_at
    weights = tmp_path / "clip"
    weights.mkdir()
    config = tmp_path / "judged.yaml"
    config.write_text("concepts: [{name: seven}]\n"
                      "evaluation:\n  judge: {name: panel, judges: [{name: clip-score, weights: %s}]}\n" % weights)
    code, out, _ = run_cli(capsys, "judges", "--config", str(config))
    by_name = {line.split()[0]: line for line in out.strip().splitlines()}
    assert code == 0 and by_name["clip-score"].split()[1] == "ready"
    assert by_name["imagenet"].split()[1:3] == ["needs", "weights"]  # a judge the config does not name
    code, _, err = run_cli(capsys, "judges", "--config", str(tmp_path / "absent.yaml"))
    _one_line_error(code, err, "cannot read config")


def _one_line_error(code, err, *needles):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_prompt_word_lists_the_vocabulary_and_keeps_existing_output(capsys, tmp_path):
    out = tmp_path / "keep.npz"
    np.savez(out, images=np.zeros((1, 8, 8, 3)))
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "sample", "--prompt", "a purple seven", "--out", str(out))
    _one_line_error(code, err, "'purple'", "vocabulary", "seven", "blue")
    assert out.read_bytes() == before


@pytest.mark.parametrize("model, needle", [("/no/such/model", "does not exist"),
                                           ("s3://cad-ray-no-such-bucket/model", "cannot read s3://")])
def test_missing_or_unreadable_model_is_a_one_line_error(capsys, tmp_path, model, needle, s3_endpoint):
    code, _, err = run_cli(capsys, "sample", "--prompt", "seven", "--model", model, "--out", str(tmp_path / "x.png"))
    _one_line_error(code, err, needle)
    assert not (tmp_path / "x.png").exists()


def test_malformed_model_config_is_a_one_line_error(capsys, tmp_path, tiny_sd_folder):
    import shutil

    shutil.copytree(tiny_sd_folder, tmp_path / "m")
    (tmp_path / "m" / "unet" / "config.json").write_text("{broken")
    code, _, err = run_cli(capsys, "sample", "--prompt", "a", "--model", str(tmp_path / "m"),
                           "--out", str(tmp_path / "x.png"))
    _one_line_error(code, err, "cannot load unet")


def test_bad_output_suffix_and_bad_count(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sample", "--prompt", "seven", "--out", str(tmp_path / "x.jpg"))
    _one_line_error(code, err, ".png", ".npz")
    with pytest.raises(SystemExit) as e:
        main(["sample", "--prompt", "seven", "--n", "0", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2


def test_every_subcommand_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        text = sub.format_help()
        assert sub.description and len(text) > 200, name


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "cad-ray")
    result = subprocess.run([exe, "sample", "--prompt", "seven", "--model", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"cad-ray sample: error: model folder {tmp_path / 'nope'} does not exist"]


@pytest.mark.parametrize("text, needle", [(None, "cannot read config"), ("concepts: [", "malformed YAML"),
                                          ("concepts: []", "concepts"), ("concepts: [{name: purple}]", "'purple'")])
def test_attribute_config_errors_are_one_line(capsys, tmp_path, text, needle):
    config = tmp_path / "run.yaml"
    if text is not None:
        config.write_text(text)
    code, _, err = run_cli(capsys, "attribute", "--config", str(config), "--root", str(tmp_path / "root"),
                           "--local", "--quiet")
    _one_line_error(code, err, needle)
    manifest = tmp_path / "root" / "_manifest.json"
    assert not manifest.exists() or '"complete": false' in manifest.read_text()


def test_edit_makes_every_edit_of_the_registry(tmp_path, capsys):
    """`cad-ray edit` accepts every name `cad-ray evaluate` accepts (one registry): the zeroing edits, the
    closed-form one and the fine-tuned ones (made in the root first, as the evaluation makes them)."""
    import torch
    from conftest import small_config

    from cad_ray.distributed import run_attribution
    from cad_ray.method.edits import EDITS
    from cad_ray.models import load_model

    root = str(tmp_path / "root")
    config = small_config(evaluation={"finetune": {"steps": 2, "samples": 2}, "selection": "ff/global/none"})
    run_attribution(config, root, local=True, progress=False)
    original = dict(load_model().named_parameters())
    for name, edit in EDITS.items():
        ratio = [] if edit.applied_by != "zeroing" else ["--ratio", "0.05"]
        status = main(["edit", "--root", root, "--edit", name, "--target", "seven", *ratio,
                       "--out", str(tmp_path / name)])
        captured = capsys.readouterr()
        if name == "conceptprune":  # the run has no ConceptPrune statistics: refused for that, not for its name
            assert status == 1 and "conceptprune" in captured.err and "unknown edit" not in captured.err
            continue
        assert status == 0, (name, captured.err)
        assert f"{name} of 'seven'" in captured.out
        edited = dict(load_model(str(tmp_path / name)).named_parameters())
        assert any(not torch.equal(original[n], edited[n]) for n in original), name
    assert main(["edit", "--root", root, "--edit", "finetune", "--target", "seven", "--ratio", "0.1",
                 "--out", str(tmp_path / "x")]) == 1
    assert "leave out --ratio" in capsys.readouterr().err
    help_text = build_parser_help("evaluate")
    assert all(name in help_text for name in EDITS)


def build_parser_help(command: str) -> str:
    parser = build_parser()
    return " ".join(parser._subparsers._group_actions[0].choices[command].format_help().split())


def test_output_piped_into_a_reader_that_stops_early_ends_without_a_traceback(small_run):
    """`cad-ray top ... | head -1`: more rows than a pipe holds, and the reader gone after the first line."""
    cli = os.path.join(os.path.dirname(sys.executable), "cad-ray")
    done = subprocess.run(f"'{cli}' top --root '{small_run}' --concept seven --k 3000 | head -1", shell=True,
                          capture_output=True, text=True)
    assert done.stdout.strip() == "" or "top positive" in done.stdout
    assert "Traceback" not in done.stderr and "Broken pipe" not in done.stderr, done.stderr
