"""The attribution stage (no Ray): its units, the worker that computes one, and how its tables are finished.

- units: shards, (concept, objective, block of sample indices), keyed by the config hash and the model's
  fingerprint (`plan_shards`, `shard_status`);
- one unit: `AttributionWorker.run_shards` (cad_ray.stages.attribution_worker) writes a shard's partial
  gradient sum to `_shards/`; a stack of several concepts' shards is one unit with `concept_batch`
  (`concept_stacks`);
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

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from cad_ray import __version__
from cad_ray.config import LATER_STAGES, AttributionConfig
from cad_ray.errors import CadRayError
from cad_ray.store import PART_FILE, RunRoot, partition

RESULT_TABLES = ("scores", "neurons", "layers")
# the worker by its path, not its class: the driver plans and orders the units without importing torch
WORKER = "cad_ray.stages.attribution_worker:AttributionWorker"
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


def concept_stacks(config: AttributionConfig, shards: list[Shard]) -> list[tuple[Shard, ...]]:
    """The shards that one worker call computes together: with `concept_batch` above 1 and a fused erase, the erase
    shards of one sample block whose concepts fall in the same `concept_batch` of the config's erase concepts;
    any other shard alone. Fixed by the config (not by what is pending, nor by the workers), so a concept is
    stacked with the same others in every run of the config, and its numbers are the same."""
    size = config.concept_batch if config.erase.fused else 1
    erase = [spec.name for spec, objective in config.pairs() if objective == "erase"]
    group = {name: i // size for i, name in enumerate(erase)}
    stacks, where = [], {}
    for shard in shards:
        if size > 1 and shard.objective == "erase":
            key = (shard.index, group[shard.concept])
            if key in where:
                stacks[where[key]].append(shard)
                continue
            where[key] = len(stacks)
        stacks.append([shard])
    return [tuple(stack) for stack in stacks]


def weights_are_whole(run: RunRoot, manifest: dict) -> bool:
    return run.ours("weights", PART_FILE, owner=manifest, decoded=True) is not None


def shard_is_valid(run: RunRoot, shard: Shard, names: list[str], total_size: int, manifest: dict) -> bool:
    """A shard counts as done only if its file is whole and belongs to this run, model and layout."""
    footer = run.ours(*shard.path, owner=manifest, rows=total_size)
    return (footer is not None and footer.metadata.get("tensors") == names
            and tuple(footer.metadata["shard"]["samples"]) == shard.samples)


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
    fingerprint = executor.first(WORKER, "fingerprint")  # the first call loads the model
    setup_seconds = time.time() - started
    layout = executor.first(WORKER, "tensor_layout")  # checks the scope before the root is touched
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
    phases = executor.first(WORKER, "objective_phases")
    # a stack holds shards of finished pairs too: they are computed again, not written, so that each concept is
    # stacked with the same others as in a run that was never stopped
    stacks = concept_stacks(config, shards)
    for when in sorted({phases[objective] for _, objective in to_finalize}):
        phase = [p for p in to_finalize if phases[p[1]] == when]
        written = {s for s in pending if (s.concept, s.objective) in phase and (s.concept, s.objective) not in direct}
        mine = [stack for stack in stacks if any((s.concept, s.objective) in phase and (s.concept, s.objective)
                                                 not in direct for s in stack)]
        units = [(stack, tuple(i for i, s in enumerate(stack) if s in written)) for stack in mine
                 if any(s in written for s in stack)]
        for _ in executor.map(WORKER, "run_shards", units, "attribution", total=len(mine)):
            pass
        todo = [(tuple((s.concept, s.objective, [s]) for s in stack), manifest,  # a direct pair has one shard
                 tuple(i for i, s in enumerate(stack) if (s.concept, s.objective) in direct), True)
                for stack in stacks if any((s.concept, s.objective) in direct and (s.concept, s.objective) in phase
                                           for s in stack)]
        todo += [(((*pair, by_pair[pair]),), manifest, (0,), False) for pair in phase if pair not in direct]
        for _, finished in executor.map(WORKER, "finalize_pairs", todo, "reduce"):
            for result in finished:
                results.append(result)
                pair = (result["concept"], result["objective"])
                # removed only once its tables read back whole: until then they are what a repair would reduce
                if not config.keep_shards and all(table_is_whole(run_root, t, *pair, manifest)
                                                  for t in RESULT_TABLES):
                    released += release_shards(run_root, *pair)
    if not config.keep_shards:  # pairs finished before (a run killed between its tables and this, or kept)
        released += sum(release_shards(run_root, spec.name, objective) for spec, objective in config.pairs()
                        if (spec.name, objective) not in to_finalize)
    if not weights_are_whole(run_root, manifest):
        executor.first(WORKER, "write_weights", manifest)
    manifest = mark_complete(run_root, manifest, results)
    manifest.update(run_seconds=time.time() - started, setup_seconds=setup_seconds,  # Ray start-up, model loading
                    shards_computed=len(pending), shards_skipped=len(shards) - len(pending),
                    shard_folders_removed=released, workers=executor.workers,
                    workers_lost=executor.workers_lost)
    return manifest
