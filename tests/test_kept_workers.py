"""`--keep-workers` (issue 28, start-up paid once): the workers stay on the running cluster with the model loaded,
and the next command, for another concept, runs on them without starting a process or loading the model, with
the same tables as a run of its own."""

import subprocess
import sys

import pandas as pd
import pytest
import ray
from conftest import small_config

from cad_ray.cli import main
from cad_ray.distributed import KEPT_NAMESPACE, run_attribution, stop_kept_workers


def kept_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == KEPT_NAMESPACE)


@pytest.fixture
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        stop_kept_workers("local")
        ray.shutdown()


def test_the_next_concept_runs_on_the_kept_worker_and_its_loaded_model(cluster, tmp_path):
    first = small_config(workers=1, concepts=[{"name": "seven"}])
    second = small_config(workers=1, concepts=[{"name": "three"}])
    run_attribution(first, str(tmp_path / "seven"), keep_workers=True, progress=False)
    names = kept_actors()
    assert len(names) == 1
    run_attribution(second, str(tmp_path / "three"), keep_workers=True, progress=False)
    assert kept_actors() == names  # no new worker started
    worker = ray.get_actor(names[0], namespace=KEPT_NAMESPACE)
    assert ray.get(worker.models_loaded.remote()) == 1  # one model load for both commands
    # the same scores as a run on its own (the kept worker's model is left as it was found)
    run_attribution(second, str(tmp_path / "alone"), local=True, progress=False)
    kept, alone = (pd.read_parquet(tmp_path / r / "scores").sort_values(["tensor", "index"], ignore_index=True)
                   for r in ("three", "alone"))
    pd.testing.assert_frame_equal(kept, alone)
    assert stop_kept_workers("local") == 1 and kept_actors() == []


def test_a_kept_model_is_loaded_again_when_its_files_change(tmp_path):
    """The kept model is the model of the files it was loaded from: a folder rewritten in place is loaded anew."""
    import os
    import shutil

    from cad_ray.models.loading import BUILTIN_DIGITS
    from cad_ray.stages.models import KeptModels

    folder = tmp_path / "model"
    shutil.copytree(BUILTIN_DIGITS, folder)
    kept = KeptModels()
    first = kept.get(str(folder), "cpu")
    assert kept.get(str(folder), "cpu") is first and kept.loads == 1
    weights = next(folder.rglob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert kept.get(str(folder), "cpu") is not first and kept.loads == 2
    assert len(kept.models) == 1  # the latest model of a device only


def test_keeping_workers_needs_a_running_cluster(tmp_path, capsys, monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("a Ray instance was started")

    monkeypatch.setattr(ray, "init", refused)
    config = tmp_path / "one.yaml"
    config.write_text("concepts: [{name: seven}]\nsamples: 2\nblock: 1\nbatch: 1\nerase: {steps: 4}\n")
    for command in ("attribute", "run"):  # `run` hands the flag to each stage
        assert main([command, "--config", str(config), "--root", str(tmp_path / "r"), "--keep-workers",
                     "--quiet"]) != 0
        assert "--address auto" in capsys.readouterr().err
        assert not (tmp_path / "r").exists()


def test_the_attribution_driver_never_imports_torch(tmp_path):
    # on kept workers the driver's start is a command's fixed cost, and torch is a second of it (docs/benchmarks.md)
    config = tmp_path / "one.yaml"
    config.write_text("concepts: [{name: seven}]\nsamples: 2\nblock: 2\nbatch: 2\n")
    probe = ("import sys\nfrom cad_ray.config import load_config\n"
             f"load_config({str(config)!r}, {{'workers': None, 'device': None}})\n"
             "import cad_ray.cli, cad_ray.commands.attribution, cad_ray.distributed, cad_ray.stages.attribution\n"
             "from cad_ray.stages.attribution import WORKER\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
