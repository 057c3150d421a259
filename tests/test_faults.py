"""Runs that survive: a killed driver resumes without losing or duplicating work."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cad_ray.config import parse_config
from cad_ray.distributed import run_attribution, run_evaluation, run_validation

CONFIG = {"samples": 8, "block": 2, "batch": 2, "erase": {"steps": 10},
          "concepts": [{"name": "seven"}, {"name": "two"}, {"name": "red"}]}
VALIDATION = {"fractions": [0.01, 0.05], "ablations": 6, "block": 1, "eval_samples": 1, "eval_points_per_sample": 3,
              "projections": 4, "sketch_points_per_sample": 3, "concepts": ["seven", "two"]}
EVALUATION = {"targets": ["seven"], "edits": ["cad-erase", "random"], "ratios": [0.05], "images_per_prompt": 1,
              "steps": 10, "batch_size": 4, "prompt_panel": "canonical"}
# every stage of one run: what the killed drivers and the lost nodes must reproduce
EVERY_STAGE = {**CONFIG, "validation": VALIDATION, "evaluation": EVALUATION}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted, in-process run of EVERY_STAGE that the tests here compare against, computed once:
    `attributed` (the attribution alone) and `root` (with the validation and evaluation tables too). Read-only:
    copy a folder before writing into it."""
    from types import SimpleNamespace

    config, base = parse_config(EVERY_STAGE), tmp_path_factory.mktemp("reference")
    root, attributed = base / "run", base / "attributed"
    run_attribution(config, str(root), local=True, progress=False)
    shutil.copytree(root, attributed)
    run_validation(config, str(root), local=True, progress=False)
    run_evaluation(config, str(root), local=True, progress=False)
    return SimpleNamespace(root=root, attributed=attributed)


def test_killed_driver_resumes_skips_finished_shards_and_gives_the_same_table(reference, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(CONFIG))
    root = tmp_path / "run"
    cli = [os.path.join(os.path.dirname(sys.executable), "cad-ray"), "attribute", "--config", str(config_file),
           "--root", str(root), "--local", "--quiet", "--show", "0"]
    driver = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = root / "_shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.rglob("shard-*.parquet"))) < 3:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = len(list(shards.rglob("shard-*.parquet")))
    assert 3 <= finished < 12, finished
    assert json.loads((root / "_manifest.json").read_text())["complete"] is False
    status = subprocess.run([cli[0], "status", "--root", str(root)], capture_output=True, text=True)
    assert status.returncode == 0 and f"{finished} of 12" in status.stdout and "unfinished: attribution" in status.stdout

    resumed = run_attribution(parse_config(CONFIG), str(root), local=True, progress=False)
    assert resumed["shards_skipped"] >= 3 and resumed["shards_computed"] == 12 - resumed["shards_skipped"]
    assert not shards.exists()  # every pair reduced and whole: its partial sums removed
    for concept in ("seven", "two", "red"):
        a, b = (pd.read_parquet(Path(r) / "scores", filters=[("concept", "==", concept)])
                for r in (root, reference.attributed))
        assert len(a) == len(b) and not a.duplicated(["tensor", "index", "objective"]).any()
        np.testing.assert_array_equal(a["score"].values, b["score"].values)


@pytest.mark.parametrize("stage,written,table", [("validate", "actual-*.parquet", "validation"),
                                                 ("evaluate", "block-*.parquet", "evaluation")])
def test_killed_driver_in_a_later_stage_resumes_and_gives_the_same_table(reference, tmp_path, stage, written, table):
    """The same for validation and evaluation: SIGKILL mid-stage, the same command again keeps the finished
    files and gives the uninterrupted run's table, with no duplicate rows."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(EVERY_STAGE))
    root = tmp_path / "run"
    shutil.copytree(reference.attributed, root)
    cli = [os.path.join(os.path.dirname(sys.executable), "cad-ray"), stage, "--config", str(config_file), "--local",
           "--quiet"]
    driver = subprocess.Popen(cli + ["--root", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(root.rglob(written))) < 2 and driver.poll() is None:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = {p: p.stat().st_mtime_ns for p in root.rglob(written)}
    assert len(finished) >= 2 and not (root / table).exists(), "the driver finished before it could be killed"

    assert subprocess.run(cli + ["--root", str(root)], capture_output=True).returncode == 0
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # kept, not computed again
    assert len(list(root.rglob(written))) > len(finished)
    a, b = (pd.read_parquet(r / table) for r in (root, reference.root))
    key = [c for c in ("concept", "fraction", "ablation", "estimator", "edit", "prompt", "seed") if c in a]
    assert len(a) == len(b) > 0 and not a.duplicated(key).any()
    pd.testing.assert_frame_equal(a, b)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_ray_in(temp_dir: str) -> None:
    """Kill the processes of the Ray instance that lives in `temp_dir` only (`ray stop` would kill every Ray
    instance on the machine, this test process's own included)."""
    import psutil

    mine = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in process.info["cmdline"] or []):
            mine.append(process)
    for process in mine:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=30)


def test_ray_job_submit_runs_the_attribution_job(tmp_path):
    """A local Ray head (dashboard on 127.0.0.1, token authentication on) runs jobs/attribute.py as submitted."""
    import secrets

    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"samples": 2, "block": 2, "batch": 2, "erase": {"steps": 5},
                                      "concepts": [{"name": "seven"}]}))
    dashboard = _free_port()
    import tempfile

    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    start = [os.path.join(bin_dir, "ray"), "start", "--head", f"--port={_free_port()}", "--num-cpus=2",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--temp-dir={ray_dir}", f"--dashboard-agent-listen-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]
    # own ports throughout, so that another Ray instance on the machine (a user's, a parallel test) is no obstacle
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        root = tmp_path / "root"
        for _ in range(30):  # the head's job agent may take a while to come up on a busy machine
            submit = subprocess.run(
                [os.path.join(bin_dir, "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                 "--working-dir", str(Path(__file__).resolve().parents[1]), "--", sys.executable,
                 "jobs/attribute.py", "--config", str(config), "--root", str(root), "--address", "auto", "--quiet"],
                env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
        assert "succeeded" in submit.stdout + submit.stderr
    finally:
        _stop_ray_in(ray_dir)
        import shutil

        shutil.rmtree(ray_dir, ignore_errors=True)
    scores = pd.read_parquet(root / "scores", filters=[("concept", "==", "seven")])
    assert len(scores) > 0 and json.loads((root / "_manifest.json").read_text())["complete"] is True


def test_losing_a_gpu_node_in_each_stage_still_gives_the_failure_free_tables(reference, tmp_path):
    """Three worker nodes advertising a GPU each (so actors take the num_gpus=1 path). Attribution loses one node
    (not gracefully) while shards are in flight, validation on the two left loses another, a fresh node joins and
    evaluation on the two loses one more. Each stage completes and its table equals an in-process run's."""
    import ray
    from ray.cluster_utils import Cluster

    config = parse_config(EVERY_STAGE)
    ray.shutdown()  # a Ray instance left by an earlier test in this process
    # Ray's health check every second, not every 3 s: a lost node is declared dead after 5 failed checks, in ~5 s
    # instead of ~15 s (the stages wait for that in each loss; a live node still has 5 checks of 10 s to answer)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "_system_config": {"health_check_period_ms": 1000}})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    root = tmp_path / "run"
    try:
        manifest = _lose_a_node_during(cluster, nodes[0], lambda: run_attribution(config, str(root), progress=False),
                                       root, "shard-*.parquet")
        _lose_a_node_during(cluster, nodes[1], lambda: run_validation(config, str(root), progress=False),
                            root, "actual-*.parquet")
        cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        _lose_a_node_during(cluster, nodes[2], lambda: run_evaluation(config, str(root), progress=False),
                            root, "block-*.parquet")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert manifest["complete"] is True and manifest["workers_lost"] >= 1
    for concept in ("seven", "two", "red"):
        a, b = (pd.read_parquet(Path(r) / "scores", filters=[("concept", "==", concept)])
                for r in (root, reference.root))
        assert len(a) == len(b)
        scale = np.abs(b["score"].values).max()
        assert np.abs(a["score"].values.astype(np.float64) - b["score"].values).max() <= 1e-6 * scale
    key = ["concept", "fraction", "ablation", "estimator"]
    a, b = (pd.read_parquet(Path(r) / "validation").astype({"concept": str}).sort_values(key)
            for r in (root, reference.root))
    assert len(a) == len(b) == 2 * 2 * 6 * 3  # concepts validated, fractions, ablations, estimators
    for column in ("actual", "actual_ablated_base", "predicted"):
        np.testing.assert_allclose(a[column].to_numpy(), b[column].to_numpy(), rtol=1e-6, atol=1e-12)
    a, b = (pd.read_parquet(Path(r) / "evaluation") for r in (root, reference.root))
    assert len(a) == len(b) > 0
    pd.testing.assert_frame_equal(a.drop(columns=["image_png"]), b.drop(columns=["image_png"]))


def test_work_goes_only_to_actors_ray_can_place(reference, tmp_path):
    """Two GPU actors asked for where Ray has one GPU (as when a stage starts while Ray still counts a lost node's
    GPU): the actor that cannot be placed must hold no work, so the run completes on the one that can."""
    import ray

    config = parse_config({**CONFIG, "workers": 2, "concepts": [{"name": "seven"}]})
    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        driver, outcome = _in_thread(lambda: run_attribution(config, str(tmp_path / "run"), progress=False))
        driver.join(timeout=300)
    finally:
        ray.shutdown()
    assert not driver.is_alive(), "the run waited for an actor Ray cannot place"
    assert outcome["result"]["complete"] is True
    a = pd.read_parquet(tmp_path / "run" / "scores")
    b = pd.read_parquet(reference.attributed / "scores", filters=[("concept", "==", "seven")])
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-6, atol=1e-12)


def test_a_run_waits_for_resources_says_so_and_goes_on_when_they_come(tmp_path, capsys, monkeypatch):
    """Ray's only GPU is held by someone else (as on a cluster whose GPU nodes the autoscaler is still adding):
    the run says that it waits and for what, and completes once the GPU is free."""
    import ray

    from cad_ray import distributed

    monkeypatch.setattr(distributed._RayPool, "WAIT_NOTICE_SECONDS", 1)
    config = parse_config({**CONFIG, "concepts": [{"name": "seven"}]})
    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    holder = ray.remote(num_gpus=1)(lambda: time.sleep(3600)).remote()
    try:
        driver, outcome = _in_thread(lambda: run_attribution(config, str(tmp_path / "run"), progress=False))
        said, deadline = "", time.time() + 60
        while time.time() < deadline and "waiting for Ray to place" not in said:
            time.sleep(0.5)
            said += capsys.readouterr().err
        assert not outcome, "the run did not wait for the GPU"
        ray.cancel(holder, force=True)
        driver.join(timeout=300)
    finally:
        ray.shutdown()
    assert "waiting for Ray to place 1 worker(s) asking for {'num_gpus': 1, 'num_cpus': 1}" in said, said
    assert not driver.is_alive() and outcome["result"]["complete"] is True


def _in_thread(work):
    """Start `work` in a daemon thread (a hung run cannot keep the test process alive); returns the thread and a
    dict that gets its "result" or "error"."""
    import threading

    outcome = {}

    def job():
        try:
            outcome["result"] = work()
        except BaseException as e:  # reported by the caller's assertions
            outcome["error"] = e

    driver = threading.Thread(target=job, daemon=True)
    driver.start()
    return driver, outcome


def _lose_a_node_during(cluster, node, work, root: Path, written: str):
    """Run `work` in a thread, remove `node` (not gracefully) once two `written` files exist, return its result."""
    started = time.time()
    driver, outcome = _in_thread(work)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(root.rglob(written))) < 2:
        time.sleep(0.05)
    cluster.remove_node(node, allow_graceful=False)
    driver.join(timeout=600)
    print(f"run with a lost node: {time.time() - started:.1f} s")
    assert "error" not in outcome and "result" in outcome, outcome.get("error", "the run did not finish")
    return outcome["result"]


def test_a_file_left_half_written_by_a_crash_is_invisible_to_readers(tmp_path):
    from cad_ray.store import RunRoot, hidden_temporary

    run = RunRoot(str(tmp_path))
    table = pd.DataFrame({"x": [1, 2, 3]})
    import pyarrow as pa

    run.write_table(pa.Table.from_pandas(table), "t", "concept=a", "part-0.parquet")
    target = str(tmp_path / "t" / "concept=a" / "part-0.parquet")
    Path(hidden_temporary(target)).write_bytes(b"PAR1 truncated")  # what a crash mid-write leaves
    assert pd.read_parquet(tmp_path / "t")["x"].tolist() == [1, 2, 3]
