"""What a Ray actor of `cad_ray.distributed` holds (no Ray here): a stage's worker built on its first call, or a
worker kept across commands that holds the latest stage worker of each class and the model they share."""

from __future__ import annotations

from cad_ray.config import AttributionConfig


class WorkerHost:
    """What a Ray actor holds: a stage's worker (`worker_class(config, root)`), built on the first call so that
    its errors (a missing model, an unknown prompt word) come back as the task's exception, not a dead actor.
    `worker_class` is the class or its path, "module:Class", imported here on the worker (the attribution
    stage's driver never imports its worker: it would import torch)."""

    def __init__(self, worker_class, config: AttributionConfig, root: str, threads: int | None = None):
        self.worker_class, self.config, self.root, self.threads, self.worker = worker_class, config, root, threads, None

    def call(self, method: str, *args):
        import torch

        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            if self.worker is None:
                self.worker = resolve_worker_class(self.worker_class)(self.config, self.root)
            return getattr(self.worker, method)(*args)
        finally:
            torch.set_num_threads(previous)


def resolve_worker_class(reference):
    """A worker class given as itself or as its path, "module:Class"."""
    if not isinstance(reference, str):
        return reference
    import importlib

    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


KEPT_NAMESPACE = "cad-ray"  # the Ray namespace of the workers kept across commands


class KeptHost:
    """A worker kept across commands (`--keep-workers` on a running cluster): a detached Ray actor that runs any
    stage's calls, holding the latest worker of each worker class and the run's model loaded once per model for
    all of them (`cad_ray.stages.models.keep_models`). The next command on the cluster, another concept or
    another stage, finds the process started, the libraries imported and the model loaded."""

    def __init__(self, threads: int | None):
        # the stages import torch: imported here, on the worker, so that the driver's start stays light
        from cad_ray.stages.models import keep_models

        self.threads, self.hosts, self.models = threads, {}, keep_models()

    def call(self, pool: str, worker_class, config: AttributionConfig, root: str, method: str, *args):
        """`method` of the worker of `pool` (one pool of one command: a stage worker is never carried from one
        command to the next, only the model it loads)."""
        held = self.hosts.get(worker_class)
        if held is None or held[0] != pool:
            held = self.hosts[worker_class] = (pool, WorkerHost(worker_class, config, root, self.threads))
        return held[1].call(method, *args)

    def release(self, pool: str) -> None:
        """Drop the workers of `pool` (its command closed it): what they hold beyond the model (judges, scores,
        fine-tuned weights) is freed for the next command."""
        import gc

        import torch

        self.hosts = {c: held for c, held in self.hosts.items() if held[0] != pool}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def models_loaded(self) -> int:
        return self.models.loads


def kept_tag(request: dict, threads: int | None) -> str:
    """The kept workers' name prefix: a kept worker runs the code it started with, so the name holds a digest of
    this installation's cad_ray sources (an edited or upgraded cad_ray starts workers of its own) and of the
    resources each asks for."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(repr((sorted(request.items()), threads)).encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return f"cad-ray-worker-{digest.hexdigest()[:12]}"
