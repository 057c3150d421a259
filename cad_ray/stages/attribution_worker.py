"""The attribution stage's worker (cad_ray.stages.attribution plans, orders and finishes its units): it loads the
model once and computes shards and their reduce. Apart from the plan so that a command's driver never imports
torch: on workers kept across commands the driver's start is the command's fixed cost (docs/benchmarks.md)."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import torch

from cad_ray.config import AttributionConfig
from cad_ray.errors import CadRayError
from cad_ray.method.attribution import CAD, GradientSum
from cad_ray.method.baselines import ConceptPrune
from cad_ray.method.concepts import build_concept
from cad_ray.method.editing import edited
from cad_ray.method.objectives import make_objective, objective_phase
from cad_ray.method.scopes import never_selected
from cad_ray.stages.attribution import Shard, shard_is_valid
from cad_ray.stages.models import model_for
from cad_ray.store import (METADATA_KEY, PART_FILE, SCORE_SCHEMA, WEIGHT_SCHEMA, RunRoot, ScoreStore, aggregate_tables,
                           is_damage, partition, score_parts, table_metadata, weight_parts)

WEIGHT_ROW_GROUP_SIZE = 1 << 16  # 256 KB of float32 weights: a look-up of 100 rows reads at most 100 of them


def objective_for(config: AttributionConfig, name: str, points_per_sample: int | None = None):
    """The config's objective; `points_per_sample` (when given) overrides the config's."""
    options = getattr(config, name).model_dump()
    if points_per_sample is not None:
        options["points_per_sample"] = points_per_sample
    return make_objective(name, **options)


class AttributionWorker:
    """Loads the model once and computes shards; the same class runs in-process or as a Ray actor."""

    def __init__(self, config: AttributionConfig, root: str, device: str | None = None):
        self.config, self.run = config, RunRoot(root)
        start = time.time()
        self.model = model_for(config, device)
        self.load_seconds = time.time() - start
        self.concepts = {spec.name: build_concept(spec, self.model) for spec in config.concepts}
        self.estimators, self.first_edits = {}, {}

    def fingerprint(self) -> str:
        return self.model.fingerprint()

    def estimator(self, objective: str):
        """CAD under an objective, or a baseline's scoring (`conceptprune`): partial sums, then tables."""
        if objective not in self.estimators:
            if objective == "conceptprune":
                options = self.config.conceptprune
                self.estimators[objective] = ConceptPrune(self.model, options.timesteps, options.guidance,
                                                          options.steps, self.config.seed, self.config.batch)
            else:
                self.estimators[objective] = CAD(self.model, objective_for(self.config, objective),
                                                 self.config.scope, self.config.chunk_size, self.config.seed,
                                                 self.config.batch)
        return self.estimators[objective]

    def objective_phases(self) -> dict[str, int]:
        """When each of the run's objectives is attributed (their own declaration, `objective_phase`): asked of
        the worker, which imports the objectives, so that the driver does not."""
        return {objective: objective_phase(objective) for _, objective in self.config.pairs()}

    def tensor_layout(self) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
        """Each objective's partial-sum layout (checks the scope, and ConceptPrune's layers, before any work)."""
        self.estimator("erase")
        return {objective: self.estimator(objective).layout()
                for objective in dict.fromkeys(o for _, o in self.config.pairs())}

    def first_edit(self, concept: str, objective: str):
        """The model as the objective sees it: for `residual`, with its `after` edit of the concept zeroed (ranked
        by this run's tables of the other objectives, written before the residual's shards run); else as is."""
        if objective != "residual":
            return nullcontext()
        if concept not in self.first_edits:  # read once per concept: every shard and the reduce need it
            residual = self.estimator(objective).objective
            store = ScoreStore(self.run.uri, allow_incomplete=True)
            self.first_edits[concept] = store.masks(concept, residual.after, residual.after_ratio,
                                                    protected=never_selected(self.model))
        return edited(self.model, self.first_edits[concept])

    def partial_sums(self, shards: tuple[Shard, ...]) -> list[GradientSum]:
        """The partial gradient sums (float64, in memory) of a stack of shards (`concept_stacks`): several concepts'
        erase shards of the same samples computed together (`CAD.gradient_sums`), or one shard."""
        first = shards[0]
        with self.first_edit(first.concept, first.objective):
            estimator = self.estimator(first.objective)
            if len(shards) == 1:
                return [estimator.partial_sum(self.concepts[first.concept], list(first.samples))]
            return estimator.gradient_sums([(self.concepts[s.concept], list(s.samples)) for s in shards])

    def run_shards(self, unit: tuple) -> list[dict]:
        """Compute a stack of shards and write those at `indices` (the others are computed only so that every
        concept is stacked as in any run of this config): unit = (shards, indices)."""
        shards, indices = unit
        start = time.time()
        sums = self.partial_sums(shards)
        written = []
        for i in indices:
            shard, total = shards[i], sums[i]
            estimator = self.estimator(shard.objective)
            flat = np.concatenate([total.grads[n].numpy().reshape(-1) for n in estimator.tensor_names])
            meta = {"shard": asdict(shard), "samples": total.samples, "objective_sum": total.objective_sum,
                    "tensors": estimator.tensor_names, "fingerprint": self.fingerprint(),
                    "config_hash": self.config.config_hash()}
            self.run.write_table(pa.table({"grad_sum": flat}), *shard.path, metadata=meta,
                                 byte_stream_split=("grad_sum",))
            written.append({"shard": shard, "seconds": time.time() - start, "samples": total.samples})
        return written

    def finalize(self, concept: str, objective: str, shards: list[Shard], manifest: dict,
                 parts: list[GradientSum] | None = None) -> dict:
        """Reduce the shards of one (concept, objective) in shard order and write its three tables. `parts`: the
        shards' sums, computed by the caller and never written (`direct_pairs`); else read from the shard files."""
        estimator = self.estimator(objective)
        if parts is None:
            parts = [read_shard(self.run, s, estimator.layout(), manifest) for s in shards]
        if any(p is None for p in parts):
            raise CadRayError(f"shards of {concept}/{objective} are missing or damaged; re-run to recompute them")
        total = GradientSum.reduce(parts)
        with self.first_edit(concept, objective):  # the zeroed components score 0: they are gone already
            attribution = estimator.finish(self.concepts[concept], total)
        names, weights, grads = estimator.tensor_names, attribution.weights, attribution.grads
        meta = table_metadata(manifest, concept, objective, {"samples": total.samples,
                                                              "scope": estimator.scope,
                                                              "objective_value": attribution.objective_value})
        where = (partition(concept, objective), PART_FILE)
        # scores last: their presence marks the (concept, objective) as finished
        neurons, layers = aggregate_tables(names, weights, grads)
        self.run.write_table(neurons, "neurons", *where, metadata=meta)
        self.run.write_table(layers, "layers", *where, metadata=meta)
        self.run.write_parts(SCORE_SCHEMA, score_parts(names, weights, grads), "scores", *where, metadata=meta)
        return {"concept": concept, "objective": objective, "objective_value": attribution.objective_value,
                "components": sum(w.numel() for w in weights.values())}

    def finalize_pairs(self, unit: tuple) -> list[dict]:
        """`finalize` of the pairs at `indices`; unit = (pairs [(concept, objective, shards)], manifest, indices,
        direct). `direct`: every pair has one shard, and the stack of them is computed here, reduced from memory
        (the pairs not at `indices` only so that each concept is stacked as in any run of this config)."""
        pairs, manifest, indices, direct = unit
        sums = self.partial_sums(tuple(shards[0] for _, _, shards in pairs)) if direct else None
        return [self.finalize(*pairs[i], manifest, parts=[sums[i]] if direct else None) for i in indices]

    def write_weights(self, manifest: dict) -> None:
        """The run's weights table: the scoped weights once, for every concept's grad = score / weight."""
        write_weights(self.run, self.estimator("erase").parameters, manifest)


def write_weights(run: RunRoot, parameters, manifest: dict) -> None:
    names = [n for n, _ in parameters]
    weights = {n: p.detach().double().cpu() for n, p in parameters}
    meta = {"fingerprint": manifest["fingerprint"], "config_hash": manifest["config_hash"]}
    # small row groups: `ScoreStore.top` reads the weights of its k rows by row number, a row group each
    run.write_parts(WEIGHT_SCHEMA, weight_parts(names, weights), "weights", PART_FILE, metadata=meta,
                    row_group_size=WEIGHT_ROW_GROUP_SIZE)


def read_shard(run: RunRoot, shard: Shard, layout: list[tuple[str, tuple[int, ...]]],
               manifest: dict) -> GradientSum | None:
    """A finished shard's gradient sum, or None if the file is missing, truncated or from another run."""
    names = [n for n, _ in layout]
    sizes = [int(np.prod(shape)) for _, shape in layout]
    if not shard_is_valid(run, shard, names, sum(sizes), manifest):
        return None
    try:
        table = run.read_table(*shard.path)
    except Exception as e:
        if is_damage(e):
            return None
        raise CadRayError(f"cannot read {run.uri_under(*shard.path)}: {type(e).__name__}: {e}") from None
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    flat = table.column("grad_sum").to_numpy()
    grads, offset = {}, 0
    for (name, shape), size in zip(layout, sizes):
        grads[name] = torch.from_numpy(flat[offset:offset + size].reshape(shape).copy())
        offset += size
    return GradientSum(grads, int(meta["samples"]), float(meta["objective_sum"]))
