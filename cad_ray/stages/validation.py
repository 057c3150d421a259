"""The validation stage (no Ray): its units (shards), the worker that computes one, and the tables it finishes.
`run` puts them in order on an executor (cad_ray.distributed).

Two kinds of shard, both written under `_validation/` and resumed like attribution shards:

- `actual`: a block of random ablations of one (concept, fraction): the actual change of J on the fixed
  evaluation batch, in both conventions;
- `sketch`: one per concept: the second-order term of every ablation (`SecondOrderSketch.subset_sums`:
  each projection reduced to its sums over the seeded subsets, so the host never holds a (K, n) array).

`finish_validation` then needs no model: it reads the score table and the shards, computes every estimator's
prediction, fits COAR, and writes

    validation/concept=<c>/objective=<o>/part-0.parquet   one row per (fraction, ablation, estimator)
    validation_summary/part-0.parquet                      Pearson/Spearman with bootstrap intervals
    localization/part-0.parquet, overlap/part-0.parquet     concentration of |score|, top-1% Jaccard
    plots/validation-<concept>.png, plots/overlap.png       scatter plots and the Jaccard heatmap
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from cad_ray import __version__
from cad_ray.config import AttributionConfig, ValidationOptions
from cad_ray.errors import CadRayError
from cad_ray.method.concepts import build_concept
from cad_ray.plots import overlap_heatmap, validation_scatter
from cad_ray.stages.attribution_worker import objective_for
from cad_ray.stages.models import model_for
from cad_ray.store import PART_FILE, RUN_KEYS, RunRoot, ScoreStore, partition
from cad_ray.method.estimators import (AblationEvaluator, Coar, FirstOrder, SecondOrder, SecondOrderSketch,
                                      bootstrap_interval, concentration, jaccard, pearson, quadratic_terms,
                                      random_subset, spearman, top_set)

MANIFEST = "_validation.json"
TABLES = ("validation", "validation_summary", "localization", "overlap")


@dataclass(frozen=True)
class ValidationShard:
    kind: str  # "actual" or "sketch"
    concept: str
    objective: str
    fraction: float = 0.0
    ablations: tuple[int, ...] = ()

    @property
    def path(self) -> tuple[str, ...]:
        folder = ("_validation", partition(self.concept, self.objective))
        if self.kind == "sketch":
            return (*folder, "sketch.parquet")
        return (*folder, f"actual-{self.fraction!r}-{self.ablations[0]:06d}.parquet")

    @property
    def rows(self) -> int:
        return len(self.ablations)


def validation_concepts(config: AttributionConfig, options: ValidationOptions) -> list[str]:
    have = [c.name for c in config.concepts if options.objective in c.objectives]
    if not have:
        raise CadRayError(f"the run has no concept with the {options.objective} objective to validate")
    if options.concepts is None:
        return have
    unknown = [c for c in options.concepts if c not in have]
    if unknown:
        raise CadRayError(f"no {options.objective} scores for {', '.join(unknown)} in this run; it has "
                          f"{', '.join(have)}")
    if not options.concepts:
        raise CadRayError("validation.concepts is empty; leave it out to validate every concept")
    return list(options.concepts)


def plan_validation(config: AttributionConfig, options: ValidationOptions) -> list[ValidationShard]:
    shards = []
    for concept in validation_concepts(config, options):
        shards.append(ValidationShard("sketch", concept, options.objective))
        for fraction in options.fractions:
            for start in range(0, options.ablations, options.block):
                ids = tuple(range(start, min(start + options.block, options.ablations)))
                shards.append(ValidationShard("actual", concept, options.objective, fraction, ids))
    return shards


def evaluation_samples(config: AttributionConfig, options: ValidationOptions) -> list[int]:
    """Held-out samples (indices after the attribution's) by default; the attribution's first ones in-sample."""
    if options.held_out:
        return list(range(config.samples, config.samples + options.eval_samples))
    if options.eval_samples > config.samples:
        raise CadRayError(f"in-sample validation uses the attribution's samples; eval_samples "
                          f"({options.eval_samples}) exceeds samples ({config.samples})")
    return list(range(options.eval_samples))


class ValidationWorker:
    """Loads the model once; computes actual-change and sketch shards (in-process or as a Ray actor)."""

    def __init__(self, config: AttributionConfig, root: str, device: str | None = None):
        self.config, self.options, self.run = config, config.validation, RunRoot(root)
        self.model = model_for(config, device)
        self.specs = {c.name: c for c in config.concepts}
        self.concepts, self.evaluators = {}, {}
        self.build_concept = build_concept
        self.objective_for = objective_for

    def fingerprint(self) -> str:
        return self.model.fingerprint()

    def concept(self, name: str):
        if name not in self.concepts:
            self.concepts[name] = self.build_concept(self.specs[name], self.model)
        return self.concepts[name]

    def objective(self, name: str, points_per_sample: int | None):
        return self.objective_for(self.config, name, points_per_sample)

    def evaluator(self, concept: str, objective: str) -> AblationEvaluator:
        if (concept, objective) not in self.evaluators:
            self.evaluators[(concept, objective)] = AblationEvaluator(
                self.model, self.objective(objective, self.options.eval_points_per_sample), self.concept(concept),
                self.config.scope, evaluation_samples(self.config, self.options), self.config.seed)
        return self.evaluators[(concept, objective)]

    def _meta(self, shard: ValidationShard) -> dict:
        return {"shard": asdict(shard), "fingerprint": self.fingerprint(), "config_hash": self.config.config_hash(),
                "options_hash": self.options.options_hash()}

    def run_shard(self, shard: ValidationShard) -> dict:
        start = time.time()
        if shard.kind == "sketch":
            table = self._sketch(shard)
        else:
            evaluator = self.evaluator(shard.concept, shard.objective)
            changes = [evaluator.change(random_subset(evaluator.n_components, shard.fraction, a, self.config.seed))
                       for a in shard.ablations]
            table = pa.table({"fraction": np.full(len(changes), shard.fraction),
                              "ablation": np.asarray(shard.ablations, dtype=np.int64),
                              "actual": [c.frozen_base for c in changes],
                              "actual_ablated_base": [c.ablated_base for c in changes]})
        self.run.write_table(table, *shard.path, metadata=self._meta(shard))
        return {"shard": shard, "seconds": time.time() - start}

    def _sketch(self, shard: ValidationShard) -> pa.Table:
        objective = self.objective(shard.objective, self.options.sketch_points_per_sample)
        sketch = SecondOrderSketch(self.model, objective, self.config.scope, self.options.projections,
                                   self.config.seed, self.config.chunk_size, self.config.batch)
        keys = [(fraction, a) for fraction in self.options.fractions for a in range(self.options.ablations)]
        # the subsets, redrawn from their seeds, are all the sketch needs of the scope: each projection is
        # reduced to one sum per subset and dropped (never a (K, n) array)
        subsets = [compact_subset(sketch.n_components, fraction, a, self.config.seed) for fraction, a in keys]
        sums = sketch.subset_sums(self.concept(shard.concept), list(range(self.config.samples)), subsets)
        del subsets
        fractions, ablations = zip(*keys)
        return pa.table({"fraction": np.asarray(fractions), "ablation": np.asarray(ablations, dtype=np.int64),
                         "quadratic": quadratic_terms(sums, objective.sign)})


def compact_subset(n_components: int, fraction: float, ablation: int, seed: int) -> np.ndarray:
    """`random_subset` in 4-byte indices where they fit: the subsets held at once (every ablation of a concept
    in the sketch, of a fraction in `predictions`) are the largest host arrays at SD size (the sketch's: 3.6 GB
    instead of 7.3)."""
    subset = random_subset(n_components, fraction, ablation, seed)
    return subset.astype(np.int32) if n_components < 2 ** 31 else subset


def shard_is_done(run: RunRoot, shard: ValidationShard, manifest: dict) -> bool:
    """Whole, from this run's options and model, and with the rows it should have."""
    rows = len(manifest["options"]["fractions"]) * manifest["options"]["ablations"] if shard.kind == "sketch" \
        else shard.rows
    return run.ours(*shard.path, owner=manifest, keys=("options_hash", *RUN_KEYS), rows=rows) is not None


def open_validation(config: AttributionConfig, root: str, fingerprint: str, overwrite: bool) -> dict:
    """The validation manifest of a root, refusing a model or options other than the ones it was made with."""
    run = RunRoot(root)
    store = ScoreStore(root)
    if store.manifest["config_hash"] != config.config_hash():
        raise CadRayError(f"--config describes another attribution run than the one in {root}; validate with the "
                          "same config (its 'validation:' section may differ) or leave --config out")
    if fingerprint != store.fingerprint:
        raise CadRayError(f"the model ({fingerprint}) is not the one the scores in {root} were computed on "
                          f"({store.fingerprint}); point the config's model at that one")
    options = config.validation
    manifest = run.read_manifest(MANIFEST)
    if manifest is not None and (manifest.get("config_hash"), manifest.get("fingerprint")) != \
            (store.manifest["config_hash"], store.fingerprint):
        # made from scores that have since been replaced: nothing of it is valid any more
        for name in ("_validation", *TABLES, "plots/validation", MANIFEST):
            run.remove(name)
        manifest = None
    if manifest is not None and manifest["options_hash"] != options.options_hash():
        if not overwrite:
            raise CadRayError(f"{root} holds a validation made with other options; pass --overwrite to replace "
                              "it (its tables are removed) or validate into a copy of the root")
        for name in ("_validation", *TABLES, "plots/validation", MANIFEST):
            run.remove(name)
        manifest = None
    if manifest is None:
        manifest = {"options": options.model_dump(mode="json"), "options_hash": options.options_hash(),
                    "fingerprint": fingerprint, "config_hash": config.config_hash(), "code_version": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "complete": False}
        run.write_manifest(manifest, MANIFEST)
    return manifest


def _flat_scores(store: ScoreStore, concept: str, objective: str) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Scores in the flat order of the scope (tensor order of the run, index within tensor), in the table's
    float32, and the shapes. The estimators and `localization` widen what they sum or rank to float64 (exactly:
    the same numbers as a float64 copy), so the 148.7M scores of SD 1.4's `ff` scope hold 0.6 GB, not 1.2."""
    scores = store.tensor_scores(concept, objective)
    return np.concatenate([s.reshape(-1) for s in scores.values()]), [s.shape for s in scores.values()]


def predictions(config: AttributionConfig, options: ValidationOptions, scores: np.ndarray,
                shapes: list[tuple[int, ...]], actual: pd.DataFrame, sketch: pd.DataFrame) -> pd.DataFrame:
    """Every estimator's prediction for every ablation of one concept, beside the actual changes."""
    n = len(scores)
    train_count = max(1, int(round(options.coar_train_fraction * options.ablations)))
    frames = []
    for fraction, part in actual.groupby("fraction", sort=True):
        part = part.sort_values("ablation").reset_index(drop=True)
        subsets = [compact_subset(n, fraction, int(a), config.seed) for a in part["ablation"]]
        quad = sketch[sketch["fraction"] == fraction].set_index("ablation")["quadratic"].reindex(part["ablation"])
        split = np.where(part["ablation"] < train_count, "train", "test")
        train = [s for s, k in zip(subsets, split) if k == "train"]
        estimators = (FirstOrder(scores), SecondOrder(scores, quad.to_numpy()),
                      Coar(shapes).fit(train, part["actual"].to_numpy()[split == "train"]))
        for estimator in estimators:  # one interface: predict(subsets)
            frames.append(part.assign(estimator=estimator.name, predicted=estimator.predict(subsets), split=split,
                                      subset_size=[len(s) for s in subsets]))
    return pd.concat(frames, ignore_index=True)


def summarize(table: pd.DataFrame, resamples: int = 1000) -> pd.DataFrame:
    """Pearson and Spearman per (concept, objective, estimator, fraction) on the test split, with 95% bootstrap
    intervals, against both conventions of the actual change."""
    rows = []
    test = table[table["split"] == "test"]
    for (concept, objective, estimator, fraction), g in test.groupby(["concept", "objective", "estimator",
                                                                       "fraction"], sort=True):
        p, a = g["predicted"].to_numpy(), g["actual"].to_numpy()
        row = {"concept": concept, "objective": objective, "estimator": estimator, "fraction": fraction,
               "ablations": len(g), "pearson": pearson(p, a), "spearman": spearman(p, a),
               "pearson_ablated_base": pearson(p, g["actual_ablated_base"].to_numpy()),
               "mean_abs_actual": float(np.abs(a).mean()), "mean_abs_predicted": float(np.abs(p).mean())}
        row["pearson_low"], row["pearson_high"] = bootstrap_interval(p, a, pearson, resamples)
        row["spearman_low"], row["spearman_high"] = bootstrap_interval(p, a, spearman, resamples)
        rows.append(row)
    return pd.DataFrame(rows)


def localization(concept: str, objective: str, scores: np.ndarray) -> tuple[dict, np.ndarray]:
    """(the concentration of |score| for one concept as a row, the indices of its top-1% positive set)."""
    shares = concentration(scores)
    row = {"concept": concept, "objective": objective, "components": len(scores),
           "top_0.1%_share": shares[0.001], "top_1%_share": shares[0.01],
           "positive_share": float((scores > 0).mean())}
    return row, top_set(scores, 0.01)


def overlap(tops: dict[str, np.ndarray], objective: str) -> pd.DataFrame:
    """Jaccard of the top-1% positive sets for every pair of concepts."""
    return pd.DataFrame([{"concept_a": a, "concept_b": b, "objective": objective, "jaccard": jaccard(tops[a], tops[b])}
                         for a in tops for b in tops])


def finish_validation(config: AttributionConfig, root: str, manifest: dict) -> dict:
    """Read the shards and the score tables, write the validation tables and plots, mark the validation done."""
    run, store, options = RunRoot(root), ScoreStore(root), config.validation
    concepts = validation_concepts(config, options)
    meta = {"fingerprint": manifest["fingerprint"], "config_hash": manifest["config_hash"],
            "options": manifest["options"], "code_version": __version__,
            "evaluation_samples": evaluation_samples(config, options)}
    tables, shares, tops = [], [], {}
    for concept in concepts:
        shards = [s for s in plan_validation(config, options) if s.concept == concept]
        actual = pd.concat([run.read_table(*s.path).to_pandas() for s in shards if s.kind == "actual"])
        sketch = run.read_table(*next(s for s in shards if s.kind == "sketch").path).to_pandas()
        scores, shapes = _flat_scores(store, concept, options.objective)
        table = predictions(config, options, scores, shapes, actual, sketch)
        row, tops[concept] = localization(concept, options.objective, scores)  # one read of the scores serves both
        shares.append(row)
        table.insert(0, "concept", concept)
        table.insert(1, "objective", options.objective)
        columns = ["concept", "objective", "fraction", "ablation", "split", "estimator", "predicted", "actual",
                   "actual_ablated_base", "subset_size"]
        table = table[columns]
        run.write_table(pa.Table.from_pandas(table.drop(columns=["concept", "objective"]), preserve_index=False),
                        "validation", partition(concept, options.objective), PART_FILE, metadata=meta)
        run.write_bytes(validation_scatter(table), "plots", "validation", f"{concept}.png")
        tables.append(table)
    everything = pd.concat(tables, ignore_index=True)
    summary = summarize(everything)
    run.write_table(pa.Table.from_pandas(summary, preserve_index=False), "validation_summary", PART_FILE,
                    metadata=meta)
    shares, pairs = pd.DataFrame(shares), overlap(tops, options.objective)
    run.write_table(pa.Table.from_pandas(shares, preserve_index=False), "localization", PART_FILE, metadata=meta)
    run.write_table(pa.Table.from_pandas(pairs, preserve_index=False), "overlap", PART_FILE, metadata=meta)
    run.write_bytes(overlap_heatmap(pairs), "plots", "validation", "overlap.png")
    manifest = dict(manifest, complete=True, completed=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    run.write_manifest(manifest, MANIFEST)
    return {"manifest": manifest, "summary": summary, "localization": shares, "overlap": pairs}


def run(config: AttributionConfig, root: str, executor, overwrite: bool = False) -> dict:
    """The stage: plan the shards, compute those not done, then finish the tables (no model needed)."""
    run_root = RunRoot(root)
    run_root.check_writable()
    shards = plan_validation(config, config.validation)  # checks the concepts before any worker starts
    store = ScoreStore(root)
    for concept in {s.concept for s in shards}:
        store.check_whole("scores", concept, config.validation.objective)  # before any work, not after
    started = time.time()
    manifest = open_validation(config, root, executor.first(ValidationWorker, "fingerprint"), overwrite)
    pending = [s for s in shards if not shard_is_done(run_root, s, manifest)]
    # sketches first: each is one long task, so they start while the short ablation blocks fill the gaps
    pending.sort(key=lambda s: s.kind != "sketch")
    for _ in executor.map(ValidationWorker, "run_shard", pending, "validation", total=len(shards)):
        pass
    workers = executor.workers
    executor.close_pool(ValidationWorker)
    result = finish_validation(config, root, manifest)
    result.update(run_seconds=time.time() - started, shards_computed=len(pending),
                  shards_skipped=len(shards) - len(pending), workers=workers)
    return result
