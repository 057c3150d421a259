"""The distributed attribution job: Ray actors that load the model once and compute shards.

Thin by design: planning, computing, reducing and writing live in cad_ray.run; this module only places
those calls on actors (one GPU each where the cluster has GPUs, one CPU each otherwise), bounds the work in
flight, retries on worker loss and shows progress.
"""

from __future__ import annotations

import time
from collections import defaultdict

from .config import AttributionConfig
from .errors import CadRayError
from .run import (AttributionWorker, RunRoot, mark_complete, open_run, pairs_to_finalize, plan_shards,
                  shard_status)

IN_FLIGHT_PER_WORKER = 2
CPU_WORKER_THREADS = 1  # float results depend on torch's thread count; all CPU workers use the same


class WorkerHost:
    """What a Ray actor holds: an AttributionWorker, built on the first call so that its errors (a missing
    model, an unknown prompt word) come back as the task's exception instead of a dead actor."""

    def __init__(self, config: AttributionConfig, root: str, threads: int | None = None):
        self.config, self.root, self.threads, self.worker = config, root, threads, None

    def call(self, method: str, *args):
        import torch

        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            if self.worker is None:
                self.worker = AttributionWorker(self.config, self.root)
            return getattr(self.worker, method)(*args)
        finally:
            torch.set_num_threads(previous)


def _unwrap(error: Exception) -> Exception:
    """The user-facing error inside a Ray task error, if there is one."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, CadRayError) else error


class _LocalPool:
    """The same calls, in this process (for tests and for measuring Ray's overhead), with the thread count
    of a CPU Ray worker so that both give the same numbers."""

    def __init__(self, config, root):
        self.host = WorkerHost(config, root, threads=CPU_WORKER_THREADS)
        self.size = 1

    def first(self, method, *args):
        return self.host.call(method, *args)

    def map(self, calls):
        for key, method, args in calls:
            yield key, self.host.call(method, *args)


class _RayPool:
    def __init__(self, config: AttributionConfig, root: str, address: str | None):
        import ray

        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False, include_dashboard=False if address is None else None,
                     configure_logging=False)
        self.ray = ray
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        self.size = max(1, config.workers or (gpus if gpus else cpus))
        # one GPU per actor; on CPUs a share of the CPUs so that every requested actor can start
        request = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": min(1.0, cpus / self.size)}
        remote = ray.remote(max_restarts=4, max_task_retries=4, **request)(WorkerHost)
        self.actors = [remote.remote(config, root, None if gpus else CPU_WORKER_THREADS) for _ in range(self.size)]

    def first(self, method, *args):
        try:
            return self.ray.get(self.actors[0].call.remote(method, *args))
        except Exception as e:
            raise _unwrap(e) from None

    def map(self, calls):
        """Run calls on the actors with at most IN_FLIGHT_PER_WORKER each; yield (key, result) as they finish."""
        queue = list(calls)
        running = {}
        load = defaultdict(int)
        while queue or running:
            while queue and len(running) < IN_FLIGHT_PER_WORKER * len(self.actors):
                actor = min(range(len(self.actors)), key=lambda a: load[a])
                key, method, args = queue.pop(0)
                running[self.actors[actor].call.remote(method, *args)] = (key, actor)
                load[actor] += 1
            ready, _ = self.ray.wait(list(running), num_returns=1)
            key, actor = running.pop(ready[0])
            load[actor] -= 1
            try:
                yield key, self.ray.get(ready[0])
            except Exception as e:
                raise _unwrap(e) from None


def run_attribution(config: AttributionConfig, root: str, address: str | None = None, overwrite: bool = False,
                    local: bool = False, progress: bool = True) -> dict:
    """Compute (or resume) every shard, reduce and write the tables; returns the completed manifest."""
    from tqdm.auto import tqdm

    run = RunRoot(root)
    run.check_writable()
    pool = _LocalPool(config, root) if local else _RayPool(config, root, address)
    started = time.time()
    fingerprint = pool.first("fingerprint")  # the first call loads the model
    setup_seconds = time.time() - started
    manifest = open_run(config, root, fingerprint, overwrite)
    layout = pool.first("tensor_layout")
    shards = plan_shards(config)
    done, pending = shard_status(run, shards, manifest, layout)
    bar = tqdm(total=len(shards), initial=len(done), unit="shard", desc="attribution", disable=not progress)
    samples = 0
    for _, result in pool.map([(s, "run_shard", (s,)) for s in pending]):
        samples += result["samples"]
        bar.update(1)
        bar.set_postfix(samples_per_s=f"{samples / max(time.time() - started, 1e-9):.2f}")
    bar.close()
    by_pair = defaultdict(list)
    for shard in shards:
        by_pair[(shard.concept, shard.objective)].append(shard)
    todo = pairs_to_finalize(run, config)
    results = [r for _, r in pool.map([(p, "finalize", (*p, by_pair[p], manifest)) for p in todo])]
    manifest = mark_complete(run, manifest, results)
    manifest["run_seconds"] = time.time() - started
    manifest["setup_seconds"] = setup_seconds  # Ray start-up and model loading
    manifest["shards_computed"] = len(pending)
    manifest["shards_skipped"] = len(done)
    manifest["workers"] = pool.size
    return manifest
