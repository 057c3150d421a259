"""The attribution stage without Ray: shards, the worker that computes them, and the run root's life cycle.

A shard is (concept, objective, block of sample indices). A worker computes a shard's partial gradient sum
and writes it to `_shards/`; once every shard of a (concept, objective) is there, `finalize` adds them in
shard order and writes the score tables. The Ray layer (cad_ray.distributed) only decides where these
calls run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from . import __version__
from .attribution import CAD, GradientSum
from .config import AttributionConfig
from .errors import CadRayError
from .store import METADATA_KEY, SCORE_SCHEMA, RunRoot, aggregate_tables, partition, score_parts, table_metadata

RESULT_TABLES = ("scores", "neurons", "layers")


@dataclass(frozen=True)
class Shard:
    concept: str
    objective: str
    index: int
    samples: tuple[int, ...]

    @property
    def path(self) -> tuple[str, str, str]:
        return ("_shards", partition(self.concept, self.objective), f"shard-{self.index:05d}.parquet")


def plan_shards(config: AttributionConfig) -> list[Shard]:
    """Every shard of the run, in the fixed order that the reduce follows."""
    shards = []
    for spec, objective in config.pairs():
        for i, start in enumerate(range(0, config.samples, config.block)):
            stop = min(start + config.block, config.samples)
            shards.append(Shard(spec.name, objective, i, tuple(range(start, stop))))
    return shards


def model_for(config: AttributionConfig, device: str | None = None):
    """The config's model on `device`, else on the config's device, else on a GPU where there is one."""
    import torch

    from .models import load_model

    return load_model(config.model, device=device or config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def objective_for(config: AttributionConfig, name: str, points_per_sample: int | None = None):
    """The config's objective; `points_per_sample` (when given) overrides the config's."""
    from .objectives import make_objective

    options = (config.erase if name == "erase" else config.amplify).model_dump()
    if points_per_sample is not None:
        options["points_per_sample"] = points_per_sample
    return make_objective(name, **options)


class AttributionWorker:
    """Loads the model once and computes shards; the same class runs in-process or as a Ray actor."""

    def __init__(self, config: AttributionConfig, root: str, device: str | None = None):
        from .concepts import build_concept

        self.config, self.run = config, RunRoot(root)
        start = time.time()
        self.model = model_for(config, device)
        self.load_seconds = time.time() - start
        self.concepts = {spec.name: build_concept(spec, self.model) for spec in config.concepts}
        self.estimators = {}

    def fingerprint(self) -> str:
        return self.model.fingerprint()

    def estimator(self, objective: str) -> CAD:
        if objective not in self.estimators:
            self.estimators[objective] = CAD(self.model, objective_for(self.config, objective), self.config.scope,
                                             self.config.chunk_size, self.config.seed, self.config.batch)
        return self.estimators[objective]

    def tensor_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(p.shape)) for n, p in self.estimator("erase").parameters]

    def run_shard(self, shard: Shard) -> dict:
        start = time.time()
        estimator = self.estimator(shard.objective)
        total = estimator.gradient_sum(self.concepts[shard.concept], list(shard.samples))
        flat = np.concatenate([total.grads[n].numpy().reshape(-1) for n in estimator.tensor_names])
        meta = {"shard": asdict(shard), "samples": total.samples, "objective_sum": total.objective_sum,
                "tensors": estimator.tensor_names, "fingerprint": self.fingerprint(),
                "config_hash": self.config.config_hash()}
        self.run.write_table(pa.table({"grad_sum": flat}), *shard.path, metadata=meta)
        return {"shard": shard, "seconds": time.time() - start, "samples": total.samples}

    def finalize(self, concept: str, objective: str, shards: list[Shard], manifest: dict) -> dict:
        """Reduce the shards of one (concept, objective) in shard order and write its three tables."""
        estimator = self.estimator(objective)
        layout = [(n, tuple(p.shape)) for n, p in estimator.parameters]
        parts = [read_shard(self.run, s, layout, manifest) for s in shards]
        if any(p is None for p in parts):
            raise CadRayError(f"shards of {concept}/{objective} are missing or damaged; re-run to recompute them")
        total = GradientSum.reduce(parts)
        attribution = estimator.finish(self.concepts[concept], total)
        names, weights, grads = estimator.tensor_names, attribution.weights, attribution.grads
        meta = table_metadata(manifest, concept, objective, {"samples": total.samples, "scope": self.config.scope,
                                                              "objective_value": attribution.objective_value})
        where = (partition(concept, objective), "part-0.parquet")
        # scores last: their presence marks the (concept, objective) as finished
        neurons, layers = aggregate_tables(names, weights, grads)
        self.run.write_table(neurons, "neurons", *where, metadata=meta)
        self.run.write_table(layers, "layers", *where, metadata=meta)
        self.run.write_parts(SCORE_SCHEMA, score_parts(names, weights, grads), "scores", *where, metadata=meta)
        return {"concept": concept, "objective": objective, "objective_value": attribution.objective_value,
                "components": sum(w.numel() for w in weights.values())}


def _shard_footer(run: RunRoot, shard: Shard) -> tuple[dict, int] | None:
    """(metadata, rows) from a shard file's footer; None if the file is missing or truncated."""
    import pyarrow.parquet as pq

    try:
        with run.fs.open(run.join(*shard.path), "rb") as f:
            footer = pq.read_metadata(f)
        return json.loads(footer.metadata[METADATA_KEY]), footer.num_rows
    except Exception:
        return None


def shard_is_valid(run: RunRoot, shard: Shard, names: list[str], total_size: int, manifest: dict) -> bool:
    """A shard counts as done only if its file is whole and belongs to this run, model and layout."""
    footer = _shard_footer(run, shard)
    if footer is None:
        return False
    meta, rows = footer
    return (meta.get("config_hash") == manifest["config_hash"] and meta.get("fingerprint") == manifest["fingerprint"]
            and meta.get("tensors") == names and rows == total_size
            and tuple(meta["shard"]["samples"]) == shard.samples)


def read_shard(run: RunRoot, shard: Shard, layout: list[tuple[str, tuple[int, ...]]],
               manifest: dict) -> GradientSum | None:
    """A finished shard's gradient sum, or None if the file is missing, truncated or from another run."""
    import torch

    names = [n for n, _ in layout]
    sizes = [int(np.prod(shape)) for _, shape in layout]
    if not shard_is_valid(run, shard, names, sum(sizes), manifest):
        return None
    try:
        table = run.read_table(*shard.path)
    except Exception:
        return None
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    flat = table.column("grad_sum").to_numpy()
    grads, offset = {}, 0
    for (name, shape), size in zip(layout, sizes):
        grads[name] = torch.from_numpy(flat[offset:offset + size].reshape(shape).copy())
        offset += size
    return GradientSum(grads, int(meta["samples"]), float(meta["objective_sum"]))


def open_run(config: AttributionConfig, root: str, fingerprint: str, overwrite: bool = False) -> dict:
    """Check the root and return its manifest, creating it for a new run.

    A root written with another config or model is refused unless `overwrite`, which first removes that
    run's tables.
    """
    run = RunRoot(root)  # the caller has checked that it is writable, before any work
    manifest = run.read_manifest()
    if manifest is not None and (manifest.get("config_hash") != config.config_hash()
                                 or manifest.get("fingerprint") != fingerprint):
        if not overwrite:
            what = "config" if manifest.get("config_hash") != config.config_hash() else "model"
            raise CadRayError(f"{root} holds a run made with another {what}; use another --root, or --overwrite "
                              "to replace it")
        for name in ("_shards", *RESULT_TABLES, "_manifest.json"):
            run.remove(name)
        manifest = None
    if manifest is None:
        manifest = {"config": config.result_fields(), "config_hash": config.config_hash(),
                    "fingerprint": fingerprint, "model": config.model or "builtin:digits",
                    "code_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "complete": False}
        run.write_manifest(manifest)
    return manifest


def shard_status(run: RunRoot, shards: list[Shard], manifest: dict,
                 layout: list[tuple[str, tuple[int, ...]]]) -> tuple[list[Shard], list[Shard]]:
    """(done, pending) shards; damaged or foreign shard files count as pending and are recomputed."""
    names = [n for n, _ in layout]
    total = sum(int(np.prod(shape)) for _, shape in layout)
    done, pending = [], []
    for shard in shards:
        (done if shard_is_valid(run, shard, names, total, manifest) else pending).append(shard)
    return done, pending


def pairs_to_finalize(run: RunRoot, config: AttributionConfig) -> list[tuple[str, str]]:
    return [(spec.name, objective) for spec, objective in config.pairs()
            if not all(run.exists(t, partition(spec.name, objective), "part-0.parquet") for t in RESULT_TABLES)]


def mark_complete(run: RunRoot, manifest: dict, results: list[dict]) -> dict:
    manifest = dict(manifest, complete=True,
                    completed=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    manifest.setdefault("objective_values", {})
    for r in results:
        manifest["objective_values"][f"{r['concept']}/{r['objective']}"] = r["objective_value"]
    run.write_manifest(manifest)
    return manifest
