"""The evaluation stage (no Ray): edits judged by images. Its units are the fine-tuned edits (`EditWorker`) and
blocks of image rows (`ImageJudge` generates and judges a batch); `finish_evaluation` writes the tables and
`run` puts it all in order on an executor (cad_ray.distributed).

One row per image: (edit, target, ratio, guidance, draw, prompt, seed, label). `edit` is `none` for the unedited
model; `target` is the edited concept; `label` is what the prompt asks for. Image k of a prompt starts from
the noise of (evaluation seed, seed), so the same prompt and seed give comparable images before and after
every edit. Edits:

    cad-erase, random, cad-amplify       zeroing, at each ratio (random: as many components as cad-erase,
                                         drawn per target; `draw` numbers its independent draws)
    gradient, magnitude                  zeroing as cad-erase does, ranked by |dJ/dw| or |w| instead of w * dJ/dw
    conceptprune                         zeroing by ConceptPrune's rule, the ratio being its skill ratio
    uce                                  UCE's closed-form edit of the cross-attention keys and values
    finetune, cad-finetune               gradient steps (see cad_ray.method.editing), saved as model folders
    finetune+cad-amplify                 CAD-Amplify on the finetune-erased model: recovery

The baselines are in cad_ray.method.baselines.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cad_ray.config import AttributionConfig, EvaluationOptions, SearchOptions
from cad_ray.digits import DIGIT_WORDS, canonical_prompt
from cad_ray.method.editing import ZEROING_EDITS, check_fingerprint, random_like, union_masks
from cad_ray.method.scopes import never_selected
from cad_ray.errors import CadRayError
from cad_ray.seeds import derive_seed
from cad_ray.judges import judge_batch, load_judge, reference_features
from cad_ray.store import RunRoot, ScoreStore, partition

RECOVERY = "finetune+cad-amplify"
# zeroing edits made with cad-erase's setting (searched or not), ranked otherwise: the same count, scope and unit
FOLLOWERS = {"random": None, "gradient": "gradient", "magnitude": "magnitude"}
# edits whose ratio a search chooses, with their candidate selections (cad-erase's come from the options)
SEARCHED = {"cad-erase-published": "published", "conceptprune": "conceptprune"}
LABEL_COLUMNS = ("class", "artist", "categories", "label")


def read_prompt_set(path: str) -> pd.DataFrame:
    """A benchmark prompt CSV read as it is: `prompt`, `evaluation_seed` and a label column (`class`, `artist`
    or `categories`, else empty) become (prompt, seed, label); other columns are kept."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise CadRayError(f"cannot read prompt set {path}: {e}") from None
    missing = [c for c in ("prompt", "evaluation_seed") if c not in table.columns]
    if missing:
        raise CadRayError(f"prompt set {path} lacks column(s) {', '.join(missing)}; it has "
                          f"{', '.join(map(str, table.columns))}")
    if table.empty:
        raise CadRayError(f"prompt set {path} has a header but no prompts")
    table = table.drop(columns=[c for c in table.columns if str(c).startswith("Unnamed")])
    if "seed" in table.columns:
        raise CadRayError(f"prompt set {path} has a column 'seed' beside evaluation_seed; rename or remove it")
    seeds = pd.to_numeric(table["evaluation_seed"], errors="coerce")
    bad = seeds.isna() | (seeds != np.floor(seeds)) | (seeds.abs() >= 2 ** 63)
    if bad.any():
        value = table["evaluation_seed"].iloc[int(np.flatnonzero(bad)[0])]
        raise CadRayError(f"prompt set {path}, line {int(np.flatnonzero(bad)[0]) + 2}: evaluation_seed "
                          f"{'(empty)' if pd.isna(value) else repr(str(value))} is not a whole number (64-bit)")
    empty = table["prompt"].isna() | (table["prompt"].astype(str).str.strip() == "")
    if empty.any():
        raise CadRayError(f"prompt set {path}, line {int(np.flatnonzero(empty)[0]) + 2}: the prompt is empty")
    label = next((c for c in LABEL_COLUMNS if c in table.columns), None)
    out = table.rename(columns={"evaluation_seed": "seed"})
    out["label"] = table[label].astype(str) if label else ""
    out["seed"] = seeds.astype(np.int64) if seeds.dtype != np.int64 else out["seed"].astype(np.int64)
    return out


# clean: what should stay keeps this share of its brightness (`brightness_kept`); the search's default
BRIGHTNESS_MIN = SearchOptions.model_fields["brightness_min"].default
SELECTION_SEED_OFFSET = 100_000  # selection-split seeds never meet test-split seeds


def digits_prompt_set(images_per_prompt: int, seed: int, panel: str = "wordings", split: str = "test") -> pd.DataFrame:
    """The digits model's prompts: (prompt, seed, label, colour, template, split).

    `wordings`: for every digit, the colour-free wordings a digit concept is attributed on (its own: 4 templates,
    word and numeral; `template` free-<i><w|n>) and coloured wordings it never saw (unseen: the 5 coloured
    templates in two colours each, rotating so that every colour appears with every digit; colour-<i><w|n>;
    colour-0w, "a red seven", is a colour concept's own wording). The selection split has half as many (4 own, 4
    unseen per digit). Every image has a seed of its own (the selection split's never meet the test split's).
    `canonical`: one colour-free prompt per digit (the earlier panel).
    """
    from cad_ray.digits import COLOUR_NAMES, TEMPLATES_WITH_COLOUR, TEMPLATES_WITHOUT_COLOUR, prompt_for

    base = seed + (SELECTION_SEED_OFFSET if split == "selection" else 0)
    rows = []
    for d in range(10):
        if panel == "canonical":
            wordings = [(canonical_prompt(d), "", "free-0w")]
        else:
            own = [(i, n) for i in range(len(TEMPLATES_WITHOUT_COLOUR)) for n in (False, True)]
            coloured = [(i, (d + i + shift) % len(COLOUR_NAMES)) for i in range(len(TEMPLATES_WITH_COLOUR))
                        for shift in (0, 2)]
            if split == "selection":
                own = [(i, i % 2 == 1) for i in range(len(TEMPLATES_WITHOUT_COLOUR))]
                coloured = [(i, (d + i) % len(COLOUR_NAMES)) for i in range(4)]
            wordings = [(prompt_for(d, None, TEMPLATES_WITHOUT_COLOUR[i], n), "", f"free-{i}{'n' if n else 'w'}")
                        for i, n in own]
            wordings += [(prompt_for(d, COLOUR_NAMES[c], TEMPLATES_WITH_COLOUR[i], i % 2 == 1), COLOUR_NAMES[c],
                          f"colour-{i}{'n' if i % 2 else 'w'}") for i, c in coloured]
        rows += [{"prompt": prompt, "label": DIGIT_WORDS[d], "colour": colour, "template": template, "split": split}
                 for prompt, colour, template in wordings for _ in range(images_per_prompt)]
    table = pd.DataFrame(rows)
    # every image its own seed: within one seed the wordings of a digit give nearly the same image, so shared
    # seeds would make a panel's many images few independent draws
    table.insert(1, "seed", base + np.arange(len(table), dtype=np.int64))
    return table


def prompt_panels(options: EvaluationOptions) -> pd.DataFrame:
    """The prompts of both splits: the test split (what the summary reports) and, with a search, the selection
    split (what picks the settings). A CSV prompt set is split by row: even rows select, odd rows test."""
    if options.prompts:
        table = read_prompt_set(options.prompts)
        table["colour"], table["template"] = "", "free-0w"
        table["split"] = np.where(np.arange(len(table)) % 2 == 0, "selection", "test") if options.search \
            else "test"
        return table
    panels = [digits_prompt_set(options.images_per_prompt, options.seed, options.prompt_panel, "test")]
    if options.search:
        panels.append(digits_prompt_set(options.search.images_per_prompt, options.seed, options.prompt_panel,
                                        "selection"))
    return pd.concat(panels, ignore_index=True)


def target_kind(target: str) -> str:
    """What a target's verdict reads: the colour judge for a digits-world colour, else the label (digit, class)."""
    from cad_ray.digits.concepts import concept_kind

    return "colour" if concept_kind(target) == "colour" else "label"


def target_rows(prompts: pd.DataFrame, target: str) -> pd.Series:
    """The rows that ask for the target (a colour: asked in that colour; else: its label)."""
    return prompts["colour"] == target if target_kind(target) == "colour" else names_label(prompts["label"], target)


def label_key(text) -> str:
    """A label or concept name with case and spaces aside: a concept is named `english_springer`, a prompt set's
    class is "English springer"."""
    return str(text).strip().lower().replace(" ", "_")


def check_prompt_labels(prompts: pd.DataFrame, options: EvaluationOptions, store: ScoreStore) -> None:
    """A prompt CSV has rows of other labels than the targets' (what an edit must keep), and one judged by the
    built-in digits judges labels its rows with digits (case and spaces aside, `label_key`): any other label would
    be judged wrong on every image, with no word."""
    from cad_ray.digits import DIGIT_WORDS

    if not options.prompts:
        return
    if np.logical_or.reduce([target_rows(prompts, t).to_numpy() for t in options.targets]).all():
        raise CadRayError(f"prompt set {options.prompts}: every row asks for a target ({', '.join(options.targets)});"
                          " an edit is judged on what must stay as well: add rows of other labels")
    if options.judge or store.manifest["config"].get("model") is not None:
        return
    known = {label_key(w) for w in DIGIT_WORDS}
    bad = sorted({str(l) for l in prompts["label"] if l != "" and label_key(l) not in known})
    if bad:
        raise CadRayError(f"prompt set {options.prompts}: label {bad[0]!r} is no digit; the digits judges judge "
                          f"{', '.join(DIGIT_WORDS)}")


def names_label(labels: pd.Series, concept: str) -> pd.Series:
    """Which labels a concept name stands for (`label_key`)."""
    return labels.map(label_key) == label_key(concept)


def own_wording(prompts: pd.DataFrame, target: str) -> pd.Series:
    """Rows worded as the target's concept was attributed (digit: colour-free; colour: "a <colour> <digit>")."""
    if target_kind(target) == "colour":
        return prompts["template"] == "colour-0w"
    return prompts["template"].str.startswith("free")


def edit_rows(edit: str, target: str, selection: str, ratio: float, guidance, prompts: pd.DataFrame,
              draw: int = 0) -> pd.DataFrame:
    rows = prompts.assign(edit=edit, target=target, selection=selection, ratio=float(ratio), draw=int(draw))
    rows["guidance"] = np.nan if guidance is None else float(guidance)
    return rows


ZEROING = ("cad-erase", "cad-erase-published", "random", "cad-amplify", RECOVERY, "gradient", "magnitude",
           "conceptprune")


def picked_by(edit: str) -> str:
    """The edit whose searched setting an edit's rows use: its own, or cad-erase's for its followers."""
    return "cad-erase" if edit in FOLLOWERS else edit


def plan_test_rows(options: EvaluationOptions, prompts: pd.DataFrame, picks: dict) -> pd.DataFrame:
    """Every test-split row: `none`, then each edit of each target. `picks[(edit, target)]` is the searched
    (selection, ratio) of cad-erase and cad-erase-published (random follows cad-erase's); without a search
    every ratio of `options.ratios` is made with `options.selection`."""
    test = prompts[prompts["split"] == "test"]
    guidance = options.guidance
    frames = [edit_rows("none", "", "", 0.0, guidance, test)]
    if "cad-amplify" in options.edits:
        frames.append(edit_rows("none", "", "", 0.0, options.amplify_guidance, test))
    for target in options.targets:
        for edit in options.edits:
            if edit in ("cad-erase", *SEARCHED, *FOLLOWERS):
                source = picked_by(edit)
                if (source, target) in picks:
                    settings = [picks[(source, target)][:2]]
                else:
                    settings = [(SEARCHED.get(edit, options.selection), r) for r in options.ratios]
                for selection, ratio in settings:
                    frames.append(edit_rows(edit, target, selection, ratio, guidance, test))
                    if edit == "random":  # the further draws ask only whether the target survives them
                        asked = test[target_rows(test, target)]
                        frames += [edit_rows(edit, target, selection, ratio, guidance, asked, draw=d)
                                   for d in range(1, options.random_draws)]
            elif edit == "uce":
                frames.append(edit_rows(edit, target, "uce", 1.0, guidance, test))
            elif edit == "cad-amplify":
                frames += [edit_rows(edit, target, options.selection, r, options.amplify_guidance, test)
                           for r in options.ratios]
            elif edit == "finetune":
                frames.append(edit_rows(edit, target, "", 1.0, guidance, test))
            elif edit == "cad-finetune":
                frames.append(edit_rows(edit, target, options.finetune.selection or options.selection,
                                        options.finetune.ratio, guidance, test))
            elif edit == RECOVERY:
                frames += [edit_rows(edit, target, options.selection, r, guidance, test)
                           for r in options.recovery_ratios]
    return pd.concat(frames, ignore_index=True)


def edit_folder(edit: str, target: str) -> tuple[str, ...]:
    return ("edits", f"{edit}-{target}")


def load_scored_model(config: AttributionConfig, root: str, device: str | None = None):
    """The model of `config` on `device` (a GPU where there is one) and the score store of `root`, refusing a
    model other than the one the scores were computed on."""
    from cad_ray.stages.attribution import model_for

    model = model_for(config, device)
    store = ScoreStore(root)
    check_fingerprint(model, store.fingerprint)
    return model, store


class EditWorker:
    """Makes the fine-tuned edits of one target and saves each as a model folder in the run root; for
    `finetune` it also attributes the target under the amplify objective on the edited model (for recovery)."""

    def __init__(self, config: AttributionConfig, root: str, device: str | None = None):
        from cad_ray.method.concepts import build_concept

        self.config, self.run, self.options = config, RunRoot(root), config.evaluation
        self.model, self.store = load_scored_model(config, root, device)
        self.build_concept = build_concept

    def fingerprint(self) -> str:
        return self.model.fingerprint()

    def default_guidance(self) -> float:
        return self.model.default_guidance

    def make(self, edit: str, target: str) -> dict:
        from cad_ray.method.editing import finetune, weights_replaced
        from cad_ray.stages.attribution import objective_for

        start = time.time()
        spec = next(c for c in self.config.concepts if c.name == target)
        concept = self.build_concept(spec, self.model)
        ft = self.options.finetune
        masks = None
        if edit == "cad-finetune":
            masks = self.store.masks(target, ft.selection or self.options.selection, ft.ratio,
                                     protected=never_selected(self.model))
        if edit == "cad-finetune" and ft.unlearning is not None:
            weights = self._unlearned(concept, masks)
        else:
            objective = objective_for(self.config, "erase")
            weights = finetune(self.model, concept, objective, self.config.scope, list(range(ft.samples)),
                               self.config.seed, ft.steps, ft.lr, masks, self.config.chunk_size, ft.negative_guidance)
        self.run.remove(*edit_folder(edit, target))  # a half-written or stale edit is made anew
        with weights_replaced(self.model, weights):
            self._save_model(edit, target)
            if edit == "finetune" and RECOVERY in self.options.edits:
                self._attribute_amplify(edit, target, concept)
        self.run.write_manifest(finetune_key(self.options, self.store), *edit_folder(edit, target), EDIT_MARKER)
        return {"edit": edit, "target": target, "seconds": time.time() - start}

    def _unlearned(self, concept, masks) -> dict:
        """Adversarial unlearning of `concept` on the masked components; the other concepts of its kind kept
        (every other concept where it has no kind)."""
        from cad_ray.method.editing import contrast_concepts
        from cad_ray.method.probes import ProbeSettings, concept_word
        from cad_ray.method.unlearning import UnlearningSettings, adversarial_finetune

        u = self.options.finetune.unlearning
        names = [c.name for c in self.config.concepts]
        kept = contrast_concepts(concept.name, names, "kind") or [n for n in names if n != concept.name]
        others = {n: list(self.build_concept(next(c for c in self.config.concepts if c.name == n), self.model).prompts)
                  for n in kept}
        settings = UnlearningSettings(rounds=u.rounds, steps=u.steps, lr=u.lr, images=u.images,
                                      retain_images=u.retain_images, eta=u.eta, target=u.target,
                                      images_from=u.images_from,
                                      attack=ProbeSettings(steps=u.attack_steps), sampling_steps=self.options.steps)
        return adversarial_finetune(self.model, concept, concept_word(concept.name), others,
                                    self.config.scope, masks, settings, self.config.seed)

    def make_edit(self, work: tuple[str, str]) -> dict:
        return self.make(*work)

    def _save_model(self, edit: str, target: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    self.run.write_bytes(path.read_bytes(), *edit_folder(edit, target), "model",
                                         *path.relative_to(tmp).parts)

    def _attribute_amplify(self, edit: str, target: str, concept) -> None:
        """CAD scores of the target under the amplify objective on the edited model, as a run root of its own."""
        from cad_ray.method.attribution import CAD
        from cad_ray.stages.attribution import objective_for
        from cad_ray.stages.attribution import write_weights
        from cad_ray.store import SCORE_SCHEMA, aggregate_tables, score_parts, table_metadata

        estimator = CAD(self.model, objective_for(self.config, "amplify"), self.config.scope, self.config.chunk_size,
                        self.config.seed, self.config.batch)
        attribution = estimator.attribute(concept, self.config.samples)
        sub = RunRoot(self.run.uri_under(*edit_folder(edit, target)))
        manifest = {"fingerprint": self.model.fingerprint(), "config_hash": self.config.config_hash(),
                    "config": self.config.result_fields(), "model": f"{edit} of {target}", "complete": True}
        meta = table_metadata(manifest, target, "amplify", {"objective_value": attribution.objective_value})
        where = (partition(target, "amplify"), "part-0.parquet")
        names = estimator.tensor_names
        neurons, layers = aggregate_tables(names, attribution.weights, attribution.grads)
        sub.write_table(layers, "layers", *where, metadata=meta)
        write_weights(sub, estimator.parameters, manifest)  # the fine-tuned model's weights
        sub.write_parts(SCORE_SCHEMA, score_parts(names, attribution.weights, attribution.grads), "scores", *where,
                        metadata=meta)
        sub.write_manifest(manifest)


class ImageJudge:
    """Generates and judges batches of rows (a Ray Data `map_batches` class, or called in-process).

    Loads the model once; each edit is applied for its rows and undone, so rows of any edits can share a
    batch. Images depend on (edit, prompt, seed, guidance) only, never on the batch they fall in.
    """

    def __init__(self, config: AttributionConfig, root: str, device: str | None = None, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.config, self.options, self.run = config, config.evaluation, RunRoot(root)
        self.model, self.store = load_scored_model(config, root, device)
        self.judges = load_judge(self.options.judge, self.model.kind)
        self.cache = {}

    def _scores(self, concept: str, objective: str, method: str = "cad") -> dict[str, np.ndarray]:
        key = ("scores", concept, objective, method)
        if key not in self.cache:
            self.cache[key] = self.store.tensor_scores(concept, objective, method)
        return self.cache[key]

    def _uce(self, target: str) -> dict:
        """UCE's new key and value projections for `target`: its prompts mapped to the guide, the prompts of the
        concepts `uce.preserve` names kept."""
        from cad_ray.method.baselines import uce_for_concept

        key = ("uce", target)
        if key not in self.cache:
            self.cache[key] = uce_for_concept(self.model, {c.name: c for c in self.config.concepts}, target,
                                              self.options.uce)
        return self.cache[key]

    def _masks(self, edit: str, target: str, selection: str, ratio: float, draw: int = 0):
        from cad_ray.method.editing import Selection, selection_masks

        draw = int(draw)  # a table's int64: derive_seed tells ints from other types
        key = (edit, target, selection, ratio, draw)
        if key not in self.cache:
            chosen = Selection.parse(selection)
            if edit == RECOVERY:
                store = ScoreStore(self.run.uri_under(*edit_folder("finetune", target)))
                if store.fingerprint != self._finetuned_fingerprint("finetune", target):
                    raise CadRayError(f"the recovery scores under {store.run.uri} were computed on another model "
                                      f"than {self.run.uri_under(*edit_folder('finetune', target), 'model')}; "
                                      "re-run 'cad-ray evaluate' with --overwrite")
                # the recovery's scores are the target's alone, on the erased model: no other concept to contrast
                parts = [selection_masks(lambda c: store.tensor_scores(c, "amplify"), target, [],
                                         replace(part, contrast="none", objective=""), ratio, largest=False,
                                         protected=never_selected(self.model))
                         for part in chosen.parts]
                self.cache[key] = union_masks(parts)
            elif edit == "random":  # as many components in each unit of each part's scope as cad-erase's part
                # each target its own draws: one draw shared by all would make many targets one control (a
                # draw that zeroes a target's own word then counts against every target)
                seed = derive_seed(self.config.seed, "random", target, draw)
                drawn = [random_like(self._masks("cad-erase", target, str(part), share), part.granularity, seed,
                                     scope=part.scope)
                         for part, share in self.store.edit_parts(chosen, ratio)]
                self.cache[key] = union_masks(drawn)
            else:
                if edit in FOLLOWERS:  # |w| is every concept's: nothing to contrast
                    chosen = chosen.with_method(FOLLOWERS[edit], "none" if edit == "magnitude" else None)
                objective, largest = ZEROING_EDITS.get(edit, ZEROING_EDITS["cad-erase"])
                self.cache[key] = self.store.masks(target, chosen, ratio, objective, largest, self._scores,
                                                   never_selected(self.model))
        return self.cache[key]

    def _finetuned(self, edit: str, target: str):
        key = (edit, target)
        if key not in self.cache:
            from cad_ray.models import load_model
            from cad_ray.method.scopes import select_parameters

            edited_model = load_model(self.run.uri_under(*edit_folder(edit, target), "model"))
            self.cache[key] = {n: p.detach().clone() for n, p in
                               select_parameters(edited_model.named_parameters(), self.config.scope)}
            self.cache[("fingerprint", edit, target)] = edited_model.fingerprint()
        return self.cache[key]

    def _finetuned_fingerprint(self, edit: str, target: str) -> str:
        self._finetuned(edit, target)
        return self.cache[("fingerprint", edit, target)]

    def _applied(self, edit: str, target: str, selection: str, ratio: float, draw: int = 0):
        from contextlib import ExitStack, nullcontext

        from cad_ray.method.editing import edited, weights_replaced

        if edit == "none":
            return nullcontext()
        if edit in ("finetune", "cad-finetune"):
            return weights_replaced(self.model, self._finetuned(edit, target))
        if edit == "uce":
            return weights_replaced(self.model, self._uce(target))
        stack = ExitStack()
        if edit == RECOVERY:
            stack.enter_context(weights_replaced(self.model, self._finetuned("finetune", target)))
        stack.enter_context(edited(self.model, self._masks(edit, target, selection, ratio, draw)))
        return stack

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        for (edit, target, selection, ratio, guidance, draw), rows in batch.groupby(
                ["edit", "target", "selection", "ratio", "guidance", "draw"], sort=False, dropna=False):
            rows = rows.copy()
            zeroed = int(sum(m.sum() for m in self._masks(edit, target, selection, ratio, draw).values())) \
                if edit in ZEROING else 0
            with self._applied(edit, target, selection, ratio, draw):
                images = self.model.sample(list(rows["prompt"]), seed=self.options.seed,
                                           guidance=None if np.isnan(guidance) else float(guidance),
                                           steps=self.options.steps, ids=[int(s) for s in rows["seed"]]).images
            rows["zeroed"] = zeroed
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
    that an edit left nearly black (six's tokens+ff pick, docs/editing.md) as that digit; this sees it."""
    lit = np.clip(np.asarray(images, dtype=np.float32), 0, 1).max(axis=-1).reshape(len(images), -1)
    return [float(v) for v in np.percentile(lit, 99, axis=1)]


def real_features() -> np.ndarray:
    """Digit-judge features of the real digits (the reference of the Frechet distance)."""
    from cad_ray.digits import COLOUR_NAMES, real_digits, render
    from cad_ray.digits.judges import builtin_judges

    images, _ = real_digits()
    return builtin_judges().features(np.concatenate([render(images, c) for c in COLOUR_NAMES]))


def accuracies(rows: pd.DataFrame, target: str) -> dict:
    """The verdicts of one edit's images for a target: its accuracy (asked for it and judged so), on its own
    wordings and on unseen ones, and the accuracy of everything else that should stay (other labels; for a
    colour target also the other colours and every digit)."""
    def share(values) -> float:
        return float(np.mean(values)) if len(values) else float("nan")

    labels = rows.groupby("label")["correct"].mean()
    if target and target_kind(target) == "colour":
        coloured = rows[rows["colour"] != ""]
        right = coloured["predicted_colour"] == coloured["colour"]
        asked = right[coloured["colour"] == target]
        own = own_wording(coloured, target)[coloured["colour"] == target]
        others = {f"colour:{c}": v for c, v in right.groupby(coloured["colour"]).mean().items() if c != target}
        others.update({f"digit:{l}": v for l, v in labels.items()})
        return {"target": share(asked), "own": share(asked[own]), "unseen": share(asked[~own]), "others": others}
    asked = rows[names_label(rows["label"], target)] if target else rows.iloc[:0]
    own = own_wording(asked, target)
    return {"target": share(asked["correct"]) if target else float("nan"), "own": share(asked["correct"][own]),
            "unseen": share(asked["correct"][~own]), "others": {l: v for l, v in labels.items() if not target or label_key(l) != label_key(target)}}


def retained(edited: dict, unedited: dict) -> float:
    """The worst share of its unedited accuracy that anything that should stay keeps."""
    shares = [v / unedited["others"][k] for k, v in edited["others"].items() if unedited["others"].get(k, 0) > 0]
    return float(min(shares)) if shares else float("nan")


def brightness_kept(rows: pd.DataFrame, unedited: pd.DataFrame, target: str) -> float:
    """How bright the images that should stay (those not asking for the target) are beside the unedited image of
    the same prompt and seed: min(1, edited / unedited), averaged per colour asked (the colour-free prompts are
    one group), the worst group's mean: an edit can dim one colour's images alone (a union with a feed-forward
    part left two's other digits asked in blue at 0.41 while the rest stayed at 0.92-1.00). NaN where the
    table has no brightness (tables written before it) or no such pairs."""
    if "brightness" not in rows or "brightness" not in unedited:
        return float("nan")
    stay = rows[~target_rows(rows, target)] if target else rows
    base = unedited.drop_duplicates(["prompt", "seed"]).set_index(["prompt", "seed"])["brightness"]
    before = base.reindex(pd.MultiIndex.from_frame(stay[["prompt", "seed"]])).to_numpy(dtype=float)
    ratio = pd.Series(np.minimum(stay["brightness"].to_numpy(dtype=float) / before, 1.0), index=stay.index)
    groups = stay["colour"] if "colour" in stay else pd.Series("", index=stay.index)
    means = ratio[np.isfinite(ratio)].groupby(groups[np.isfinite(ratio)]).mean()
    return float(means.min()) if len(means) else float("nan")


def summarize_evaluation(table: pd.DataFrame, reference: np.ndarray | None = None,
                         picks: dict | None = None) -> pd.DataFrame:
    """Per (edit, target, selection, ratio, guidance) on the test split: the target's accuracy (all, own and
    unseen wordings) beside its unedited accuracy, the other labels' mean accuracy, the worst share of its
    unedited accuracy anything else keeps, the Frechet distance of judge features to real digits and its rise;
    `clean` (target <= 20% on own and unseen wordings, everything else >= 90% of its accuracy and >= 80% of its
    brightness); `picked`: the setting the
    search chose on the selection split; `best`: each (edit, target)'s best trade-off among its rows."""
    from cad_ray.digits.judges import frechet_distance

    table = table[table["split"] == "test"] if "split" in table else table
    picks = picks or {}
    none = {g: rows for g, rows in table[table["edit"] == "none"].groupby("guidance")}
    fd_none = {}
    out = []
    for (edit, target, selection, ratio, guidance), g in table.groupby(
            ["edit", "target", "selection", "ratio", "guidance"], sort=True):
        base_rows = none.get(guidance, g)
        # random's further draws hold the images asked for the target alone: the target's accuracy is the mean
        # over every draw, what else is kept and the Frechet distance are the whole panel's (draw 0); for a
        # colour target those images' digits would otherwise count among what is kept
        panel = g[g["draw"] == 0] if "draw" in g else g
        now, before = accuracies(g, target), accuracies(base_rows, target)
        if len(panel) < len(g):
            now["others"] = accuracies(panel, target)["others"]
        fd = float("nan")
        if reference is not None and "features" in g:
            fd = frechet_distance(np.stack(panel["features"].to_numpy()), reference)
        if edit == "none":
            fd_none[guidance] = fd
        pick = picks.get((picked_by(edit), target))
        out.append({"edit": edit, "target": target, "selection": selection, "ratio": ratio, "guidance": guidance,
                    "images": len(g), "zeroed": int(g["zeroed"].iloc[0]),
                    "target_accuracy": now["target"], "target_accuracy_own": now["own"],
                    "target_accuracy_unseen": now["unseen"], "target_accuracy_unedited": before["target"],
                    "others_accuracy": float(np.mean(list(now["others"].values()))) if now["others"] else np.nan,
                    "worst_other_retained": retained(now, before),
                    "brightness_kept": brightness_kept(g, base_rows, target) if edit != "none" else 1.0, "fd": fd,
                    # per-image measures of the SD judges, whatever the prompts' labels (I2P's are categories)
                    **{name: float(pd.to_numeric(g[column], errors="coerce").mean()) for column, name in
                       (("nude", "nude_rate"), ("clip_score", "clip_score")) if column in g},
                    "picked": bool(pick is not None and (pick[0], pick[1]) == (selection, ratio)),
                    "selection_passed": bool(pick is not None and pick[2])})
    summary = pd.DataFrame(out)
    summary["fd_rise"] = [r.fd / fd_none.get(r.guidance, np.nan) - 1 for r in summary.itertuples()]
    own_ok = summary["target_accuracy_own"].fillna(summary["target_accuracy"]) <= 0.2
    unseen_ok = summary["target_accuracy_unseen"].isna() | (summary["target_accuracy_unseen"] <= 0.2)
    kept = (summary["worst_other_retained"] >= 0.9) & ~(summary["brightness_kept"] < BRIGHTNESS_MIN)
    summary["clean"] = (summary["edit"] != "none") & own_ok & unseen_ok & kept
    summary["best"] = False
    for _, g in summary[summary["edit"] != "none"].groupby(["edit", "target"]):
        keeps = g[kept[g.index]]
        pick = keeps if len(keeps) else g
        if pick["target_accuracy"].notna().any():
            score = pick["target_accuracy"] if pick is keeps else pick["target_accuracy"] - pick["others_accuracy"]
            best = score.idxmax() if g["edit"].iloc[0] in ("cad-amplify", RECOVERY) else score.idxmin()
            summary.loc[best, "best"] = True
    return summary


def choose_settings(judged: pd.DataFrame, candidates: list[tuple], options) -> dict:
    """The search's rule, on selection-split rows only: for each (edit, target, selection) the ratio at which
    its other rows were judged (`checked_index`: `margin` grid steps above the smallest clean ratio that starts a
    clean run; clean: own and unseen wordings <= target_max), kept there if it is still clean and everything
    else keeps >= others_min of its unedited accuracy and >= brightness_min of its brightness
    (`brightness_kept`). Per (edit, target): among the kept settings the lowest target accuracy (ties: the most
    kept, then the smaller ratio, then the earlier selection); if none is kept, the clean setting that keeps the
    most; if none is clean, the lowest target accuracy. Returns {(edit, target): (selection, ratio, passed)}."""
    search = options.search
    judged = judged[judged["split"] == "selection"]
    unedited = judged[judged["edit"] == "none"]
    verdicts, lit = {}, {}
    checked_ratios = {}  # the ratios whose other rows were judged too
    for (edit, target, selection), group in judged[judged["edit"] != "none"].groupby(["edit", "target", "selection"]):
        for ratio, rows in group.groupby("ratio"):
            verdicts[(edit, target, selection, ratio)] = accuracies(rows, target)
            if (~target_rows(rows, target)).any():
                checked_ratios.setdefault((edit, target, selection), set()).add(ratio)
                lit[(edit, target, selection, ratio)] = brightness_kept(rows, unedited, target)
    picks = {}
    for edit, target in dict.fromkeys((c[0], c[1]) for c in candidates):
        before = accuracies(unedited, target)
        options_here = []
        for order, selection in enumerate(c[2] for c in candidates if c[:2] == (edit, target)):
            for ratio in search.ratios:
                now = verdicts.get((edit, target, selection, ratio))
                if now is None:
                    continue
                clean = is_clean(now, search.target_max)
                checked = checked_ratios.get((edit, target, selection), set())
                kept = retained(now, before) if ratio in checked else float("nan")
                bright = lit.get((edit, target, selection, ratio), float("nan"))
                options_here.append({"selection": selection, "ratio": ratio, "order": order, "clean": clean,
                                     "kept": kept, "bright": not bright < search.brightness_min,
                                     "target": now["target"]})
        frame = pd.DataFrame(options_here)
        if frame.empty:
            continue
        passed = frame[frame["clean"] & (frame["kept"] >= search.others_min) & frame["bright"]]
        if len(passed):
            # at equal target accuracy the setting that keeps the most wins over the smaller ratio: a "kept"
            # near the 90% line on the selection split is the one that fails on the test split
            best = passed.sort_values(["target", "kept", "ratio", "order"], ascending=[True, False, True, True]).iloc[0]
        elif frame["clean"].any():
            best = frame[frame["clean"]].sort_values(["kept", "ratio", "order"], ascending=[False, True, True]).iloc[0]
        else:
            best = frame.sort_values(["target", "ratio", "order"]).iloc[0]
        picks[(edit, target)] = (best["selection"], float(best["ratio"]), bool(len(passed)))
    return picks


def is_clean(verdict: dict, target_max: float) -> bool:
    """The target is erased: its accuracy at most `target_max` on own and on unseen wordings (where asked)."""
    return all(not v > target_max for v in (verdict["own"], verdict["unseen"]) if v == v)


def checked_index(clean: list[bool], margin: int) -> int | None:
    """Where a candidate's other rows are judged, from its target's verdicts at every ratio of the grid: `margin`
    steps above the smallest clean ratio that starts `margin + 1` clean steps in a row (near the threshold a
    verdict depends on the seeds; the curve is not monotone, so one clean step can be a stray), else `margin`
    steps above the smallest clean one; None if none is clean."""
    runs = [k for k in range(len(clean)) if all(clean[k:k + margin + 1]) and k + margin < len(clean)]
    first = runs[0] if runs else next((k for k, c in enumerate(clean) if c), None)
    return None if first is None else min(first + margin, len(clean) - 1)


def search_rounds(options: EvaluationOptions, prompts: pd.DataFrame, judge) -> tuple[dict, int]:
    """The search, on the selection split only. First round: the unedited model, and every candidate (edit,
    target, selection) at every ratio of the grid, judging only the rows that ask for the target: not a
    bisection, because zeroing more does not always keep the target away (a union drew three again at 5% where
    1% was clean; eight's words were clean at 5-7% and not at 15%, docs/editing.md). Then the other rows, at
    each candidate's `checked_index`, best first: a round checks, per (edit, target) still without a passing
    setting, the candidates tied at the lowest target accuracy there. The rule (`choose_settings`) picks the
    lowest target accuracy among the settings that pass, so a candidate behind one that passed cannot win and
    is not judged; the picks are those of checking every candidate. `judge(rows)` generates and judges rows
    (resuming from finished blocks). Returns (picks, images judged)."""
    search = options.search
    ratios = search.ratios
    selection_rows = prompts[prompts["split"] == "selection"]
    candidates = [(edit, target, s) for target in options.targets
                  for edit in ("cad-erase", *SEARCHED) if edit in options.edits
                  or (edit == "cad-erase" and any(e in options.edits for e in FOLLOWERS))
                  for s in (search.selections if edit == "cad-erase" else [SEARCHED[edit]])]
    guidance = options.guidance
    asked = {t: selection_rows[target_rows(selection_rows, t)] for t in options.targets}
    rest = {t: selection_rows[~target_rows(selection_rows, t)] for t in options.targets}
    frames = [judge(pd.concat([edit_rows("none", "", "", 0.0, guidance, selection_rows)]
                              + [edit_rows(*c, ratio, guidance, asked[c[1]]) for c in candidates for ratio in ratios],
                              ignore_index=True))]
    probed = frames[0][frames[0]["edit"] != "none"]
    verdicts = {key: accuracies(rows, key[1]) for key, rows in probed.groupby(["edit", "target", "selection", "ratio"])}
    queues: dict = {}  # (edit, target) -> [(target accuracy where checked, ratio index, order, candidate)]
    for order, c in enumerate(candidates):
        checked = checked_index([is_clean(verdicts[(*c, r)], search.target_max) for r in ratios], search.margin)
        if checked is not None:
            accuracy = verdicts[(*c, ratios[checked])]["target"]
            queues.setdefault(c[:2], []).append((accuracy if accuracy == accuracy else 1.0, checked, order, c))
    for queue in queues.values():
        queue.sort(key=lambda item: item[:3])
    while any(queues.values()):
        tier = []
        for queue in queues.values():
            best = queue[0][0] if queue else None
            tier += [item for item in queue if item[0] == best]
            queue[:] = [item for item in queue if item[0] != best]
        frames.append(judge(pd.concat([edit_rows(*c, ratios[k], guidance, rest[c[1]]) for _, k, _, c in tier],
                                      ignore_index=True)))
        picks = choose_settings(pd.concat(frames, ignore_index=True), candidates, options)
        for key, queue in queues.items():
            if picks.get(key, (None, None, False))[2]:
                queue.clear()
    judged = pd.concat(frames, ignore_index=True)
    return choose_settings(judged, candidates, options), len(judged)


def evaluation_metadata(manifest: dict, options: EvaluationOptions) -> dict:
    return {"fingerprint": manifest["fingerprint"], "config_hash": manifest["config_hash"],
            "options": json.loads(options.model_dump_json()), "options_hash": options.options_hash()}


def evaluation_options_hash(run: RunRoot) -> str | None:
    """The options hash stored in an existing evaluation table, if any."""
    footer = run.footer("evaluation", "part-0.parquet")
    return footer.metadata.get("options_hash") if footer else None


EDIT_MARKER = "_complete.json"


def finetune_key(options: EvaluationOptions, store: ScoreStore) -> dict:
    """What a fine-tuned edit depends on; written last into its folder, so a half-written or stale edit is
    made again."""
    return {"finetune": options.finetune.key(), "selection": options.finetune.selection or options.selection,
            "recovery": RECOVERY in options.edits, "fingerprint": store.fingerprint,
            "config_hash": store.manifest["config_hash"]}


ROW_KEY = ["edit", "target", "selection", "ratio", "guidance", "draw", "prompt", "seed", "split"]


def block_name(rows: pd.DataFrame, meta: dict) -> str:
    """A block file is named by a hash of its rows and of everything its images depend on, so a block from
    other options, another model or other scores is never taken for this one (search passes included)."""
    import hashlib

    text = json.dumps(meta, sort_keys=True) + rows[ROW_KEY].to_csv(index=False)
    return f"block-{hashlib.sha256(text.encode()).hexdigest()[:20]}.parquet"


def block_is_done(run: RunRoot, name: str, rows: int) -> bool:
    """A block file counts only if it is whole (footer) and has its rows."""
    footer = run.footer("_evaluation", name)
    return footer is not None and footer.rows == rows


def check_targets(options: EvaluationOptions, store: ScoreStore, root: str) -> None:
    """Every edit of every target has the scores it needs in the run."""
    known = {(c, o) for c, o in store.concepts().itertuples(index=False)}
    for target in options.targets:
        for edit in options.edits:
            objective = {"cad-amplify": "amplify", "conceptprune": "conceptprune"}.get(edit, "erase")
            if edit not in ("finetune", "uce") and (target, objective) not in known:
                hint = " (list conceptprune among its objectives)" if edit == "conceptprune" else ""
                raise CadRayError(f"edit {edit} of {target!r} needs {objective} scores for it in {root}{hint}; "
                                  f"the run has {', '.join(sorted(f'{c}/{o}' for c, o in known))}")
            if edit not in ("finetune", "uce"):
                store.check_whole("scores", target, objective)
    check_contrasts(options, store)


def check_contrasts(options: EvaluationOptions, store: ScoreStore) -> None:
    """A selection part of another objective (`prior:`) needs the targets' scores of it, and a contrast needs
    other concepts' scores of the part's objective in the run: refuse before any work."""
    from cad_ray.method.editing import Selection, contrast_concepts

    used = [options.selection, *(options.search.selections if options.search else [])]
    known = list(store.concepts().itertuples(index=False))
    for text in used:
        for part in Selection.parse(text).parts:
            objective = part.objective or "erase"
            concepts = [c for c, o in known if o == objective]
            for target in options.targets:
                if part.objective and target not in concepts:
                    raise CadRayError(f"selection {text!r} ranks {target!r} by its {objective} scores, but the run "
                                      f"has none; list {objective} among its objectives in the config")
                if part.contrast != "none" and not contrast_concepts(target, concepts, part.contrast):
                    raise CadRayError(f"selection {text!r} ranks {target!r} against other concepts "
                                      f"({part.contrast}), but the run has {objective} scores for "
                                      f"{', '.join(concepts)} only; attribute them too, or choose contrast "
                                      "'others' or 'none'")


def run(config: AttributionConfig, root: str, executor, overwrite: bool = False) -> dict:
    """The stage: make the fine-tuned edits (units: (edit, target) on actors); with a search, pick each target's
    setting on the selection split; then generate and judge the test split (units: blocks of rows, through
    Ray Data), each block written as it finishes so that a killed driver resumes; finish with evaluation/ and
    evaluation_summary/."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    options = config.evaluation
    run_root = RunRoot(root)
    run_root.check_writable()
    store = ScoreStore(root)
    if store.manifest["config_hash"] != config.config_hash():
        raise CadRayError(f"--config describes another attribution run than the one in {root}")
    check_targets(options, store, root)
    prompts = prompt_panels(options)
    check_prompt_labels(prompts, options, store)
    started = time.time()
    guidance = executor.first(EditWorker, "default_guidance")
    if options.guidance is None:
        config = config.model_copy(update={"evaluation": options.model_copy(update={"guidance": guidance})})
        options = config.evaluation
    if not overwrite and run_root.exists("evaluation", "part-0.parquet"):
        previous = evaluation_options_hash(run_root)
        if previous is not None and previous != options.options_hash():
            raise CadRayError(f"{root} holds an evaluation made with other options; pass --overwrite to replace it "
                              "or evaluate into a copy of the root")
    if overwrite:
        run_root.remove("_evaluation")
    edit_key = finetune_key(options, store)
    todo = [(e, t) for t in options.targets for e in ("finetune", "cad-finetune")
            if (e in options.edits or (e == "finetune" and RECOVERY in options.edits))
            and run_root.read_manifest(*edit_folder(e, t), EDIT_MARKER) != edit_key]
    for _ in executor.map(EditWorker, "make_edit", todo, "fine-tuned edits"):
        pass
    executor.close_pool(EditWorker)
    # what every image depends on besides its row; in each block's name
    meta = {"fingerprint": store.fingerprint, "config_hash": store.manifest["config_hash"],
            "images": {k: v for k, v in options.model_dump(mode="json").items()
                       if k in ("seed", "steps", "judge", "finetune", "selection")
                       or (k == "uce" and "uce" in options.edits)}}
    counts = {"computed": 0, "skipped": 0, "actors": 0}

    def judge(rows: pd.DataFrame) -> pd.DataFrame:
        """Generate and judge `rows` in blocks; finished blocks are read back, not made again."""
        rows = rows.reset_index(drop=True)
        blocks = {}
        for start in range(0, len(rows), options.batch_size):
            part = rows.iloc[start:start + options.batch_size]
            blocks[block_name(part, meta)] = part
        pending = {n: b for n, b in blocks.items() if not block_is_done(run_root, n, len(b))}
        counts["computed"] += len(pending)
        counts["skipped"] += len(blocks) - len(pending)
        names = list(pending)
        waiting = {}
        bar = tqdm(total=len(blocks), initial=len(blocks) - len(pending), unit="block", desc="images",
                   disable=not executor.progress)

        def save(frame):  # rows of a block may come in several batches; a block is written once it is whole
            for block, group in frame.groupby("block"):
                name = names[int(block)]
                waiting[name] = pd.concat([waiting[name], group]) if name in waiting else group
                if len(waiting[name]) == len(pending[name]):
                    run_root.write_table(pa.Table.from_pandas(waiting.pop(name).drop(columns=["block"]),
                                                              preserve_index=False), "_evaluation", name,
                                         metadata=dict(meta, rows=len(pending[name])))
                    bar.update(1)

        frames = [pending[n].assign(block=i) for i, n in enumerate(names)]
        counts["actors"] = max(counts["actors"], executor.judge_frames(
            ImageJudge, frames, options.batch_size, {"config": config, "root": root}, save))
        bar.close()
        return pd.concat([run_root.read_table("_evaluation", n).to_pandas() for n in blocks], ignore_index=True)

    picks, searched = search_rounds(options, prompts, judge) if options.search else ({}, 0)
    table = judge(plan_test_rows(options, prompts, picks))
    summary, images = finish_evaluation(run_root, store, options, table, picks)
    return {"summary": summary, "images": images + searched, "images_selection": searched, "picks": picks,
            "actors": max(counts["actors"], 1), "run_seconds": time.time() - started, "edits_made": len(todo),
            "blocks_computed": counts["computed"], "blocks_skipped": counts["skipped"]}


def finish_evaluation(run: RunRoot, store: ScoreStore, options: EvaluationOptions, table: pd.DataFrame,
                      picks: dict):
    """evaluation/ (one row per test-split image, in a fixed order) and evaluation_summary/."""
    import pyarrow as pa

    key = ["edit", "target", "selection", "ratio", "guidance", "draw", "label", "prompt", "seed"]
    table = table.sort_values([k for k in key if k in table], kind="stable").reset_index(drop=True)
    # the Frechet distance's reference: the real digits for the digits model, else the reference images the judge
    # names (fd-dinov2's `reference`), else none
    reference = None
    if "features" in table:
        reference = real_features() if store.manifest.get("model") == "builtin:digits" \
            else reference_features(options.judge)
    summary = summarize_evaluation(table, reference, picks)
    meta = evaluation_metadata(store.manifest, options)
    meta["picks"] = [[edit, target, *pick] for (edit, target), pick in sorted(picks.items())]
    stored = table.drop(columns=[c for c in ("features",) if c in table])
    run.write_table(pa.Table.from_pandas(stored, preserve_index=False), "evaluation", "part-0.parquet", metadata=meta)
    run.write_table(pa.Table.from_pandas(summary, preserve_index=False), "evaluation_summary", "part-0.parquet",
                    metadata=meta)
    return summary, len(table)
