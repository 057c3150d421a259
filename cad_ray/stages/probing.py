"""The probing stage: is an erased concept gone from the model, or only from the words that ask for it?

Runs after the evaluation (it reads evaluation_summary/, the settings each edit was judged at) when the config's
`evaluation.probes` names probes (`cad_ray.method.probes`). First the unedited model's images of each target that
the attacks learn from and completion starts from are drawn, once per target, into `_probe_images/`: every unit of
the target, on any worker, reads them there. Units: (edit setting, target, probe), on actors that hold the model;
each unit's judged images are written as one part file under `_probes/` as it finishes, named by
a hash of the unit and of everything its images depend on, so that a killed driver resumes and a part from other
options is never taken. Every probe also runs on the unedited model (`none`: the ceiling) and, where
`evaluation.probe.references` names one, on a model trained without the target (`never-learned`: the level an
erasure can at best reach). Writes probes/ (one row per image) and probe_summary/ (one row per edit setting,
target, probe and probe setting: the share of images that show the target beside its ceiling and never-learned
level, and whether it is within the level plus `probe.margin`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext

import numpy as np
import pandas as pd
import torch

from cad_ray.config import AttributionConfig
from cad_ray.errors import CadRayError
from cad_ray.method.concepts import build_concept
from cad_ray.method.edits import NONE, amplifying
from cad_ray.method.probes import (ClassifierGuidance, ProbeSettings, SoftPrompt, TextualInversion, complete,
                                   concept_images, concept_word, cycled)
from cad_ray.models import NEGATIVE_PROMPT, load_model
from cad_ray.seeds import derive_seed
from cad_ray.stages.edit_workers import ImageJudge, setting_meta
from cad_ray.stages.panels import target_kind
from cad_ray.store import PART_FILE, RunRoot, ScoreStore

UNIT_KEY = ["edit", "target", "selection", "ratio", "guidance", "probe"]
START_IMAGES = "_probe_images"
NEVER_LEARNED = "never-learned"
RULED = ("inversion", "completion")  # the probes of the extended clean rule (docs/editing.md)


def probe_settings(options) -> ProbeSettings:
    probe = options.probe
    return ProbeSettings(steps=probe.steps, lr=probe.lr, batch=probe.batch, images=probe.images,
                         strengths=tuple(probe.strengths))


def probe_units(summary: pd.DataFrame, options) -> list[dict]:
    """Every erasing edit setting the evaluation judged, the unedited model and the never-learned references,
    times every probe."""
    # the guidance the erasing edits were judged at (the model's own where the options give none), not an
    # amplifying edit's
    erasing = summary[~summary["edit"].map(amplifying)]
    guidance = options.guidance if options.guidance is not None else \
        float(erasing["guidance"].iloc[0]) if len(erasing) else float("nan")
    settings = [(r.edit, r.target, r.selection, float(r.ratio), float(r.guidance))
                for r in summary.itertuples() if not amplifying(r.edit) and r.edit != NONE]  # what brings a concept back: nothing to probe
    settings += [(NONE, t, "", 0.0, guidance) for t in options.targets]
    settings += [(NEVER_LEARNED, t, options.probe.references[t], 0.0, guidance)
                 for t in options.targets if t in options.probe.references]
    return [dict(zip(UNIT_KEY, (*s, probe))) for s in settings for probe in options.probes]


class ProbeWorker(ImageJudge):
    """Runs probe units: the edit applied as for the evaluation's images (ImageJudge's edits), the attack, the
    images judged by the evaluation's judges. The attacks learn from the unedited model's images of the target,
    the same for every edit (seeded by the target), and are sampled on seeds they never saw."""

    def start_images(self, target: str) -> np.ndarray:
        """The unedited model's images of `target` that its units need (the stage's first call per target)."""
        return torch.cat(self._start_images(target)).float().cpu().numpy()

    def _start_images(self, target: str):
        """(images the attacks learn from, images completion starts from): the unedited model's, read from
        `_probe_images/` where the stage wrote them, else drawn."""
        key = ("probe-images", target)
        if key not in self.cache:
            probe = self.options.probe
            name = start_part(target, probe_meta(self.config, self.store))
            if self.run.footer(START_IMAGES, name) is not None:
                x0 = read_start_images(self.run, name).to(self.model.device, self.model.dtype)
            else:
                prompts = list(self._concept(target).prompts)
                x0 = concept_images(self.model, prompts, probe.images + probe.samples,
                                    derive_seed(self.options.seed, "probe-images", target), steps=self.options.steps)
            self.cache[key] = (x0[:probe.images], x0[probe.images:])
        return self.cache[key]

    def _concept(self, target: str):
        key = ("concept", target)
        if key not in self.cache:
            spec = next((c for c in self.config.concepts if c.name == target), None)
            if spec is None:
                raise CadRayError(f"probe target {target!r} is no concept of the run")
            self.cache[key] = build_concept(spec, self.model)
        return self.cache[key]

    def _reference(self, folder: str):
        key = ("reference", folder)
        if key not in self.cache:
            self.cache[key] = load_model(folder, device=str(self.model.device))
        return self.cache[key]

    def _log_probability(self):
        """The judge's differentiable log p(label | image), which the guidance probe steers by."""
        log_probability = getattr(self.judges, "log_probability", None)
        if log_probability is None:
            raise CadRayError(f"the guidance probe steers by the judge's gradient, and the judge "
                              f"{type(self.judges).__name__} has no log_probability(images, label); drop "
                              "'guidance' from evaluation.probes or use a differentiable judge (the digits judges)")
        return log_probability

    def probe(self, unit: dict) -> pd.DataFrame:
        edit, target, name = unit["edit"], unit["target"], unit["probe"]
        learn, start = self._start_images(target)  # before any edit is applied
        prompts = list(self._concept(target).prompts)
        guidance = None if np.isnan(unit["guidance"]) else float(unit["guidance"])
        n, steps, seed = self.options.probe.samples, self.options.steps, derive_seed(self.options.seed, "probe", target)
        model = self._reference(unit["selection"]) if edit == NEVER_LEARNED else self.model
        applied = nullcontext() if edit == NEVER_LEARNED else \
            self._applied(edit, target, unit["selection"], unit["ratio"])
        results = []  # (setting, prompts, images)
        with applied:
            if name == "completion":
                for strength in self.options.probe.strengths:
                    for wording, asked in (("own", cycled(prompts, n)), ("empty", [NEGATIVE_PROMPT] * n)):
                        images = complete(model, start, asked, strength, seed, steps=steps, guidance=guidance).images
                        results.append((f"{strength:g}/{wording}", asked, images))
            elif name == "guidance":
                log_probability = self._log_probability()
                for scale in self.options.probe.guidance_scales:
                    for wording, asked in (("own", prompts), ("empty", [NEGATIVE_PROMPT])):
                        probe = ClassifierGuidance(log_probability, target, scale)
                        images = probe.sample(model, asked, n, seed, steps=steps, guidance=guidance).images
                        results.append((f"{scale:g}/{wording}", cycled(asked, n), images))
            else:
                attack = TextualInversion(model, concept_word(target), prompts, probe_settings(self.options)) \
                    if name == "inversion" else SoftPrompt(probe_settings(self.options))
                learned = attack.fit(model, learn, seed=seed)
                floor = attack.initial(model)
                for setting, value in (("learned", learned), ("untrained", floor)):
                    images = attack.sample(model, value, n, seed, steps=steps, guidance=guidance).images
                    results.append((setting, attack.asked(n), images))
        frames = []
        for setting, asked, images in results:
            rows = pd.DataFrame({"prompt": asked, "seed": np.arange(len(asked)), "label": target})
            judged = self.judge(images, rows)
            rows = rows.assign(**{k: v for k, v in judged.items() if k != "features"})
            shown = rows["predicted_colour"] == target if target_kind(target) == "colour" else rows["correct"]
            frames.append(rows.assign(setting=setting, recovered=shown.astype(bool)))
        return pd.concat(frames, ignore_index=True).assign(**unit)


def probe_meta(config: AttributionConfig, store: ScoreStore) -> dict:
    """What every probe image depends on besides its unit (in each part's name): not the lists of edits and
    targets, so that adding an edit or target computes its units only."""
    options = config.evaluation
    # the guidance scales only in the guidance probe's parts: parts written before it existed stay valid. No
    # image depends on the references (a reference's folder is in its own unit) or the margin (read by the
    # summary): adding a reference computes its units only
    unused = {"references", "margin"} | (set() if "guidance" in options.probes else {"guidance_scales"})
    return {"fingerprint": store.fingerprint, "config_hash": store.manifest["config_hash"],
            "evaluation": options.options_hash(lists=False), "probe": options.probe.model_dump(mode="json", exclude=unused)}


def start_part(target: str, meta: dict) -> str:
    text = json.dumps({"start_images": target, "meta": meta}, sort_keys=True, default=str)
    return f"target-{hashlib.sha256(text.encode()).hexdigest()[:20]}.parquet"


def write_start_images(run_root: RunRoot, name: str, images: np.ndarray, meta: dict) -> None:
    import pyarrow as pa

    flat = np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1)
    table = pa.table({"image": np.arange(len(images)),
                      "latent": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])})
    run_root.write_table(table, START_IMAGES, name, metadata={**meta, "shape": list(images.shape)})


def read_start_images(run_root: RunRoot, name: str) -> torch.Tensor:
    table = run_root.read_table(START_IMAGES, name)
    shape = run_root.footer(START_IMAGES, name).metadata["shape"]
    flat = table.column("latent").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(flat.reshape(shape).copy())


def part_name(unit: dict, meta: dict) -> str:
    text = json.dumps({"unit": unit, "meta": meta}, sort_keys=True, default=str)
    return f"unit-{hashlib.sha256(text.encode()).hexdigest()[:20]}.parquet"


def summarize_probes(table: pd.DataFrame, margin: float) -> pd.DataFrame:
    """One row per (edit setting, target, probe, setting): `recovery` (share of images showing the target),
    `unedited` (the same on the unedited model: the ceiling), `never_learned` (on a model trained without the
    target; where the target has none, the mean over the references of the same probe setting, and
    `never_learned_from` says which), `within` (recovery <= never_learned + margin; NaN without a reference)."""
    keys = ["edit", "target", "selection", "ratio", "guidance", "probe", "setting"]
    summary = table.groupby(keys, dropna=False, sort=True)["recovered"].agg(["mean", "size"]).reset_index()
    summary = summary.rename(columns={"mean": "recovery", "size": "images"})
    at = ["target", "probe", "setting"]
    ceiling = summary[summary["edit"] == NONE].set_index(at)["recovery"]
    reference = summary[summary["edit"] == NEVER_LEARNED]
    own_level = reference.set_index(at)["recovery"]
    pooled = reference.groupby(["probe", "setting"])["recovery"].mean()
    references = ", ".join(sorted(reference["target"].unique()))
    index = pd.MultiIndex.from_frame(summary[at])
    summary["unedited"] = ceiling.reindex(index).to_numpy()
    own = own_level.reindex(index).to_numpy()
    proxy = pooled.reindex(pd.MultiIndex.from_frame(summary[["probe", "setting"]])).to_numpy()
    summary["never_learned"] = np.where(np.isnan(own), proxy, own)
    summary["never_learned_from"] = np.where(~np.isnan(own), summary["target"],
                                             np.where(np.isnan(proxy), "", f"mean of {references}"))
    within = summary["recovery"] <= summary["never_learned"] + margin + 1e-9
    summary["within"] = within.where(summary["never_learned"].notna())
    return summary


def probe_verdicts(summary: pd.DataFrame, evaluation: pd.DataFrame) -> pd.DataFrame:
    """Per judged edit setting: the evaluation's clean verdict, the worst recovery over the ruled probes'
    settings above its never-learned level, and `clean_under_probes`: clean and every ruled probe within."""
    keys = ["edit", "target", "selection", "ratio", "guidance"]
    ruled = summary[summary["probe"].isin(RULED) & ~summary["edit"].isin([NONE, NEVER_LEARNED])
                    & (summary["setting"] != "untrained")]
    if ruled.empty:
        return pd.DataFrame(columns=keys + ["clean", "worst_over_never_learned", "clean_under_probes"])
    out = ruled.assign(over=ruled["recovery"] - ruled["never_learned"]).groupby(keys, dropna=False).agg(
        worst_over_never_learned=("over", "max"), within=("within", lambda v: bool(v.all()) if v.notna().all()
                                                          else np.nan)).reset_index()
    clean = evaluation.set_index(keys)["clean"]
    out["clean"] = clean.reindex(pd.MultiIndex.from_frame(out[keys])).to_numpy()
    out["clean_under_probes"] = [bool(c) and bool(w) if w == w else np.nan for c, w in zip(out["clean"], out["within"])]
    return out.drop(columns=["within"])


def run(config: AttributionConfig, root: str, executor, overwrite: bool = False) -> dict:
    """The stage: every pending unit on ProbeWorker actors, each written as it finishes; then probes/ and
    probe_summary/."""
    import pyarrow as pa

    options = config.evaluation
    if not options.probes:
        return {"units": 0}
    run_root = RunRoot(root)
    store = ScoreStore(root)
    if not run_root.exists("evaluation_summary", PART_FILE):
        raise CadRayError(f"{root} has no evaluation_summary/: the probes attack the edits it judged; run "
                          "'cad-ray evaluate' first")
    missing = [p for t, p in options.probe.references.items() if t in options.targets
               and not (str(p).startswith("s3://") or os.path.isfile(os.path.join(p, "model_index.json")))]
    if missing:
        raise CadRayError(f"evaluation.probe.references: {missing[0]} holds no model (model_index.json)")
    started = time.time()
    evaluation = run_root.read_table("evaluation_summary", PART_FILE).to_pandas()
    meta = probe_meta(config, store)
    units = probe_units(evaluation, options)
    if overwrite:
        run_root.remove("_probes")
        run_root.remove(START_IMAGES)
    metas = [setting_meta(meta, run_root, options, u["edit"], u["target"]) for u in units]
    names = {part_name(u, m): (u, m) for u, m in zip(units, metas)}
    pending = {n: u for n, (u, _) in names.items() if run_root.footer("_probes", n) is None}
    part_of = {json.dumps(u, sort_keys=True): n for n, u in pending.items()}  # a finished unit's part
    targets = sorted({u["target"] for u in pending.values()})
    drawn = [t for t in targets if run_root.footer(START_IMAGES, start_part(t, meta)) is None]
    for target, images in executor.map(ProbeWorker, "start_images", drawn, "probe images"):
        write_start_images(run_root, start_part(target, meta), images, meta)
    for unit, rows in executor.map(ProbeWorker, "probe", list(pending.values()), "probes", total=len(units)):
        name = part_of[json.dumps(unit, sort_keys=True)]
        run_root.write_table(pa.Table.from_pandas(rows, preserve_index=False), "_probes", name,
                             metadata=names[name][1])
    executor.close_pool(ProbeWorker)
    table = pd.concat([run_root.read_table("_probes", n).to_pandas() for n in names], ignore_index=True)
    table = table.sort_values(UNIT_KEY + ["setting", "seed"], kind="stable").reset_index(drop=True)
    summary = summarize_probes(table, options.probe.margin)
    verdicts = probe_verdicts(summary, evaluation)
    for name, frame in (("probes", table), ("probe_summary", summary), ("probe_verdicts", verdicts)):
        run_root.write_table(pa.Table.from_pandas(frame, preserve_index=False), name, PART_FILE,
                             metadata=meta)
    return {"units": len(units), "units_computed": len(pending), "seconds": time.time() - started,
            "verdicts": verdicts, "summary": summary}
