"""The evaluation stage (no Ray): edits judged by images. Its units are the fine-tuned edits (`EditWorker`) and
blocks of image rows (`ImageJudge` generates and judges a batch); `finish_evaluation` writes the tables and
`run` puts it all in order on an executor (cad_ray.distributed).

One row per image: (edit, target, ratio, guidance, prompt, seed, label). `edit` is `none` for the unedited
model; `target` is the edited concept; `label` is what the prompt asks for. Image k of a prompt starts from
the noise of (evaluation seed, seed), so the same prompt and seed give comparable images before and after
every edit. Edits:

    cad-erase, random, cad-amplify       zeroing, at each ratio (random: as many components as cad-erase)
    finetune, cad-finetune               gradient steps (see cad_ray.method.editing), saved as model folders
    finetune+cad-amplify                 CAD-Amplify on the finetune-erased model: recovery
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cad_ray.config import AttributionConfig, EvaluationOptions
from cad_ray.digits import DIGIT_WORDS, canonical_prompt
from cad_ray.method.editing import ZEROING_EDITS, check_fingerprint, random_like, select
from cad_ray.errors import CadRayError
from cad_ray.store import RunRoot, ScoreStore, partition

RECOVERY = "finetune+cad-amplify"
LABEL_COLUMNS = ("class", "artist", "categories", "label")


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DigitsJudge:
    """The digits world's judges: the digit (the verdict), the colour, and digit-judge features for the Frechet
    distance to real digits."""

    def __init__(self):
        from cad_ray.digits.judges import builtin_judges

        self.judges = builtin_judges()

    def judge(self, images: np.ndarray, labels: list[str]) -> dict:
        from cad_ray.digits import COLOUR_NAMES

        predicted = [DIGIT_WORDS[d] for d in self.judges.digits(images)]
        return {"predicted": predicted, "correct": [p == l for p, l in zip(predicted, labels)],
                "colour": [COLOUR_NAMES[c] for c in self.judges.colours(images)],
                "features": list(self.judges.features(images).astype(np.float32))}


class ClassifierJudge:
    """An image classifier as a judge, e.g. an ImageNet ResNet-50 for the Imagenette classes: a TorchScript file
    (`torch.jit.save` of the network; TorchScript runs no Python on load), the class names in output order (a
    list or a text file with one per line), and how a prompt's label maps to a class name (default: itself).
    Images are resized to `size` and normalised with `mean`/`std`; logits are kept as features."""

    def __init__(self, model_file: str, classes: list[str] | str, size: int = 224, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, label_to_class: dict[str, str] | None = None):
        import torch

        try:
            self.network = torch.jit.load(model_file, map_location="cpu").eval()
        except Exception as e:
            raise CadRayError(f"cannot load the classifier judge {model_file}: {e}") from None
        if isinstance(classes, str):
            classes = [line.strip() for line in Path(classes).read_text().splitlines() if line.strip()]
        self.classes, self.size, self.label_to_class = list(classes), size, dict(label_to_class or {})
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def judge(self, images: np.ndarray, labels: list[str]) -> dict:
        import torch

        x = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            logits = self.network((x - self.mean) / self.std)
        predicted = [self.classes[k] for k in logits.argmax(dim=1).tolist()]
        wanted = [self.label_to_class.get(l, l) for l in labels]
        return {"predicted": predicted, "correct": [p == w for p, w in zip(predicted, wanted)],
                "features": list(logits.numpy().astype(np.float32))}


BUILTIN_JUDGES = {"digits": DigitsJudge, "classifier": ClassifierJudge}
JUDGE_ENTRY_POINTS = "cad_ray.judges"  # plugins: [project.entry-points."cad_ray.judges"] name = "module:Class"


def registered_judges() -> dict:
    """Judges a config may name: the built-ins and the plugins installed under the `cad_ray.judges` entry-point
    group (their code is imported only when a config names them)."""
    from importlib.metadata import entry_points

    return {**{ep.name: ep for ep in entry_points(group=JUDGE_ENTRY_POINTS)}, **BUILTIN_JUDGES}


def load_judge(spec: dict | None, model_kind: str):
    """The judge of an evaluation: `{"name": <registered judge>, **options}`, else the digits judges for the
    digits model, else none (images are generated and stored, not judged). A config never names code to import:
    only registered judges."""
    if not spec:
        return DigitsJudge() if model_kind == "digits" else None
    options = dict(spec)
    name = options.pop("name", "classifier")
    judges = registered_judges()
    if name not in judges:
        raise CadRayError(f"unknown judge {name!r} in evaluation.judge; registered judges: {', '.join(sorted(judges))}"
                          f" (plugins register under the {JUDGE_ENTRY_POINTS!r} entry-point group)")
    judge = judges[name]
    try:
        return (judge if isinstance(judge, type) else judge.load())(**options)
    except TypeError as e:
        raise CadRayError(f"judge {name!r}: {e}") from None


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
    label = next((c for c in LABEL_COLUMNS if c in table.columns), None)
    out = table.rename(columns={"evaluation_seed": "seed"})
    out["label"] = table[label].astype(str) if label else ""
    out["seed"] = out["seed"].astype(np.int64)
    return out


def digits_prompt_set(images_per_prompt: int, seed: int) -> pd.DataFrame:
    """The ten digits' colour-free prompts, `images_per_prompt` seeds each."""
    return pd.DataFrame([{"prompt": canonical_prompt(d), "label": DIGIT_WORDS[d], "seed": seed + k}
                         for d in range(10) for k in range(images_per_prompt)])


def edit_list(options: EvaluationOptions) -> list[dict]:
    """Every (edit, target, ratio, guidance) to generate, `none` first."""
    guidance = options.guidance
    edits = [{"edit": "none", "target": "", "ratio": 0.0, "guidance": guidance}]
    if "cad-amplify" in options.edits:
        edits.append({"edit": "none", "target": "", "ratio": 0.0, "guidance": options.amplify_guidance})
    for target in options.targets:
        for edit in options.edits:
            if edit in ("cad-erase", "random"):
                edits += [{"edit": edit, "target": target, "ratio": r, "guidance": guidance} for r in options.ratios]
            elif edit == "cad-amplify":
                edits += [{"edit": edit, "target": target, "ratio": r, "guidance": options.amplify_guidance}
                          for r in options.ratios]
            elif edit == "finetune":
                edits.append({"edit": edit, "target": target, "ratio": 1.0, "guidance": guidance})
            elif edit == "cad-finetune":
                edits.append({"edit": edit, "target": target, "ratio": options.finetune.ratio, "guidance": guidance})
            elif edit == RECOVERY:
                edits += [{"edit": edit, "target": target, "ratio": r, "guidance": guidance}
                          for r in options.recovery_ratios]
    return edits


def plan_rows(options: EvaluationOptions, prompts: pd.DataFrame) -> pd.DataFrame:
    rows = [dict(e, prompt=p.prompt, seed=int(p.seed), label=p.label)
            for e in edit_list(options) for p in prompts.itertuples(index=False)]
    table = pd.DataFrame(rows)
    table["guidance"] = table["guidance"].astype(float)
    return table


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
            masks = select(self.store.tensor_scores(target, "erase"), ratio=ft.ratio,
                           granularity=self.options.granularity)
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

    def _masks(self, edit: str, target: str, ratio: float):
        key = (edit, target, ratio)
        if key not in self.cache:
            granularity = self.options.granularity
            if edit == RECOVERY:
                store = ScoreStore(self.run.uri_under(*edit_folder("finetune", target)))
                if store.fingerprint != self._finetuned_fingerprint("finetune", target):
                    raise CadRayError(f"the recovery scores under {store.run.uri} were computed on another model "
                                      f"than {self.run.uri_under(*edit_folder('finetune', target), 'model')}; "
                                      "re-run 'cad-ray evaluate' with --overwrite")
                self.cache[key] = select(store.tensor_scores(target, "amplify"), ratio=ratio,
                                         granularity=granularity, largest=False)
            elif edit == "random":
                self.cache[key] = random_like(self._masks("cad-erase", target, ratio), granularity,
                                              self.config.seed)
            else:
                objective, largest = ZEROING_EDITS[edit]
                self.cache[key] = select(self.store.tensor_scores(target, objective), ratio=ratio,
                                         granularity=granularity, largest=largest)
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

    def _applied(self, edit: str, target: str, ratio: float):
        from contextlib import ExitStack, nullcontext

        from cad_ray.method.editing import edited, weights_replaced

        if edit == "none":
            return nullcontext()
        if edit in ("finetune", "cad-finetune"):
            return weights_replaced(self.model, self._finetuned(edit, target))
        stack = ExitStack()
        if edit == RECOVERY:
            stack.enter_context(weights_replaced(self.model, self._finetuned("finetune", target)))
        stack.enter_context(edited(self.model, self._masks(edit, target, ratio)))
        return stack

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        for (edit, target, ratio, guidance), rows in batch.groupby(["edit", "target", "ratio", "guidance"],
                                                                      sort=False, dropna=False):
            rows = rows.copy()
            zeroed = int(sum(m.sum() for m in self._masks(edit, target, ratio).values())) \
                if edit in ("cad-erase", "random", "cad-amplify", RECOVERY) else 0
            with self._applied(edit, target, ratio):
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
        if self.judges is None:
            return {"predicted": [""] * len(images), "correct": [False] * len(images), "image_png": pngs}
        return {**self.judges.judge(images, list(rows["label"])), "image_png": pngs}


def real_features() -> np.ndarray:
    """Digit-judge features of the real digits (the reference of the Frechet distance)."""
    from cad_ray.digits import COLOUR_NAMES, real_digits, render
    from cad_ray.digits.judges import builtin_judges

    images, _ = real_digits()
    return builtin_judges().features(np.concatenate([render(images, c) for c in COLOUR_NAMES]))


def summarize_evaluation(table: pd.DataFrame, reference: np.ndarray | None = None) -> pd.DataFrame:
    """Per (edit, target, ratio, guidance): the target's accuracy, the other labels' accuracy and the worst
    share of its unedited accuracy that another label keeps, the Frechet distance of judge features to real
    digits and its rise over the unedited model; `best` marks each (edit, target)'s best trade-off ratio."""
    from cad_ray.digits.judges import frechet_distance

    none = table[table["edit"] == "none"]
    base_acc = none.groupby(["guidance", "label"])["correct"].mean()
    fd_none = {}
    rows = []
    for (edit, target, ratio, guidance), g in table.groupby(["edit", "target", "ratio", "guidance"], sort=True):
        acc = g.groupby("label")["correct"].mean()
        fd = float("nan")
        if reference is not None and "features" in g:
            fd = frechet_distance(np.stack(g["features"].to_numpy()), reference)
        if edit == "none":
            fd_none[guidance] = fd
        base = base_acc.loc[guidance] if guidance in base_acc.index.get_level_values(0) else acc
        others = [l for l in acc.index if l != target]
        retained = [acc[l] / base[l] for l in others if base.get(l, 0) > 0]
        rows.append({"edit": edit, "target": target, "ratio": ratio, "guidance": guidance, "images": len(g),
                     "zeroed": int(g["zeroed"].iloc[0]),
                     "target_accuracy": float(acc.get(target, np.nan)) if target else float("nan"),
                     "target_accuracy_unedited": float(base.get(target, np.nan)) if target else float("nan"),
                     "others_accuracy": float(acc[others].mean()) if others else float("nan"),
                     "worst_other_retained": float(min(retained)) if retained else float("nan"),
                     "fd": fd})
    summary = pd.DataFrame(rows)
    summary["fd_rise"] = [r.fd / fd_none.get(r.guidance, np.nan) - 1 for r in summary.itertuples()]
    summary["best"] = False
    for _, g in summary[summary["edit"] != "none"].groupby(["edit", "target"]):
        keeps = g[g["worst_other_retained"] >= 0.9]
        pick = keeps if len(keeps) else g
        if pick["target_accuracy"].notna().any():
            score = pick["target_accuracy"] if pick is keeps else pick["target_accuracy"] - pick["others_accuracy"]
            best = score.idxmax() if g["edit"].iloc[0] in ("cad-amplify", RECOVERY) else score.idxmin()
            summary.loc[best, "best"] = True
    return summary


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
    return {"finetune": options.finetune.model_dump(mode="json"), "granularity": options.granularity,
            "recovery": RECOVERY in options.edits, "fingerprint": store.fingerprint,
            "config_hash": store.manifest["config_hash"]}


def evaluation_block(block: int) -> tuple[str, str]:
    return ("_evaluation", f"block-{int(block):06d}.parquet")


def block_is_done(run: RunRoot, block: int, rows: int, meta: dict) -> bool:
    """A block file counts only if it is whole (footer), has its rows, and was made with these options and model."""
    footer = run.footer(*evaluation_block(block))
    return footer is not None and footer.rows == rows and all(footer.metadata.get(k) == v for k, v in meta.items())


def check_targets(options: EvaluationOptions, store: ScoreStore, root: str) -> None:
    """Every edit of every target has the scores it needs in the run."""
    known = {(c, o) for c, o in store.concepts().itertuples(index=False)}
    for target in options.targets:
        for edit in options.edits:
            objective = "amplify" if edit == "cad-amplify" else "erase"
            if edit != "finetune" and (target, objective) not in known:
                raise CadRayError(f"edit {edit} of {target!r} needs {objective} scores for it in {root}; "
                                  f"the run has {', '.join(sorted(f'{c}/{o}' for c, o in known))}")
            if edit != "finetune":
                store.check_whole("scores", target, objective)


def run(config: AttributionConfig, root: str, executor, overwrite: bool = False) -> dict:
    """The stage: make the fine-tuned edits (units: (edit, target) on actors), then generate and judge every
    row (units: blocks of rows, through Ray Data), each block written as it finishes so that a killed driver
    resumes; finish with evaluation/ and evaluation_summary/."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    options = config.evaluation
    run_root = RunRoot(root)
    run_root.check_writable()
    store = ScoreStore(root)
    if store.manifest["config_hash"] != config.config_hash():
        raise CadRayError(f"--config describes another attribution run than the one in {root}")
    check_targets(options, store, root)
    prompts = read_prompt_set(options.prompts) if options.prompts else digits_prompt_set(options.images_per_prompt,
                                                                                         options.seed)
    started = time.time()
    guidance = executor.first(EditWorker, "default_guidance")
    if options.guidance is None:
        config = config.model_copy(update={"evaluation": options.model_copy(update={"guidance": guidance})})
        options = config.evaluation
    edit_key = finetune_key(options, store)
    todo = [(e, t) for t in options.targets for e in ("finetune", "cad-finetune")
            if (e in options.edits or (e == "finetune" and RECOVERY in options.edits))
            and run_root.read_manifest(*edit_folder(e, t), EDIT_MARKER) != edit_key]
    for _ in executor.map(EditWorker, "make_edit", todo, "fine-tuned edits"):
        pass
    executor.close_pool(EditWorker)
    rows = plan_rows(options, prompts)
    rows["block"] = np.arange(len(rows)) // options.batch_size
    sizes = rows.groupby("block").size().to_dict()
    block_meta = {"options_hash": options.options_hash(), "fingerprint": store.fingerprint,
                  "config_hash": store.manifest["config_hash"]}
    if not overwrite and run_root.exists("evaluation", "part-0.parquet"):
        previous = evaluation_options_hash(run_root)
        if previous is not None and previous != block_meta["options_hash"]:
            raise CadRayError(f"{root} holds an evaluation made with other options; pass --overwrite to replace it "
                              "or evaluate into a copy of the root")
    pending = [b for b in sizes if not block_is_done(run_root, b, sizes[b], block_meta)]
    bar = tqdm(total=len(sizes), initial=len(sizes) - len(pending), unit="block", desc="images",
               disable=not executor.progress)
    waiting = {}

    def save(frame):  # rows of a block may come in several batches; a block is written once it is whole
        for block, group in frame.groupby("block"):
            waiting[block] = pd.concat([waiting[block], group]) if block in waiting else group
            if len(waiting[block]) == sizes[block]:
                run_root.write_table(pa.Table.from_pandas(waiting.pop(block), preserve_index=False),
                                     *evaluation_block(block), metadata=dict(block_meta, rows=int(sizes[block])))
                bar.update(1)

    actors = executor.judge_frames(ImageJudge, [rows[rows["block"] == b] for b in pending], options.batch_size,
                                   {"config": config, "root": root}, save)
    bar.close()
    summary, images = finish_evaluation(run_root, store, options, sorted(sizes))
    return {"summary": summary, "images": images, "actors": max(actors, 1), "run_seconds": time.time() - started,
            "edits_made": len(todo), "blocks_computed": len(pending), "blocks_skipped": len(sizes) - len(pending)}


def finish_evaluation(run: RunRoot, store: ScoreStore, options: EvaluationOptions, blocks: list[int]):
    """evaluation/ (one row per image, in a fixed order) and evaluation_summary/ from the judged blocks."""
    import pyarrow as pa

    table = pd.concat([run.read_table(*evaluation_block(b)).to_pandas() for b in blocks])
    table = table.drop(columns=["block"])
    key = ["edit", "target", "ratio", "guidance", "label", "prompt", "seed"]
    table = table.sort_values(key, kind="stable").reset_index(drop=True)
    # the Frechet distance's reference is the real digits; other models' quality needs a reference set of theirs
    reference = real_features() if "features" in table and store.manifest.get("model") == "builtin:digits" else None
    summary = summarize_evaluation(table, reference)
    meta = evaluation_metadata(store.manifest, options)
    stored = table.drop(columns=[c for c in ("features",) if c in table])
    run.write_table(pa.Table.from_pandas(stored, preserve_index=False), "evaluation", "part-0.parquet", metadata=meta)
    run.write_table(pa.Table.from_pandas(summary, preserve_index=False), "evaluation_summary", "part-0.parquet",
                    metadata=meta)
    return summary, len(table)
