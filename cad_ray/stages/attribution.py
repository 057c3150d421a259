"""The attribution stage (no Ray): its units, the worker that computes one, and how its tables are finished.

- units: shards, (concept, objective, block of sample indices), keyed by the config hash and the model's
  fingerprint (`plan_shards`, `shard_status`);
- one unit: `AttributionWorker.run_shard` writes the shard's partial gradient sum to `_shards/`;
- finish: `AttributionWorker.finalize` adds a (concept, objective)'s shards in shard order and writes
  scores/, neurons/ and layers/; once those are read back whole the driver removes the pair's shards
  (`release_shards`; `keep_shards: true` keeps them), and `mark_complete` marks the manifest.
- a pair of one shard (block >= samples) whose shard is not on disk skips the shard file: the worker that
  finalizes it computes the shard and reduces it from memory (`direct_pairs`), which writes half the bytes at SD
  size (a float64 shard is larger than the pair's float32 tables). A run killed before its tables are whole
  recomputes that one shard; the tables are the same (a reduce of one part is that part, in either path).

A shard serves only its pair's reduce: a pair whose tables are whole needs none (a re-run skips them, present
or not), and a pair whose tables are missing or damaged gets its shards recomputed where they are gone, so
resume stays exact with or without them.

`run` puts these in order on an executor (cad_ray.distributed: Ray actors or this process).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from cad_ray import __version__
from cad_ray.method.attribution import CAD, GradientSum
from cad_ray.method.baselines import ConceptPrune
from cad_ray.method.concepts import build_concept
from cad_ray.method.editing import edited
from cad_ray.method.objectives import make_objective, objective_phase
from cad_ray.method.scopes import never_selected
from cad_ray.config import LATER_STAGES, AttributionConfig
from cad_ray.errors import CadRayError
from cad_ray.stages.models import model_for
from cad_ray.store import (METADATA_KEY, PART_FILE, SCORE_SCHEMA, WEIGHT_SCHEMA, RunRoot, ScoreStore, aggregate_tables,
                           is_damage, partition, score_parts, table_metadata, weight_parts)

RESULT_TABLES = ("scores", "neurons", "layers")
WEIGHT_ROW_GROUP_SIZE = 1 << 16  # 256 KB of float32 weights: a look-up of 100 rows reads at most 100 of them
# what later stages derive from the scores; removed with them by --overwrite
DOWNSTREAM = ("_validation", "_validation.json", "validation", "validation_summary", "localization", "overlap",
              "_evaluation", "evaluation", "evaluation_summary", "edits", "plots", "report.html",
              "_probes", "_probe_images", "probes", "probe_summary", "probe_verdicts")


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

    def partial_sum(self, shard: Shard) -> GradientSum:
        """A shard's partial gradient sum (float64), in memory."""
        with self.first_edit(shard.concept, shard.objective):
            return self.estimator(shard.objective).partial_sum(self.concepts[shard.concept], list(shard.samples))

    def run_shard(self, shard: Shard) -> dict:
        start = time.time()
        estimator = self.estimator(shard.objective)
        total = self.partial_sum(shard)
        flat = np.concatenate([total.grads[n].numpy().reshape(-1) for n in estimator.tensor_names])
        meta = {"shard": asdict(shard), "samples": total.samples, "objective_sum": total.objective_sum,
                "tensors": estimator.tensor_names, "fingerprint": self.fingerprint(),
                "config_hash": self.config.config_hash()}
        self.run.write_table(pa.table({"grad_sum": flat}), *shard.path, metadata=meta, byte_stream_split=("grad_sum",))
        return {"shard": shard, "seconds": time.time() - start, "samples": total.samples}

    def finalize(self, concept: str, objective: str, shards: list[Shard], manifest: dict,
                 direct: bool = False) -> dict:
        """Reduce the shards of one (concept, objective) in shard order and write its three tables. `direct`: the
        shards are computed here and reduced from memory, never written (`direct_pairs`)."""
        estimator = self.estimator(objective)
        parts = [self.partial_sum(s) if direct else read_shard(self.run, s, estimator.layout(), manifest)
                 for s in shards]
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

    def finalize_pair(self, work: tuple) -> dict:
        """`finalize` of (concept, objective, shards, manifest, direct)."""
        *pair, direct = work
        return self.finalize(*pair, direct=True) if direct else self.finalize(*pair)

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


def weights_are_whole(run: RunRoot, manifest: dict) -> bool:
    return run.ours("weights", PART_FILE, owner=manifest, decoded=True) is not None


def shard_is_valid(run: RunRoot, shard: Shard, names: list[str], total_size: int, manifest: dict) -> bool:
    """A shard counts as done only if its file is whole and belongs to this run, model and layout."""
    footer = run.ours(*shard.path, owner=manifest, rows=total_size)
    return (footer is not None and footer.metadata.get("tensors") == names
            and tuple(footer.metadata["shard"]["samples"]) == shard.samples)


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


def open_run(config: AttributionConfig, root: str, fingerprint: str, overwrite: bool = False) -> dict:
    """Check the root and return its manifest, creating it for a new run.

    A root written with another config or model is refused unless `overwrite`, which first removes that
    run's tables.
    """
    run = RunRoot(root)  # the caller has checked that it is writable, before any work
    manifest = run.read_manifest()
    if manifest is None:
        foreign = [name for name in ("_shards", *RESULT_TABLES) if run.exists(name)]
        if foreign:
            raise CadRayError(f"{root} already holds {foreign[0]}/ but no cad-ray run (_manifest.json); it is not a "
                              "run root of ours: choose an empty or new --root")
    if manifest is not None and (manifest.get("config_hash") != config.config_hash()
                                 or manifest.get("fingerprint") != fingerprint):
        started_nothing = not manifest.get("complete") and not any(run.exists(n) for n in ("_shards", *RESULT_TABLES))
        if not overwrite and not started_nothing:  # a run that wrote nothing yet costs nothing to replace
            what = "config" if manifest.get("config_hash") != config.config_hash() else "model"
            raise CadRayError(f"{root} holds a run made with another {what}; use another --root, or --overwrite "
                              "to replace it")
        for name in ("_shards", *RESULT_TABLES, "weights", *DOWNSTREAM, "_manifest.json"):
            run.remove(name)  # later stages' results too: they were made from the scores being replaced
        manifest = None
    if manifest is None:
        manifest = {"config": config.result_fields(), "config_hash": config.config_hash(),
                    "fingerprint": fingerprint, "model": config.model or "builtin:digits",
                    "code_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "complete": False,
                    # the later stages' sections of the config file: their defaults for this root
                    "stage_options": config.model_dump(include=set(LATER_STAGES), mode="json")}
        run.write_manifest(manifest)
    return manifest


def shard_status(run: RunRoot, shards: list[Shard], manifest: dict,
                 layouts: dict[str, list[tuple[str, tuple[int, ...]]]]) -> tuple[list[Shard], list[Shard]]:
    """(done, pending) shards; damaged or foreign shard files count as pending and are recomputed. `layouts`:
    each objective's partial-sum layout."""
    done, pending = [], []
    for shard in shards:
        layout = layouts[shard.objective]
        names, total = [n for n, _ in layout], sum(int(np.prod(shape)) for _, shape in layout)
        (done if shard_is_valid(run, shard, names, total, manifest) else pending).append(shard)
    return done, pending


def table_is_whole(run: RunRoot, table: str, concept: str, objective: str, manifest: dict) -> bool:
    """A final table counts only if its file is whole and was written for this run's config and model."""
    return run.ours(table, partition(concept, objective), PART_FILE, owner=manifest, decoded=True) is not None


def damaged_tables(run: RunRoot, config: AttributionConfig, manifest: dict) -> list[str]:
    """The final tables that are missing, damaged or from another run, as paths under the root."""
    damaged = ["/".join((t, partition(spec.name, objective), PART_FILE)) for spec, objective in config.pairs()
               for t in RESULT_TABLES if not table_is_whole(run, t, spec.name, objective, manifest)]
    return damaged + ([] if weights_are_whole(run, manifest) else [f"weights/{PART_FILE}"])


def pairs_to_finalize(run: RunRoot, config: AttributionConfig, manifest: dict) -> list[tuple[str, str]]:
    """The (concept, objective) pairs whose tables are not all whole: written, or written again (a repair)."""
    return [(spec.name, objective) for spec, objective in config.pairs()
            if not all(table_is_whole(run, t, spec.name, objective, manifest) for t in RESULT_TABLES)]


def direct_pairs(config: AttributionConfig, by_pair: dict[tuple[str, str], list[Shard]],
                 pending: list[Shard]) -> set[tuple[str, str]]:
    """The pairs to compute and reduce in one call, without a shard file: those of a single shard that is still
    to compute (a valid shard on disk is reduced as it is), unless `keep_shards` asks for the shard files."""
    if config.keep_shards:
        return set()
    pending = set(pending)
    return {pair for pair, shards in by_pair.items() if len(shards) == 1 and shards[0] in pending}


def release_shards(run: RunRoot, concept: str, objective: str) -> bool:
    """Remove the shards of a (concept, objective) whose tables are whole (the caller has checked): at SD size
    each shard is a float64 partial sum of the whole scope, about 1 GB. Returns whether there were any."""
    folder = partition(concept, objective)
    if not run.exists("_shards", folder):
        return False
    run.remove("_shards", folder)
    run.remove_if_empty("_shards", folder.split("/")[0])
    run.remove_if_empty("_shards")
    return True


def mark_complete(run: RunRoot, manifest: dict, results: list[dict]) -> dict:
    manifest = dict(manifest, complete=True,
                    completed=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    manifest.setdefault("objective_values", {})
    for r in results:
        manifest["objective_values"][f"{r['concept']}/{r['objective']}"] = r["objective_value"]
    run.write_manifest(manifest)
    return manifest


def run(config: AttributionConfig, root: str, executor, overwrite: bool = False) -> dict:
    """The stage: plan the shards, compute those not done on the executor's workers, reduce each (concept,
    objective) in shard order and mark the run complete; returns the completed manifest."""
    run_root = RunRoot(root)
    run_root.check_writable()
    started = time.time()
    fingerprint = executor.first(AttributionWorker, "fingerprint")  # the first call loads the model
    setup_seconds = time.time() - started
    layout = executor.first(AttributionWorker, "tensor_layout")  # checks the scope before the root is touched
    manifest = open_run(config, root, fingerprint, overwrite)
    shards = plan_shards(config)
    # only pairs whose tables are not all whole need shards: a finished pair's were removed, and a repaired
    # pair's are recomputed where they are gone
    to_finalize = pairs_to_finalize(run_root, config, manifest)
    needed = [s for s in shards if (s.concept, s.objective) in to_finalize]
    _, pending = shard_status(run_root, needed, manifest, layout)
    by_pair = defaultdict(list)
    for shard in needed:
        by_pair[(shard.concept, shard.objective)].append(shard)
    direct = direct_pairs(config, by_pair, pending)  # computed by their reduce, without a shard file
    results, released = [], 0
    # in the order the objectives declare (the residual's first edit ranks the other objectives' scores)
    for when in sorted({objective_phase(objective) for _, objective in to_finalize}):
        phase = [p for p in to_finalize if objective_phase(p[1]) == when]
        written = [s for s in pending if (s.concept, s.objective) in phase and (s.concept, s.objective) not in direct]
        for _ in executor.map(AttributionWorker, "run_shard", written, "attribution",
                              total=sum(len(by_pair[p]) for p in phase if p not in direct)):
            pass
        todo = [(*pair, by_pair[pair], manifest, pair in direct) for pair in phase]
        for _, result in executor.map(AttributionWorker, "finalize_pair", todo, "reduce"):
            results.append(result)
            pair = (result["concept"], result["objective"])
            # removed only once its tables read back whole: until then they are what a repair would reduce
            if not config.keep_shards and all(table_is_whole(run_root, t, *pair, manifest) for t in RESULT_TABLES):
                released += release_shards(run_root, *pair)
    if not config.keep_shards:  # pairs finished before (a run killed between its tables and this, or kept)
        released += sum(release_shards(run_root, spec.name, objective) for spec, objective in config.pairs()
                        if (spec.name, objective) not in to_finalize)
    if not weights_are_whole(run_root, manifest):
        executor.first(AttributionWorker, "write_weights", manifest)
    manifest = mark_complete(run_root, manifest, results)
    manifest.update(run_seconds=time.time() - started, setup_seconds=setup_seconds,  # Ray start-up, model loading
                    shards_computed=len(pending), shards_skipped=len(shards) - len(pending),
                    shard_folders_removed=released, workers=executor.workers,
                    workers_lost=executor.workers_lost)
    return manifest
