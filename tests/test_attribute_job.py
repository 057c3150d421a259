"""The attribution stage end to end: tables, sharding invariance, resume, refusals, queries."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from cad_ray.config import load_config, parse_config
from cad_ray.distributed import run_attribution
from cad_ray.errors import CadRayError
from cad_ray.store import ScoreStore

from conftest import SMALL, small_config

def table(root, name="scores", concept="seven"):
    frame = pd.read_parquet(os.path.join(root, name), filters=[("concept", "==", concept)])
    frame = frame.astype({c: str for c in ("concept", "objective", "tensor") if c in frame})
    return frame.sort_values([c for c in ("objective", "tensor", "index", "row") if c in frame]).reset_index(drop=True)


def assert_same_scores(a, b, rel=1e-6):
    assert len(a) == len(b) and (a["tensor"].values == b["tensor"].values).all()
    diff = np.abs(a["score"].values.astype(np.float64) - b["score"].values)
    assert diff.max() <= rel * np.abs(b["score"].values).max()


def test_tables_are_readable_with_plain_pandas(small_run):
    scores = pd.read_parquet(small_run + "/scores", filters=[("concept", "==", "seven")])
    assert {"concept", "objective", "tensor", "index", "score"} == set(scores.columns)
    assert set(scores["objective"].astype(str)) == {"erase", "amplify"}
    assert scores["score"].dtype == np.float32 and scores["index"].dtype == np.int64
    weights = pd.read_parquet(small_run + "/weights")
    assert {"tensor", "index", "weight"} == set(weights.columns)
    assert len(weights) == len(scores[scores["objective"] == "erase"])
    layers = table(small_run, "layers")
    erase = scores[scores["objective"] == "erase"]
    assert layers[layers["objective"] == "erase"]["count"].sum() == len(erase)
    np.testing.assert_allclose(layers[layers["objective"] == "erase"]["sum"].sum(),
                               erase["score"].astype(np.float64).sum(), rtol=1e-4)
    neurons = table(small_run, "neurons")
    assert neurons.groupby(["objective", "tensor"])["count"].sum().equals(
        layers.set_index(["objective", "tensor"])["count"])


def test_tables_carry_fingerprint_and_config(small_run, digits_model):
    store = ScoreStore(small_run)
    meta = store.metadata("seven", "erase")
    assert meta["fingerprint"] == digits_model.fingerprint() == store.fingerprint
    assert meta["config_hash"] == small_config().config_hash() and meta["objective"] == "erase"
    manifest = json.loads(open(os.path.join(small_run, "_manifest.json")).read())
    assert manifest["complete"] is True and manifest["config"]["samples"] == 4


def test_query_api_top_layers_overlap(small_run):
    store = ScoreStore(small_run)
    top = store.top("seven", 10)
    scores = table(small_run)
    erase = scores[scores["objective"] == "erase"]
    np.testing.assert_array_equal(top["score"].values, np.sort(erase["score"].values)[::-1][:10])
    negative = store.top("seven", 10, negative=True, objective="amplify")
    assert (negative["score"].values <= 0).all() and negative["score"].is_monotonic_increasing
    same = store.overlap("seven", "seven", 50)
    assert same["shared"] == 50 and same["jaccard"] == 1.0
    assert 0 <= store.overlap("seven", "red", 50)["jaccard"] < 1
    with pytest.raises(CadRayError, match="no scores for concept 'eight'"):
        store.top("eight")


def test_shards_do_not_change_the_scores(small_run, tmp_path):
    one_shard = str(tmp_path / "one")
    run_attribution(small_config(block=4), one_shard, local=True, progress=False)
    for concept in ("seven", "red"):
        assert_same_scores(table(one_shard, concept=concept), table(small_run, concept=concept))


def test_ray_workers_give_the_same_table_as_in_process(small_run, tmp_path):
    ray = pytest.importorskip("ray")
    root = str(tmp_path / "ray")
    try:
        manifest = run_attribution(small_config(workers=3), root, progress=False)
    finally:
        ray.shutdown()
    assert manifest["workers"] == 3
    assert_same_scores(table(root), table(small_run))


def test_resume_skips_finished_shards_and_recomputes_damaged_ones(small_run, tmp_path):
    import shutil

    root = tmp_path / "resumed"
    shutil.copytree(small_run, root)

    def unfinish(pairs):
        for pair in pairs:
            for name in ("scores", "neurons", "layers"):
                shutil.rmtree(root / name / "concept=seven" / f"objective={pair}")
        manifest = json.loads((root / "_manifest.json").read_text())
        (root / "_manifest.json").write_text(json.dumps(dict(manifest, complete=False)))

    unfinish(["erase", "amplify"])  # the finished run kept no shards: these two pairs' are recomputed and kept
    result = run_attribution(small_config(keep_shards=True), str(root), local=True, progress=False)
    assert result["shards_computed"] == 4 and result["shard_folders_removed"] == 0
    unfinish(["erase", "amplify"])
    erase = sorted((root / "_shards" / "concept=seven" / "objective=erase").iterdir())
    amplify = sorted((root / "_shards" / "concept=seven" / "objective=amplify").iterdir())
    erase[0].unlink()
    amplify[1].write_bytes(amplify[1].read_bytes()[:200])  # a truncated part
    with pytest.raises(CadRayError, match="did not complete"):
        ScoreStore(str(root))
    result = run_attribution(small_config(), str(root), local=True, progress=False)
    assert result["shards_computed"] == 2 and result["shards_skipped"] == 3 * 2 - 2
    resumed, original = table(str(root)), table(small_run)
    assert len(resumed) == len(original)
    assert_same_scores(resumed, original, rel=0)
    assert not (root / "_shards").exists()  # reduced and whole: the shards have served their purpose


def test_shards_are_removed_and_a_damaged_table_is_repaired_by_recomputing_them(small_run, tmp_path):
    """A finished run keeps no partial sums; a final table damaged afterwards is repaired: its pair's shards are
    recomputed (and removed again) and the table is the one the run first wrote. A re-run of a whole root
    computes nothing."""
    import shutil

    assert not os.path.exists(os.path.join(small_run, "_shards"))
    root = tmp_path / "repaired"
    shutil.copytree(small_run, root)
    part = root / "scores" / "concept=red" / "objective=erase" / "part-0.parquet"
    data = part.read_bytes()
    part.write_bytes(data[:len(data) // 2] + bytes(64) + data[len(data) // 2 + 64:])  # garbled middle
    result = run_attribution(small_config(), str(root), local=True, progress=False)
    assert result["shards_computed"] == 2 and result["shard_folders_removed"] == 1
    assert_same_scores(table(str(root), concept="red"), table(small_run, concept="red"), rel=0)
    assert not (root / "_shards").exists()
    again = run_attribution(small_config(), str(root), local=True, progress=False)
    assert again["shards_computed"] == 0 and again["shards_skipped"] == 6 and again["complete"] is True


def test_a_run_stopped_between_reduces_keeps_only_the_unreduced_pairs_shards(small_run, tmp_path, monkeypatch):
    """Stopped after the first (concept, objective) is reduced: its shards are gone, the others' are kept, and the
    same command again reduces those without computing a shard and gives the uninterrupted run's tables."""
    from cad_ray.stages.attribution_worker import AttributionWorker

    reduce = AttributionWorker.finalize

    def reduce_only_seven_erase(self, concept, objective, shards, manifest, **options):
        if (concept, objective) != ("seven", "erase"):
            raise KeyboardInterrupt("stopped")
        return reduce(self, concept, objective, shards, manifest, **options)

    monkeypatch.setattr(AttributionWorker, "finalize", reduce_only_seven_erase)
    root = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        run_attribution(small_config(), str(root), local=True, progress=False)
    monkeypatch.undo()
    assert not (root / "_shards" / "concept=seven" / "objective=erase").exists()
    assert len(list((root / "_shards").rglob("shard-*.parquet"))) == 2 * 2
    result = run_attribution(small_config(), str(root), local=True, progress=False)
    assert result["shards_computed"] == 0 and result["shards_skipped"] == 6 and result["shard_folders_removed"] == 2
    for concept in ("seven", "red"):
        assert_same_scores(table(str(root), concept=concept), table(small_run, concept=concept), rel=0)
    assert not (root / "_shards").exists()


def test_a_root_with_another_config_is_refused_unless_overwrite(small_run, tmp_path):
    import shutil

    root = tmp_path / "other"
    shutil.copytree(small_run, root)
    before = (root / "_manifest.json").read_text()
    with pytest.raises(CadRayError, match="another config.*--overwrite"):
        run_attribution(small_config(seed=1), str(root), local=True, progress=False)
    assert (root / "_manifest.json").read_text() == before
    # the existing run is intact: the same top components as the run it was copied from
    assert ScoreStore(str(root)).top("seven", 3).equals(ScoreStore(small_run).top("seven", 3))
    changed = small_config(seed=1, concepts=[{"name": "red"}], samples=1)
    run_attribution(changed, str(root), local=True, progress=False, overwrite=True)
    assert list(ScoreStore(str(root)).concepts()["concept"]) == ["red"]


@pytest.mark.parametrize("change, message", [
    ({"concepts": [{"name": "purple"}]}, "concept 'purple' has no prompts"),
    ({"concepts": [{"name": "x", "prompts": ["a purple seven"]}]}, "does not know the word"),
    ({"scope": "*.nothing.weight"}, "matches no parameter"),
])
def test_bad_input_leaves_no_table_marked_complete(tmp_path, change, message):
    root = tmp_path / "bad"
    with pytest.raises(CadRayError, match=message):
        run_attribution(small_config(**change), str(root), local=True, progress=False)
    manifest = root / "_manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["complete"] is False


@pytest.mark.parametrize("data, message", [
    ({"concepts": []}, "concepts"), ({"concepts": [{"name": "x", "prompts": []}]}, "prompt list is empty"),
    ({**SMALL, "samples": 0}, "samples"), ({**SMALL, "colour": 1}, "colour"),
    ({**SMALL, "block": 3}, "multiple of batch"),
])
def test_invalid_configs_are_one_line_errors(data, message):
    with pytest.raises(CadRayError, match=message) as e:
        parse_config(data)
    assert "\n" not in str(e.value)


def test_unwritable_root_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CadRayError, match="cannot write to"):
        run_attribution(small_config(), str(blocker / "root"), local=True, progress=False)


def test_config_files_in_jobs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        config = load_config(path)
        assert config.concepts
    digits = load_config(Path(__file__).parents[1] / "jobs" / "configs" / "digits.yaml")
    names = {c.name for c in digits.concepts}
    assert {"zero", "nine", "red", "blue", "white", "green"} <= names
    assert all("amplify" in c.objectives for c in digits.concepts if c.name not in ("white", "red", "green", "blue"))


def test_cli_top_prints_the_table(small_run, capsys):
    from cad_ray.cli import main

    assert main(["top", "--root", small_run, "--concept", "seven", "--k", "4"]) == 0
    out = capsys.readouterr().out
    assert "top positive" in out and out.count("ff.net") == 4
    assert main(["top", "--root", small_run, "--concept", "eight"]) == 1
    assert "no scores for concept 'eight'" in capsys.readouterr().err


def test_s3_root_round_trip_and_pandas_query(s3_endpoint):
    from cad_ray.models.loading import s3_filesystem

    s3_filesystem().mkdir("cad-runs")
    root = "s3://cad-runs/small"
    run_attribution(small_config(samples=1, concepts=[{"name": "seven"}]), root, local=True, progress=False)
    scores = pd.read_parquet(root + "/scores", filters=[("concept", "==", "seven")],
                             storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    assert len(scores) > 0 and ScoreStore(root).top("seven", 3)["score"].is_monotonic_decreasing
    manifest = s3_filesystem().cat_file("cad-runs/small/_manifest.json").decode()
    assert "testing" not in manifest and "AWS" not in manifest  # no credentials or endpoint in the manifest


def test_nonexistent_bucket_is_refused_before_any_work(s3_endpoint):
    with pytest.raises(CadRayError, match="bucket 'no-such-bucket-here' does not exist"):
        run_attribution(small_config(), "s3://no-such-bucket-here/run", local=True, progress=False)


def test_stable_diffusion_pipeline_through_the_whole_stage(tiny_sd_folder, tmp_path):
    """Explicit prompts, the erase objective and the amplify objective on the model's own samples."""
    config = parse_config({"model": str(tiny_sd_folder), "samples": 2, "block": 2, "batch": 2, "scope": "attn2",
                           "erase": {"steps": 4}, "amplify": {"points_per_sample": 3, "steps": 4},
                           "concepts": [{"name": "parachute", "prompts": ["a photo of a parachute"],
                                         "objectives": ["erase", "amplify"]}]})
    root = str(tmp_path / "sd")
    run_attribution(config, root, local=True, progress=False)
    store = ScoreStore(root)
    scores = store.scores("parachute", "amplify")
    assert len(scores) > 0 and scores["tensor"].astype(str).str.contains("attn2").all()
    assert np.isfinite(scores["score"]).all() and (scores["score"] != 0).any()
    assert store.metadata("parachute")["config"]["scope"] == "attn2"


def test_derived_weight_and_grad_equal_what_the_estimator_computed(small_run, digits_model):
    """Weight and grad are no longer stored beside each score: ScoreStore derives them (weights table, score /
    weight) and they equal the estimator's own weight and mean gradient (what the tables stored before)."""
    from cad_ray.method.attribution import CAD
    from cad_ray.method.concepts import build_concept
    from cad_ray.stages.attribution_worker import objective_for

    config = small_config()
    estimator = CAD(digits_model, objective_for(config, "erase"), config.scope, config.chunk_size, config.seed,
                    config.batch)
    attribution = estimator.attribute(build_concept(config.concepts[0], digits_model), config.samples)
    store = ScoreStore(small_run)
    top = store.top("seven", 50)
    full = store.scores("seven")
    for row in top.itertuples():
        w = attribution.weights[row.tensor].reshape(-1)[row.index].item()
        g = attribution.grads[row.tensor].reshape(-1)[row.index].item()
        assert row.weight == pytest.approx(w, rel=1e-6) and row.grad == pytest.approx(g, rel=1e-4)
    assert {"tensor", "index", "weight", "grad", "score"} <= set(full.columns) and len(full) == len(
        pd.read_parquet(small_run + "/weights"))
