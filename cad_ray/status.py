"""What a run root holds, stage by stage: what survived a crash, and what a re-run of the same command will
compute (it skips the files counted here as done, after checking each one's footer and metadata)."""

from __future__ import annotations

import json

import pandas as pd

from cad_ray.config import AttributionConfig, ValidationOptions
from cad_ray.errors import CadRayError
from cad_ray.store import PART_FILE, RunRoot, partition


def root_status(root: str) -> pd.DataFrame:
    """One row per stage: stage, complete, done, total (None where the root does not say), where."""
    # the stages import torch: imported here, so that `cad-ray status` of a bad root answers fast
    from cad_ray.stages.attribution import damaged_tables, plan_shards
    from cad_ray.stages.validation import MANIFEST as VALIDATION_MANIFEST
    from cad_ray.stages.validation import plan_validation

    run = RunRoot(root)
    manifest = run.read_manifest()
    if manifest is None:
        raise CadRayError(f"{root} holds no cad-ray run (no _manifest.json); run 'cad-ray attribute' into it first")
    present = set(run.fs.find(run.path)) if run.fs.exists(run.path) else set()  # one listing, also on S3

    def shard_done(shard) -> bool:
        # a (concept, objective)'s shards are removed once its tables are written (scores last), so its scores
        # file counts them as done; a damaged table is listed in "where" and repaired by a re-run
        return run.join(*shard.path) in present or \
            run.join("scores", partition(shard.concept, shard.objective), PART_FILE) in present
    try:
        config = AttributionConfig.model_validate(manifest["config"])
    except Exception as e:  # a manifest from another version of cad-ray, or edited by hand
        raise CadRayError(f"cannot read the config in {root}/_manifest.json ({type(e).__name__}); was it written "
                          "by another version of cad-ray?") from None
    shards = plan_shards(config)
    damaged = damaged_tables(run, config, manifest) if manifest.get("complete") else []
    # the shards of a pair are removed once its tables are written: name the folder that holds what is counted
    where = "_shards/" if any(p.startswith(run.join("_shards") + "/") for p in present) else "scores/"
    rows = [{"stage": "attribution", "complete": bool(manifest.get("complete")) and not damaged,
             "done": sum(shard_done(s) for s in shards), "total": len(shards),
             "where": f"{where}; missing or damaged: {', '.join(damaged[:3])}" if damaged else where}]
    if run.exists(VALIDATION_MANIFEST):
        validation = json.loads(run.read_bytes(VALIDATION_MANIFEST))
        options = ValidationOptions.model_validate(validation["options"])
        planned = plan_validation(config.model_copy(update={"validation": options}), options)
        rows.append({"stage": "validation", "complete": bool(validation.get("complete")),
                     "done": sum(run.join(*s.path) in present for s in planned), "total": len(planned),
                     "where": "_validation/"})
    blocks = sum(1 for p in present if p.startswith(run.join("_evaluation") + "/") and p.endswith(".parquet"))
    if blocks or run.join("evaluation", PART_FILE) in present:
        # the number of blocks depends on the prompt set, which only the config names
        rows.append({"stage": "evaluation", "complete": run.join("evaluation", PART_FILE) in present,
                     "done": blocks, "total": None, "where": "_evaluation/"})
    rows.append({"stage": "report", "complete": run.join("report.html") in present, "done": None, "total": None,
                 "where": "report.html"})
    return pd.DataFrame(rows).astype({"done": "Int64", "total": "Int64"})
