"""The evaluation's workers (no Ray): `EditWorker` makes the fine-tuned edits and saves each as a model folder
in the run root; `Editor` applies any edit of the registry (`cad_ray.method.edits`) to a loaded model and undoes
it; `ImageJudge` (an `Editor`) generates and judges blocks of rows. `cad-ray edit` uses the same `Editor`."""

from __future__ import annotations

import io
import tempfile
import time
from contextlib import ExitStack, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cad_ray.config import AttributionConfig, EvaluationOptions
from cad_ray.digits.concepts import concept_kind
from cad_ray.errors import CadRayError
from cad_ray.judges import judge_batch, load_judge
from cad_ray.method.attribution import CAD
from cad_ray.method.baselines import uce_weights
from cad_ray.method.concepts import build_concept
from cad_ray.method.editing import (Selection, check_fingerprint, contrast_concepts, edited, finetune, random_like,
                                    set_weights,
                                    selection_masks, union_masks, weights_replaced)
from cad_ray.method.edits import EDITS, NONE, RECOVERY
from cad_ray.method.probes import ProbeSettings, concept_word
from cad_ray.method.scopes import never_selected, select_parameters
from cad_ray.method.unlearning import UnlearningSettings, adversarial_finetune
from cad_ray.models import load_model
from cad_ray.seeds import derive_seed
from cad_ray.stages.attribution_worker import objective_for, write_weights
from cad_ray.stages.models import model_for
from cad_ray.store import (PART_FILE, SCORE_SCHEMA, RunRoot, ScoreStore, aggregate_tables, partition, score_parts,
                           table_metadata)

EDIT_MARKER = "_complete.json"
EDIT_COST = "cost.json"  # how long the edit took to make, beside its marker (the marker is compared as a key)


def edit_folder(edit: str, target: str) -> tuple[str, ...]:
    return ("edits", f"{edit}-{target}")


def setting_meta(meta: dict, run: RunRoot, options: EvaluationOptions, edit: str, target: str) -> dict:
    """What one edit setting's images (and probes) depend on beyond `meta`, what every image depends on: UCE's
    options for its own, and for a fine-tuned model, or an edit applied on one, the make of its folder (its cost
    file: a folder made again is another model, whose images are made again)."""
    extra = {}
    record = EDITS.get(edit)
    if edit == "uce":
        extra["uce"] = options.uce.model_dump(mode="json")
    made = None if record is None else record.after or (edit if record.applied_by == "fine-tuning" else None)
    if made:
        extra["made"] = run.read_manifest(*edit_folder(made, target), EDIT_COST)
    return {**meta, **extra}


def finetune_options(options: EvaluationOptions, target: str):
    """`evaluation.finetune` as it applies to `target` (its kind's entry of `finetune.kinds` in)."""
    return options.finetune.for_kind(concept_kind(target))


def finetune_key(options: EvaluationOptions, store: ScoreStore, target: str) -> dict:
    """What a fine-tuned edit of `target` depends on; written last into its folder, so a half-written or stale
    edit is made again."""
    ft = finetune_options(options, target)
    return {"finetune": ft.key(), "selection": ft.selection or options.selection,
            "recovery": RECOVERY in options.edits, "fingerprint": store.fingerprint,
            "config_hash": store.manifest["config_hash"]}


def load_scored_model(config: AttributionConfig, root: str, device: str | None = None):
    """The model of `config` on `device` (a GPU where there is one) and the score store of `root`, refusing a
    model other than the one the scores were computed on."""
    model = model_for(config, device)
    store = ScoreStore(root)
    check_fingerprint(model, store.fingerprint)
    return model, store


class EditWorker:
    """Makes the fine-tuned edits of one target and saves each as a model folder in the run root; for
    `finetune` it also attributes the target under the amplify objective on the edited model (for recovery)."""

    def __init__(self, config: AttributionConfig, root: str, device: str | None = None):
        self.config, self.run, self.options = config, RunRoot(root), config.evaluation
        self.model, self.store = load_scored_model(config, root, device)
        self.build_concept = build_concept
        self.unlearning_images = {}  # drawn by the unedited model, the same for every target's unlearning

    def fingerprint(self) -> str:
        return self.model.fingerprint()

    def default_guidance(self) -> float:
        return self.model.default_guidance

    def make(self, edit: str, target: str) -> dict:
        start = time.time()
        spec = next(c for c in self.config.concepts if c.name == target)
        concept = self.build_concept(spec, self.model)
        ft = finetune_options(self.options, target)
        masks = None
        if EDITS[edit].settings == "finetune":  # it moves the components a selection takes
            masks = self.store.masks(target, ft.selection or self.options.selection, ft.ratio,
                                     protected=never_selected(self.model))
        if masks is not None and ft.unlearning is not None:
            weights = self._unlearned(concept, masks, ft.unlearning)
        else:
            objective = objective_for(self.config, "erase")
            scope = ft.scope if masks is None and ft.scope else self.config.scope  # the baseline's own, if given
            weights = finetune(self.model, concept, objective, scope, list(range(ft.samples)),
                               self.config.seed, ft.steps, ft.lr, masks, self.config.chunk_size, ft.negative_guidance)
        self.run.remove(*edit_folder(edit, target))  # a half-written or stale edit is made anew
        with weights_replaced(self.model, weights):
            self._save_model(edit, target)
            if any(EDITS[e].after == edit for e in self.options.edits):  # recovery needs its amplify scores
                self._attribute_amplify(edit, target, concept)
        seconds = time.time() - start
        self.run.write_manifest({"seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                                 "device": str(self.model.device)}, *edit_folder(edit, target), EDIT_COST)
        self.run.write_manifest(finetune_key(self.options, self.store, target), *edit_folder(edit, target),
                                EDIT_MARKER)
        return {"edit": edit, "target": target, "seconds": seconds}

    def _unlearned(self, concept, masks, u) -> dict:
        """Adversarial unlearning of `concept` on the masked components with the settings `u`; the other
        concepts of its kind kept (every other concept where it has no kind)."""
        names = [c.name for c in self.config.concepts]
        kept = contrast_concepts(concept.name, names, "kind", concept_kind) or [n for n in names if n != concept.name]
        others = {n: list(self.build_concept(next(c for c in self.config.concepts if c.name == n), self.model).prompts)
                  for n in kept}
        settings = UnlearningSettings(rounds=u.rounds, steps=u.steps, lr=u.lr, batch=u.batch, images=u.images,
                                      retain_images=u.retain_images, retain_weight=u.retain_weight, eta=u.eta,
                                      target=u.target,
                                      images_from=u.images_from, match=u.match,
                                      attack=ProbeSettings(steps=u.attack_steps), sampling_steps=self.options.steps,
                                      timestep_power=u.timestep_power)
        return adversarial_finetune(self.model, concept, concept_word(concept.name), others,
                                    self.config.scope, masks, settings, self.config.seed,
                                    images=self.unlearning_images)

    def make_edit(self, work: tuple[str, str]) -> dict:
        return self.make(*work)

    def _save_model(self, edit: str, target: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    self.run.write_bytes(path.read_bytes(), *edit_folder(edit, target), "model",
                                         *path.relative_to(tmp).parts)

    def _attribute_amplify(self, edit: str, target: str, concept) -> None:
        """CAD scores of the target under the amplify objective on the edited model, as a run root of its own."""
        estimator = CAD(self.model, objective_for(self.config, "amplify"), self.config.scope, self.config.chunk_size,
                        self.config.seed, self.config.batch)
        attribution = estimator.attribute(concept, self.config.samples)
        sub = RunRoot(self.run.uri_under(*edit_folder(edit, target)))
        manifest = {"fingerprint": self.model.fingerprint(), "config_hash": self.config.config_hash(),
                    "config": self.config.result_fields(), "model": f"{edit} of {target}", "complete": True}
        meta = table_metadata(manifest, target, "amplify", {"objective_value": attribution.objective_value})
        where = (partition(target, "amplify"), PART_FILE)
        names = estimator.tensor_names
        neurons, layers = aggregate_tables(names, attribution.weights, attribution.grads)
        sub.write_table(layers, "layers", *where, metadata=meta)
        write_weights(sub, estimator.parameters, manifest)  # the fine-tuned model's weights
        sub.write_parts(SCORE_SCHEMA, score_parts(names, attribution.weights, attribution.grads), "scores", *where,
                        metadata=meta)
        sub.write_manifest(manifest)


def edit_masks(edit: str, target: str, selection: str | Selection, ratio: float, draw: int, store: ScoreStore, seed: int,
               protected: dict, scores_of=None, masks_of=None, after: ScoreStore | None = None) -> dict:
    """The masks of a zeroing edit's setting: the target's components its selection takes from the run's scores
    (ranked by the edit's method and contrast where it names them), a random draw of as many as the edit it
    follows takes (`ranks: random`), or, for an edit made `after` another, from the scores of that edit's model
    (`after`: their store). `masks_of(edit, target, selection, ratio)` may supply cached masks of the followed
    edit, `scores_of` cached scores."""
    record = EDITS[edit]
    chosen = selection if isinstance(selection, Selection) else Selection.parse(selection)
    if record.after:  # scores of the target alone, on the edited model: no other concept to contrast
        parts = [selection_masks(lambda c: after.tensor_scores(c, record.objective), target, [],
                                 replace(part, contrast=record.contrast or part.contrast, objective=""), ratio,
                                 largest=record.largest, protected=protected)
                 for part in chosen.parts]
        return union_masks(parts)
    if record.ranks == "random":  # as many components in each unit of each part's scope as the followed part
        # each target its own draws: one draw shared by all would make many targets one control (a draw that
        # zeroes a target's own word then counts against every target)
        masks_of = masks_of or (lambda e, t, s, r: edit_masks(e, t, s, r, 0, store, seed, protected, scores_of))
        drawn_seed = derive_seed(seed, edit, target, int(draw))  # a table's int64: derive_seed tells ints apart
        drawn = [random_like(masks_of(record.follows, target, str(part), share), part.granularity, drawn_seed,
                             scope=part.scope)
                 for part, share in store.edit_parts(chosen, ratio)]
        return union_masks(drawn)
    if record.method:
        chosen = chosen.with_method(record.method, record.contrast)
    return store.masks(target, chosen, ratio, record.objective, record.largest, scores_of, protected)


class Editor:
    """Applies any edit of the registry to `model` for a `with` block and undoes it after: zeroing edits by
    their masks, closed-form ones by their weights, fine-tuned ones by the model folder `EditWorker` saved in the
    run root. Masks, weights and fine-tuned folders are computed once and kept."""

    def __init__(self, config: AttributionConfig, run: RunRoot, model, store: ScoreStore):
        self.config, self.options, self.run = config, config.evaluation, run
        self.model, self.store = model, store
        self.cache = {}

    def _scores(self, concept: str, objective: str, method: str = "cad") -> dict[str, np.ndarray]:
        key = ("scores", concept, objective, method)
        if key not in self.cache:
            self.cache[key] = self.store.tensor_scores(concept, objective, method)
        return self.cache[key]

    def _uce(self, target: str) -> dict:
        """UCE's new key and value projections for `target`: its prompts mapped to the guide, the prompts of the
        concepts `uce.preserve` names kept."""
        key = ("uce", target)
        if key not in self.cache:
            self.cache[key] = uce_for_concept(self.model, {c.name: c for c in self.config.concepts}, target,
                                              self.options.uce)
        return self.cache[key]

    # the closed-form edits: their new weights for a target
    CLOSED_FORM = {"uce": _uce}

    def _masks(self, edit: str, target: str, selection: str, ratio: float, draw: int = 0):
        draw = int(draw)  # a table's int64: derive_seed tells ints from other types
        key = (edit, target, selection, ratio, draw)
        if key not in self.cache:
            after = EDITS[edit].after
            store = None
            if after:
                store = ScoreStore(self.run.uri_under(*edit_folder(after, target)))
                if store.fingerprint != self._finetuned_fingerprint(after, target):
                    raise CadRayError(f"the recovery scores under {store.run.uri} were computed on another model "
                                      f"than {self.run.uri_under(*edit_folder(after, target), 'model')}; "
                                      "re-run 'cad-ray evaluate' with --overwrite")
            self.cache[key] = edit_masks(edit, target, selection, ratio, draw, self.store, self.config.seed,
                                         never_selected(self.model), self._scores, self._masks, store)
        return self.cache[key]

    def _finetuned(self, edit: str, target: str):
        key = (edit, target)
        if key not in self.cache:
            edited_model = load_model(self.run.uri_under(*edit_folder(edit, target), "model"))
            self.cache[key] = {n: p.detach().clone() for n, p in
                               select_parameters(edited_model.named_parameters(), self.config.scope)}
            self.cache[("fingerprint", edit, target)] = edited_model.fingerprint()
        return self.cache[key]

    def _finetuned_fingerprint(self, edit: str, target: str) -> str:
        self._finetuned(edit, target)
        return self.cache[("fingerprint", edit, target)]

    def zeroed(self, edit: str, target: str, selection: str, ratio: float, draw: int = 0) -> int:
        """How many components the edit's setting zeroes (0 for an edit that zeroes none)."""
        if edit == NONE or not EDITS[edit].zeroes:
            return 0
        return int(sum(m.sum() for m in self._masks(edit, target, selection, ratio, draw).values()))

    def share(self, edit: str, target: str, selection: str, ratio: float, draw: int = 0) -> float:
        """The share of the model's weights the edit's setting sets (zeroes, moves or replaces): one measure of
        an edit's size for every edit and scope, where `ratio` is what its selection takes (0.0: it has none)."""
        if edit == NONE:
            return 0.0
        key = ("share", edit, target, selection, ratio, int(draw))
        if key not in self.cache:
            record = EDITS[edit]
            new = {}
            if record.applied_by == "fine-tuning" or record.after:
                new = self._finetuned(record.after or edit, target)
            elif record.applied_by == "closed-form":
                new = self.CLOSED_FORM[edit](self, target)
            masks = self._masks(edit, target, selection, ratio, draw) if record.zeroes else {}
            weights = dict(self.model.named_parameters())
            changed = 0
            for name in set(new) | set(masks):
                p = weights[name]
                set_here = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
                if name in new:
                    set_here |= new[name].to(p.device, p.dtype) != p.detach()  # as weights_replaced sets it
                if name in masks:
                    set_here |= torch.as_tensor(np.asarray(masks[name]), device=p.device).bool()
                changed += int(set_here.sum())
            self.cache[key] = changed / sum(p.numel() for p in weights.values())
        return self.cache[key]

    def applied(self, edit: str, target: str, selection: str, ratio: float, draw: int = 0):
        """A context in which the model is edited."""
        if edit == NONE:
            return nullcontext()
        record = EDITS[edit]
        if record.applied_by == "fine-tuning":
            return weights_replaced(self.model, self._finetuned(edit, target))
        if record.applied_by == "closed-form":
            return weights_replaced(self.model, self.CLOSED_FORM[edit](self, target))
        stack = ExitStack()
        try:
            if record.after:
                stack.enter_context(weights_replaced(self.model, self._finetuned(record.after, target)))
            stack.enter_context(edited(self.model, self._masks(edit, target, selection, ratio, draw)))
        except BaseException:  # the model is left as it was found (a kept worker's model serves later commands)
            stack.close()
            raise
        return stack

    _applied = applied


class ImageJudge(Editor):
    """Generates and judges batches of rows (on a Ray actor of the executor's pool, or in-process).

    Loads the model once; each edit is applied for its rows and undone, so rows of any edits can share a
    batch. Images depend on (edit, prompt, seed, guidance) only, never on the batch they fall in.
    """

    def __init__(self, config: AttributionConfig, root: str, device: str | None = None, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        model, store = load_scored_model(config, root, device)
        super().__init__(config, RunRoot(root), model, store)
        self.judges = load_judge(self.options.judge, self.model.kind)

    def default_guidance(self) -> float:
        return self.model.default_guidance

    def fingerprint(self) -> str:  # a Ray pool's first call: it loads the model
        return self.model.fingerprint()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        for (edit, target, selection, ratio, guidance, draw), rows in batch.groupby(
                ["edit", "target", "selection", "ratio", "guidance", "draw"], sort=False, dropna=False):
            rows = rows.copy()
            zeroed = self.zeroed(edit, target, selection, ratio, draw)
            share = self.share(edit, target, selection, ratio, draw)
            with self.applied(edit, target, selection, ratio, draw):
                images = self.model.sample(list(rows["prompt"]), seed=self.options.seed,
                                           guidance=None if np.isnan(guidance) else float(guidance),
                                           steps=self.options.steps, ids=[int(s) for s in rows["seed"]]).images
            rows["zeroed"], rows["share"] = zeroed, share
            rows = rows.assign(**self.judge(images, rows))
            out.append(rows)
        return pd.concat(out)

    def judge(self, images: np.ndarray, rows: pd.DataFrame) -> dict:
        from PIL import Image

        pngs = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        measured = {"image_png": pngs, "brightness": brightness(images)}
        if self.judges is None:
            return {"predicted": [""] * len(images), "correct": [False] * len(images), **measured}
        return {**judge_batch(self.judges, images, list(rows["label"]), list(rows["prompt"])), **measured}


def brightness(images: np.ndarray) -> list[float]:
    """Each image's bright end: the 99th percentile over pixels of the brightest channel. The judges read a digit
    that an edit left nearly black as that digit (docs/editing.md); this sees it."""
    lit = np.clip(np.asarray(images, dtype=np.float32), 0, 1).max(axis=-1).reshape(len(images), -1)
    return [float(v) for v in np.percentile(lit, 99, axis=1)]


def uce_for_concept(model, specs: dict, target: str, options) -> dict[str, torch.Tensor]:
    """UCE's new weights for `target` among the run's concept `specs` (name -> ConceptSpec): its prompts mapped to
    `options.guide`, the prompts of the concepts `options.preserve` names kept (`evaluation.uce` options). The one
    place `cad-ray evaluate` and `cad-ray edit` make it."""
    kept = [] if options.preserve == "none" else contrast_concepts(target, list(specs), options.preserve,
                                                                          concept_kind)
    prompts = lambda name: list(build_concept(specs[name], model).prompts)  # noqa: E731
    return uce_weights(model, prompts(target), [p for c in kept for p in prompts(c)], options.guide, options.lamb,
                       options.erase_scale, options.preserve_scale)


def edit_uce(store: ScoreStore, model, target: str) -> int:
    """UCE on `model` in place, with the run's concepts and its evaluation section's `uce` options (what
    `cad-ray edit --edit uce` saves); returns the number of tensors rewritten."""
    config = store.config
    specs = {c.name: c for c in config.concepts}
    if target not in specs:
        raise CadRayError(f"concept {target!r} is not in the run; it has {', '.join(specs)}")
    weights = uce_for_concept(model, specs, target, config.evaluation.uce)
    set_weights(model, weights)
    return len(weights)
