"""Issue 12: results that can be trusted after anything happens. Damaged, deleted, stale, foreign and locked
roots, and the wrong answers that used to pass silently: each through the `cad-ray` command, a one-line error
(or a correct repair), and earlier results byte-identical where refused."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from conftest import SMALL
from test_bad_input import config_file, snapshot

from cad_ray.cli import main
from cad_ray.store import ScoreStore

SCORES = Path("scores", "concept=seven", "objective=erase", "part-0.parquet")


def _run(argv, capsys):
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err.strip()


def _one_line_refusal(argv, message, capsys, root=None):
    before = snapshot(root) if root else None
    status, _, err = _run(argv, capsys)
    assert status == 1, err
    assert "\n" not in err and err.startswith(f"cad-ray {argv[0]}: error:"), err
    assert re.search(message, err), err
    if root:
        assert snapshot(root) == before
    return err


def score_page(path) -> int:
    """A byte offset inside the first data page of the score column (past its page header)."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    column = meta.row_group(0).column(meta.schema.names.index("score"))
    return column.data_page_offset + 40


def test_damaged_or_deleted_score_table_is_named_by_readers_shown_by_status_and_repaired(small_run, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    original = (root / SCORES).read_bytes()
    config = config_file(tmp_path, "small")
    for damage in ("truncate", "garble", "delete"):
        path = root / SCORES
        if damage == "truncate":
            path.write_bytes(original[: len(original) // 2])
        elif damage == "garble":  # zeroed bytes in the score column, which every reader decodes
            start = score_page(root / SCORES)
            path.write_bytes(original[:start] + b"\0" * 200 + original[start + 200:])
        else:
            path.unlink()
        for argv in (["top", "--root", str(root), "--concept", "seven"],
                     ["overlap", "--root", str(root), "--a", "seven", "--b", "red"]):
            err = _one_line_refusal(argv, "missing or damaged", capsys)
            assert "objective=erase/part-0.parquet" in err and "cad-ray attribute" in err
        status, out, _ = _run(["status", "--root", str(root)], capsys)
        attribution = out.splitlines()[1]
        assert "False" in attribution and "scores/concept=seven/objective=erase" in attribution, out
        status, out, err = _run(["attribute", "--config", config, "--root", str(root), "--local", "--quiet"], capsys)
        assert status == 0, err
        assert pd.read_parquet(root / SCORES).equals(pd.read_parquet(Path(small_run) / SCORES)), damage
        assert "True" in _run(["status", "--root", str(root)], capsys)[1].splitlines()[1]


def test_a_folder_that_is_not_ours_is_refused_before_any_work(tmp_path, capsys):
    root = tmp_path / "theirs"
    (root / "scores").mkdir(parents=True)
    (root / "scores" / "their-table.parquet").write_bytes(b"someone else's data")
    _one_line_refusal(["attribute", "--config", config_file(tmp_path, "small"), "--root", str(root), "--local",
                       "--quiet"], "not a run root of ours", capsys, str(root))
    assert not (root / "_manifest.json").exists()


def test_a_second_driver_on_a_locked_root_refuses_and_names_the_holder(small_run, tmp_path, capsys):
    import socket

    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    # a live process of this host that is not us holds the lock: pid 1
    (root / "_lock.json").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "stage": "validation",
                                                 "started": "2026-11-30T00:00:00Z", "token": "x"}))
    err = _one_line_refusal(["validate", "--root", str(root), "--local", "--quiet", "--ablations", "6"],
                            "another cad-ray validation", capsys, str(root))
    assert "pid 1" in err
    # a lock whose process is gone is taken over
    (root / "_lock.json").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": socket.gethostname(),
                                                 "stage": "attribution", "token": "y"}))
    assert _run(["attribute", "--config", config_file(tmp_path, "small"), "--root", str(root), "--local",
                 "--quiet"], capsys)[0] == 0
    assert not (root / "_lock.json").exists()


def test_code_named_in_a_config_is_refused(small_run, tmp_path, capsys):
    config = config_file(tmp_path, "code", evaluation={"judge": {"factory": "os:system", "command": "echo pwned"}})
    _one_line_refusal(["evaluate", "--config", config, "--root", small_run, "--local", "--quiet"],
                      "never code to import", capsys, small_run)
    config = config_file(tmp_path, "unknown", evaluation={"judge": {"name": "os.system"}})
    _one_line_refusal(["evaluate", "--config", config, "--root", small_run, "--local", "--quiet"],
                      "unknown judge 'os.system'.*registered judges: classifier, .*digits, .*nudenet", capsys, small_run)


def test_a_concept_whose_prompt_is_its_base_prompt_is_refused(tmp_path, capsys):
    config = config_file(tmp_path, "same", concepts=[{"name": "x", "prompts": ["seven"], "base_prompt": "seven"}])
    _one_line_refusal(["attribute", "--config", config, "--root", str(tmp_path / "r"), "--local", "--quiet"],
                      "equal its base prompt", capsys)


def test_top_beyond_the_positive_scores_lists_only_positive_ones(small_run, capsys):
    scores = ScoreStore(small_run).scores("red")
    positive = int((scores["score"] > 0).sum())
    status, out, _ = _run(["top", "--root", small_run, "--concept", "red", "--k", str(len(scores))], capsys)
    assert status == 0
    assert f"only {positive} component(s) have a positive score" in out
    assert len([l for l in out.splitlines() if re.match(r"\s*\d+\s+\S*transformer_blocks\.", l)]) == positive


def test_a_stage_defaults_to_the_options_the_root_was_made_with(small_run, tmp_path, capsys):
    """The README's `cad-ray validate --root ROOT` after `cad-ray run --config C`: the root's own sections."""
    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    manifest = json.loads((root / "_manifest.json").read_text())
    manifest["stage_options"] = {"validation": {"fractions": [0.01], "ablations": 6, "concepts": ["seven"],
                                                "eval_samples": 1, "eval_points_per_sample": 2, "projections": 2,
                                                "sketch_points_per_sample": 2, "block": 6}}
    (root / "_manifest.json").write_text(json.dumps(manifest))
    assert _run(["validate", "--root", str(root), "--local", "--quiet"], capsys)[0] == 0
    assert json.loads((root / "_validation.json").read_text())["options"]["ablations"] == 6
    # again, without options: the validation's own options, nothing recomputed and nothing refused
    before = snapshot(str(root / "_validation"))
    assert _run(["validate", "--root", str(root), "--local", "--quiet"], capsys)[0] == 0
    assert snapshot(str(root / "_validation")) == before


def test_overwrite_with_another_seed_then_later_stages_equal_a_fresh_run(tmp_path, capsys):
    """attribute -> validate -> evaluate -> attribute --overwrite (other seed) -> validate -> evaluate gives the
    tables of a fresh run with the second seed: nothing stale is reused."""
    stages = {"validation": {"fractions": [0.01], "ablations": 6, "concepts": ["seven"], "eval_samples": 1,
                             "eval_points_per_sample": 2, "projections": 2, "sketch_points_per_sample": 2, "block": 6},
              "evaluation": {"targets": ["seven"], "edits": ["cad-erase", "random"], "ratios": [0.05],
                             "images_per_prompt": 1, "steps": 4, "prompt_panel": "canonical"}}
    small = {**SMALL, "concepts": [{"name": "seven"}, {"name": "one"}], "erase": {"steps": 6}, **stages}
    first, second = tmp_path / "s0.yaml", tmp_path / "s1.yaml"
    first.write_text(yaml.safe_dump({**small, "seed": 0}))
    second.write_text(yaml.safe_dump({**small, "seed": 1}))

    def pipeline(config, root, overwrite=False):
        common = ["--root", str(root), "--local", "--quiet"]
        assert _run(["attribute", "--config", str(config), *common, *(["--overwrite"] if overwrite else [])],
                    capsys)[0] == 0
        assert _run(["validate", "--config", str(config), *common], capsys)[0] == 0
        assert _run(["evaluate", "--config", str(config), *common], capsys)[0] == 0

    pipeline(first, tmp_path / "reused")
    pipeline(second, tmp_path / "reused", overwrite=True)
    pipeline(second, tmp_path / "fresh")
    for table in ("scores", "validation", "validation_summary", "evaluation", "evaluation_summary"):
        reused, fresh = pd.read_parquet(tmp_path / "reused" / table), pd.read_parquet(tmp_path / "fresh" / table)
        pd.testing.assert_frame_equal(reused, fresh, obj=table)


def test_more_bad_inputs_each_one_line_and_nothing_lost(small_run, tiny_sd_folder, tmp_path, capsys):
    """Issue 12's inputs that used to end in tracebacks or pass silently, beside test_bad_input's 19."""
    root = str(tmp_path / "done")
    shutil.copytree(small_run, root)
    no_length = tmp_path / "sd-no-length"
    shutil.copytree(tiny_sd_folder, no_length)
    tokenizer = no_length / "tokenizer" / "tokenizer_config.json"
    tokenizer.write_text(json.dumps({k: v for k, v in json.loads(tokenizer.read_text()).items()
                                     if k != "model_max_length"}))
    fast = tmp_path / "digits-fast"
    shutil.copytree(Path(__file__).resolve().parents[1] / "cad_ray" / "assets" / "digits-model", fast)
    index = json.loads((fast / "model_index.json").read_text())
    (fast / "model_index.json").write_text(json.dumps({**index, "sampling": "fast"}))
    header_only = tmp_path / "empty.csv"
    header_only.write_text("prompt,evaluation_seed,class\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out = str(tmp_path / "x.png")
    cases = {
        "tokenizer without model_max_length": (["sample", "--prompt", "a church", "--model", str(no_length),
                                                 "--out", out], "has no model_max_length"),
        "sampling: fast in model_index.json": (["sample", "--prompt", "seven", "--model", str(fast), "--out", out],
                                               "'sampling' must be a mapping"),
        "characters outside the vocabulary": (["sample", "--prompt", "seven!", "--out", out],
                                              r"cannot read: '!'"),
        "sample to another format": (["sample", "--prompt", "seven", "--out", str(tmp_path / "x.jpg")],
                                     r"must end in \.png"),
        "prompt CSV with a header and no rows": (["evaluate", "--root", root, "--prompts", str(header_only),
                                                  "--local", "--quiet"], "has a header but no prompts"),
        "edit --out naming a file": (["edit", "--root", root, "--edit", "cad-erase", "--target", "seven",
                                      "--ratio", "0.1", "--out", str(a_file)], "is a file"),
        "evaluate a target without scores": (["evaluate", "--root", root, "--targets", "three", "--local",
                                              "--quiet"], "needs erase scores"),
        "validate an unknown concept": (["validate", "--root", root, "--concepts", "three", "--local", "--quiet"],
                                        "no erase scores for three"),
        "evaluate with another attribution's config": (["evaluate", "--root", root, "--config",
                                                        config_file(tmp_path, "seed9", seed=9), "--local", "--quiet"],
                                                       "another attribution run"),
        "top of an unknown concept": (["top", "--root", root, "--concept", "three"], "no scores for concept"),
        "a contrast without other concepts of the kind": (
            ["evaluate", "--root", root, "--local", "--quiet", "--config", config_file(
                tmp_path, "kind", evaluation={"selection": "attn2/global/kind-mean"})], "ranks 'seven' against other"),
        "a specific ranking against itself": (["top", "--root", root, "--concept", "seven", "--specific",
                                               "--against", "seven"], "needs other concepts"),
        "a specific ranking against a concept without scores": (
            ["top", "--root", root, "--concept", "seven", "--specific", "--against", "blue"], "no erase scores for blue"),
        "an unknown selection": (["evaluate", "--root", root, "--local", "--quiet", "--config", config_file(
            tmp_path, "sel", evaluation={"selection": "attn2/diagonal/none"})], "unknown granularity 'diagonal'"),
    }
    for what, (argv, message) in cases.items():
        before = snapshot(root)
        status, _, err = _run(argv, capsys)
        assert status == 1 and "\n" not in err and err.startswith(f"cad-ray {argv[0]}: error:"), (what, err)
        assert re.search(message, err), (what, err)
        assert snapshot(root) == before, what
    assert len(cases) == 14


def test_every_reader_names_a_damaged_table(small_run, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    (root / SCORES).write_bytes((root / SCORES).read_bytes()[:500])
    for argv in (["validate", "--root", str(root), "--local", "--quiet"],
                 ["evaluate", "--root", str(root), "--local", "--quiet"],
                 ["edit", "--root", str(root), "--edit", "cad-erase", "--target", "seven", "--ratio", "0.1",
                  "--selection", "ff/global/none", "--out", str(tmp_path / "edited")]):
        _one_line_refusal(argv, "scores/concept=seven/objective=erase/part-0.parquet is missing or damaged",
                          capsys, str(root))


def test_an_access_error_is_never_read_as_not_done(small_run, monkeypatch):
    """An S3 permission error while checking a file says nothing about the file: it is raised, not taken for
    "absent or damaged" (which would recompute, or report missing)."""
    import pytest

    from cad_ray.errors import CadRayError
    from cad_ray.store import RunRoot

    run = RunRoot(small_run)
    parts = ("scores", "concept=seven", "objective=erase", "part-0.parquet")
    assert run.footer(*parts) is not None and run.footer("scores", "nothing.parquet") is None

    def denied(*args, **kwargs):
        raise PermissionError("Access Denied")

    monkeypatch.setattr(run.fs, "open", denied)
    with pytest.raises(CadRayError, match="cannot read .*PermissionError: Access Denied"):
        run.footer(*parts)
    with pytest.raises(CadRayError, match="PermissionError"):
        run.readable(*parts)


def test_only_a_decode_error_reads_as_a_damaged_file_a_bug_is_raised(small_run, tmp_path, monkeypatch):
    """A truncated, garbled or foreign file is "damaged" (made again); a KeyError or TypeError while reading is a
    bug of the code, raised, never taken for "damaged" (which would silently recompute)."""
    import json as json_module

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from cad_ray.errors import CadRayError
    from cad_ray.store import RunRoot, is_damage

    assert is_damage(pa.ArrowInvalid("Parquet magic bytes not found")) and is_damage(OSError("corrupt page"))
    assert is_damage(json_module.JSONDecodeError("bad", "{", 0))
    for bug in (KeyError("options"), TypeError("'NoneType' object is not subscriptable"), AttributeError("x"),
                PermissionError("Access Denied")):
        assert not is_damage(bug), bug
    run = RunRoot(str(tmp_path))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "foreign.parquet")  # Parquet without cad-ray's metadata
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({b"cad_ray": b"[not, json"}),
                   tmp_path / "garbled.parquet")
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({b"cad_ray": b"[1, 2]"}), tmp_path / "list.parquet")
    (tmp_path / "short.parquet").write_bytes((Path(small_run) / SCORES).read_bytes()[:500])
    for name in ("foreign.parquet", "garbled.parquet", "list.parquet", "short.parquet"):
        assert run.footer(name) is None, name
    assert run.readable("short.parquet") is False

    def bug(*args, **kwargs):
        raise KeyError("a bug in the reader")

    monkeypatch.setattr(pq, "read_metadata", bug)
    with pytest.raises(CadRayError, match="KeyError"):
        RunRoot(small_run).footer(*SCORES.parts)


def test_a_half_written_fine_tuned_edit_is_made_again(small_run, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    config = config_file(tmp_path, "ft", evaluation={"targets": ["seven"], "edits": ["finetune"],
                                                     "images_per_prompt": 1, "steps": 4, "prompt_panel": "canonical",
                                                     "finetune": {"steps": 2, "samples": 1}})
    argv = ["evaluate", "--config", config, "--root", str(root), "--local", "--quiet"]
    assert _run(argv, capsys)[0] == 0
    folder = root / "edits" / "finetune-seven"
    weights = folder / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    whole = weights.read_bytes()
    # a crash after model_index.json but before the weights and the completion marker
    (folder / "_complete.json").unlink()
    weights.write_bytes(whole[:1000])
    assert _run(argv, capsys)[0] == 0
    assert weights.read_bytes() == whole and (folder / "_complete.json").exists()
    # the edit's cost, kept beside it, is the summary's edit_seconds; the unedited rows have none
    summary = pd.read_parquet(root / "evaluation_summary").set_index("edit")["edit_seconds"]
    assert summary["finetune"] == json.loads((folder / "cost.json").read_text())["seconds"] > 0
    assert np.isnan(summary["none"])


def test_quiet_prints_only_the_result_line(tmp_path):
    import subprocess
    import sys

    config = config_file(tmp_path, "tiny", samples=2, block=2, batch=2, erase={"steps": 3},
                         concepts=[{"name": "seven"}])
    done = subprocess.run([sys.executable, "-m", "cad_ray.cli", "attribute", "--config", config, "--root",
                           str(tmp_path / "r"), "--quiet", "--workers", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attribution complete in"), lines


def test_a_run_refused_by_its_config_check_does_not_block_the_corrected_run(tmp_path, capsys):
    root = str(tmp_path / "new")
    _one_line_refusal(["attribute", "--root", root, "--local", "--quiet", "--config",
                       config_file(tmp_path, "bad", scope="re:nothing")], "matches no parameter", capsys)
    status, _, err = _run(["attribute", "--root", root, "--local", "--quiet", "--config",
                           config_file(tmp_path, "good", samples=2, block=2, batch=2, erase={"steps": 3},
                                       concepts=[{"name": "seven"}])], capsys)
    assert status == 0, err


def test_no_command_writes_into_a_run_root_but_its_own_tables(small_run, tmp_path, capsys, monkeypatch):
    """Issue 26: report/edit/sample/quality --out onto a run root's manifest, part files or tables is refused before
    any work; the root's own report.html stays writable; '.' as edit's new folder works."""
    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    edit = ["edit", "--root", str(root), "--edit", "cad-erase", "--target", "seven", "--ratio", "0.1",
            "--selection", "ff/global/none", "--out"]
    inside = [["report", "--root", str(root), "--out", str(root / "_manifest.json")],
              ["report", "--root", str(root), "--out", str(root / SCORES)],
              ["report", "--root", str(tmp_path / "elsewhere"), "--out", str(root / "report.html")],
              [*edit, str(root / "scores" / "edited")],
              [*edit, str(root / "edits" / "mine")],
              ["sample", "--prompt", "seven", "--n", "1", "--out", str(root / "scores" / "x.png")],
              ["quality", "--n", "1", "--out", str(root / "_manifest.json")]]
    inside += [["attribute", "--config", config_file(tmp_path, "small"), "--root", str(root / "scores" / "run"),
                "--local", "--quiet"],
               ["validate", "--root", str(root / "validation"), "--config", config_file(tmp_path, "small"), "--local",
                "--quiet"]]
    for argv in inside:
        _one_line_refusal(argv, "lies inside the run root", capsys, str(root))
    (tmp_path / "grid.png").mkdir()
    for argv, message in ((["sample", "--prompt", "seven", "--n", "1", "--out", str(tmp_path / "grid.png")],
                           "is a folder"),
                          (["sample", "--prompt", "seven", "--n", "1", "--out", "/proc/x.png"], "cannot write"),
                          (["report", "--root", str(root), "--out", str(tmp_path)], "is a folder")):
        _one_line_refusal(argv, message, capsys, str(root))
    assert _run(["report", "--root", str(root), "--out", str(root / "report.html")], capsys)[0] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    status, _, err = _run([*edit, "."], capsys)
    assert status == 0, err
    assert (empty / "model_index.json").exists()


def test_the_cli_prints_the_tables_own_tensor_names(small_run, capsys):
    """A tensor name copied from `top` or `layers` matches the tables (they used to print tb./attn.)."""
    names = set(ScoreStore(small_run).layers("seven")["tensor"])
    for argv in (["top", "--concept", "seven", "--k", "3"], ["layers", "--concept", "seven"],
                 ["top", "--concept", "seven", "--k", "3", "--specific"]):
        status, out, err = _run([*argv, "--root", small_run], capsys)
        assert status == 0, err
        printed = {w for line in out.splitlines() for w in line.split() if w.endswith(".weight")}
        assert printed and printed <= names, (argv, printed - names)


def test_status_names_the_folder_that_holds_what_it_counts(small_run, capsys):
    status, out, _ = _run(["status", "--root", small_run], capsys)
    attribution = out.splitlines()[1]
    assert status == 0 and "scores/" in attribution and "_shards/" not in attribution, out


def test_an_s3_root_without_a_valid_bucket_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_file(tmp_path, "small")
    for root, message in (("s3://", "names no bucket"), ("s3:///run", "names no bucket"),
                          ("s3://a bucket/run", "not a valid S3 bucket name")):
        _one_line_refusal(["attribute", "--config", config, "--root", root, "--local", "--quiet"], message, capsys)
        _one_line_refusal(["top", "--root", root, "--concept", "seven"], message, capsys)
    assert list(tmp_path.iterdir()) == [Path(config)]  # no local folder 's3:'


def _take_lock(root, barrier, won):
    from cad_ray.errors import CadRayError
    from cad_ray.store import RunRoot

    barrier.wait()
    try:
        with RunRoot(root).locked("attribution"):
            won.put(1)
            barrier.wait()  # hold it until the other has tried
    except CadRayError:
        won.put(0)
        barrier.wait()


def test_two_drivers_starting_together_never_both_take_the_lock(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for trial in range(11):
        root = str(tmp_path / f"r{trial}")
        barrier, won = context.Barrier(2), context.Queue()
        takers = [context.Process(target=_take_lock, args=(root, barrier, won)) for _ in range(2)]
        for p in takers:
            p.start()
        for p in takers:
            p.join(30)
        assert sorted(won.get(timeout=5) for _ in takers) == [0, 1], trial
        assert not Path(root, "_lock.json").exists()


def test_a_broken_lock_is_one_line_and_never_taken_over(small_run, tmp_path, capsys):
    import socket

    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    argv = ["validate", "--root", str(root), "--local", "--quiet", "--ablations", "6"]
    for lock, message in (([1, 2], "is not a lock written by cad-ray"), ({"stage": "validation"}, "needs a pid"),
                          ({"pid": "12", "host": socket.gethostname()}, "needs a pid"), ("{not json", "is corrupt")):
        (root / "_lock.json").write_text(lock if isinstance(lock, str) else json.dumps(lock))
        _one_line_refusal(argv, f"_lock.json .*{message}.*remove it", capsys, str(root))
    # a pid no process can have is a driver that is gone: taken over
    from cad_ray.store import RunRoot

    (root / "_lock.json").write_text(json.dumps({"pid": 10 ** 30, "host": socket.gethostname()}))
    with RunRoot(str(root)).locked("attribution"):
        assert json.loads((root / "_lock.json").read_text())["pid"] == os.getpid()
    assert not (root / "_lock.json").exists()


def test_the_s3_lock_is_a_conditional_put(s3_endpoint):
    import pytest

    from cad_ray.errors import CadRayError
    from cad_ray.store import RunRoot
    from cad_ray.models.loading import s3_filesystem

    s3_filesystem().mkdir("lock-bucket")
    run = RunRoot("s3://lock-bucket/run")
    assert run.create_exclusively(b"{}", "x.json") and not run.create_exclusively(b"[]", "x.json")
    assert run.read_bytes("x.json") == b"{}"
    with run.locked("attribution"):
        holder = json.loads(run.read_bytes("_lock.json"))
        holder["pid"] = 1  # as a live driver of this host: the next taker refuses
        run.fs.pipe_file(run.join("_lock.json"), json.dumps(holder).encode())
        with pytest.raises(CadRayError, match="another cad-ray attribution"):
            with RunRoot("s3://lock-bucket/run").locked("validation"):
                pass


def test_overlap_beyond_the_positive_scores_counts_only_positive_ones(small_run, capsys):
    store = ScoreStore(small_run)
    red = store.scores("red")
    positive = {frozenset(zip(f["tensor"], f["index"])) for f in [red[red["score"] > 0]]}.pop()
    status, out, _ = _run(["overlap", "--root", small_run, "--a", "red", "--b", "red", "--method-b", "cad",
                           "--k", str(len(red))], capsys)
    assert status == 0 and f"{len(positive)} shared, Jaccard 1.000" in out and "only components" in out, out
    seven = store.scores("seven")
    both = positive & set(zip(seven[seven["score"] > 0]["tensor"], seven[seven["score"] > 0]["index"]))
    result = store.overlap("red", "seven", len(red))
    assert result["shared"] == len(both) < len(red)


def test_edit_without_a_selection_uses_the_roots_own(small_run, tmp_path, capsys):
    """Issue 26: `cad-ray edit` without --selection zeroed all/global/none (noise); it takes the root's
    evaluation.selection, as the configs say ("used where no search runs (cad-ray edit, ...)")."""
    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    manifest = json.loads((root / "_manifest.json").read_text())
    manifest["stage_options"]["evaluation"]["selection"] = "ff/row/none"
    (root / "_manifest.json").write_text(json.dumps(manifest))
    edit = ["edit", "--root", str(root), "--edit", "cad-erase", "--target", "seven", "--ratio", "0.1"]
    status, default, err = _run([*edit, "--out", str(tmp_path / "a")], capsys)
    assert status == 0, err
    status, explicit, err = _run([*edit, "--selection", "ff/row/none", "--out", str(tmp_path / "b")], capsys)
    assert status == 0, err
    assert "(ff/row/none)" in default and default.split(";")[0].split(":")[1] == explicit.split(";")[0].split(":")[1]


def _nothing_new(folder: Path, before: set) -> None:
    assert {str(p.relative_to(folder)) for p in folder.rglob("*")} == before


def test_a_malformed_s3_endpoint_is_one_line_in_every_command(small_run, tmp_path, capsys, monkeypatch):
    """Issue 26: AWS_ENDPOINT_URL=garbage (or http://, or http://[::1) ended every reader of an s3:// root in
    aiobotocore's ValueError; it is one line naming the root, the error and the variable, before any request."""
    from cad_ray.errors import CadRayError
    from cad_ray.store import RunRoot

    monkeypatch.chdir(tmp_path)
    config = config_file(tmp_path, "small")
    before = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    root = ["--root", "s3://bucket/run"]
    commands = [["top", *root, "--concept", "seven"], ["status", *root], ["layers", *root, "--concept", "seven"],
                ["overlap", *root, "--a", "seven", "--b", "red"], ["validate", *root, "--local", "--quiet"],
                ["evaluate", *root, "--local", "--quiet"], ["report", *root],
                ["edit", *root, "--edit", "cad-erase", "--target", "seven", "--ratio", "0.1", "--out", "edited"],
                ["attribute", "--config", config, *root, "--local", "--quiet"]]
    for endpoint, error in (("garbage", "Invalid endpoint: garbage"), ("http://", "Invalid endpoint: http://"),
                            ("http://[::1", r"Invalid IPv6 URL")):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        for argv in commands:
            err = _one_line_refusal(argv, f"cannot read s3://bucket/run: ValueError: {error}", capsys)
            assert f"AWS_ENDPOINT_URL={endpoint!r}" in err, err
    _nothing_new(tmp_path, before)
    # an access error while reading a root's manifest (local or S3) is one line too, never a traceback
    run = RunRoot(small_run)

    def denied(*args, **kwargs):
        raise PermissionError("Access Denied")

    monkeypatch.setattr(run.fs, "cat_file", denied)
    import pytest

    with pytest.raises(CadRayError, match=r"cannot read .*_manifest.json: PermissionError: Access Denied"):
        run.read_manifest()


def test_a_root_that_looks_like_a_url_is_refused_and_no_local_folder_is_made(small_run, tmp_path, capsys,
                                                                             monkeypatch):
    """Issue 26: S3://, s3:/, s3:bucket, s3a://, gs://, http:// roots used to become local folders ('./S3:/...')."""
    monkeypatch.chdir(tmp_path)
    config = config_file(tmp_path, "small")
    before = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    supported = r"only local paths and s3://bucket/path are supported"
    for root, hint in (("S3://bucket/run", "did you mean s3://bucket/run"),
                       ("s3:/bucket/run", "did you mean s3://bucket/run"),
                       ("s3:bucket/run", "did you mean s3://bucket/run"),
                       ("s3a://bucket/run", "did you mean s3://bucket/run"), ("gs://bucket/run", ""),
                       ("http://x/run", ""), ("a:b", r"written \./a:b")):
        for argv in (["attribute", "--config", config, "--root", root, "--local", "--quiet"],
                     ["top", "--root", root, "--concept", "seven"], ["status", "--root", root],
                     ["validate", "--root", root, "--config", config, "--local", "--quiet"]):
            err = _one_line_refusal(argv, f"'{re.escape(root)}' is not a root cad-ray can use: {supported}", capsys)
            assert hint in err or re.search(hint, err), err
    _nothing_new(tmp_path, before)
    # a local folder with a colon in its name, deeper in the path or written ./NAME, is a root as before
    shutil.copytree(small_run, tmp_path / "runs" / "a:b")
    shutil.copytree(small_run, tmp_path / "c:d")
    for root in ("runs/a:b", "./c:d"):
        status, out, err = _run(["top", "--root", root, "--concept", "seven", "--k", "2"], capsys)
        assert status == 0 and "transformer_blocks" in out, err


def test_a_manifest_field_of_the_wrong_type_is_a_corrupt_manifest(small_run, tmp_path, capsys):
    """Issue 26: 'config': [] (or null, or 5), 'stage_options': [] ... ended validate and edit in a TypeError,
    and top and report read such a manifest as whole; each is the corrupt-manifest line, and nothing changes."""
    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    good = json.loads((root / "_manifest.json").read_text())
    commands = [["validate", "--root", str(root), "--local", "--quiet"],
                ["evaluate", "--root", str(root), "--local", "--quiet"],
                ["edit", "--root", str(root), "--edit", "cad-erase", "--target", "seven", "--ratio", "0.1", "--out",
                 str(tmp_path / "edited")],
                ["top", "--root", str(root), "--concept", "seven"], ["report", "--root", str(root)],
                ["status", "--root", str(root)],
                ["attribute", "--config", config_file(tmp_path, "small"), "--root", str(root), "--local", "--quiet"]]
    for field, value, what in (("config", [], "a list, not a mapping"), ("config", None, "null, not a mapping"),
                               ("config", 5, "a number, not a mapping"),
                               ("stage_options", [], "a list, not a mapping"),
                               ("stage_options", None, "null, not a mapping"),
                               ("fingerprint", 5, "a number, not a string"),
                               ("config_hash", None, "null, not a string"),
                               ("complete", "yes", "a string, not true or false"),
                               ("objective_values", [], "a list, not a mapping")):
        (root / "_manifest.json").write_text(json.dumps({**good, field: value}))
        for argv in commands:
            _one_line_refusal(argv, rf"_manifest.json is corrupt: its '{field}' is {what}; was it edited by hand\?",
                              capsys, str(root))
    assert not (tmp_path / "edited").exists()


def test_a_model_cache_that_cannot_be_made_is_one_line_before_any_request(tmp_path, capsys, monkeypatch):
    """Issue 26: CAD_RAY_CACHE=/proc/cache or somefile/sub ended an s3:// model's download in FileNotFoundError or
    NotADirectoryError, after the bucket's listing; it is one line, before any request to S3."""
    import cad_ray.models.loading as loading

    def no_request(uri=None):
        raise AssertionError(f"a request to S3 ({uri}) before the cache was checked")

    for name in ("connected_s3_filesystem", "s3_filesystem"):
        monkeypatch.setattr(loading, name, no_request, raising=False)
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "x.png"
    for cache, reason in (("/proc/cad-ray-cache", "No such file or directory"),
                          (str(tmp_path / "a-file" / "sub"), "Not a directory")):
        monkeypatch.setenv("CAD_RAY_CACHE", cache)
        _one_line_refusal(["sample", "--prompt", "seven", "--n", "1", "--steps", "2", "--model",
                           "s3://modelbucket/models/digits", "--out", str(out)],
                          rf"CAD_RAY_CACHE={re.escape(cache)} cannot be written \({reason}\); point it at a writable "
                          "folder", capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and (tmp_path / "a-file").read_text() == "x"
