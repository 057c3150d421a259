"""The evaluation stage (no Ray): edits judged by images. Its units are the fine-tuned edits (`EditWorker`) and
blocks of image rows (`ImageJudge` generates and judges a batch); `finish_evaluation` writes the tables and
`run` puts it all in order on an executor (cad_ray.distributed).

One row per image: (edit, target, ratio, guidance, draw, prompt, seed, label). `edit` is `none` for the unedited
model; `target` is the edited concept; `label` is what the prompt asks for. Image k of a prompt starts from
the noise of (evaluation seed, seed), so the same prompt and seed give comparable images before and after
every edit. The edits are the records of `cad_ray.method.edits.EDITS`:

    cad-erase, random, cad-amplify       zeroing, at each ratio (random: as many components as cad-erase,
                                         drawn per target; `draw` numbers its independent draws)
    gradient, magnitude                  zeroing as cad-erase does, ranked by |dJ/dw| or |w| instead of w * dJ/dw
    cad-erase-published                  cad-erase by the published selection
    conceptprune                         zeroing by ConceptPrune's rule, the ratio being its skill ratio
    uce                                  UCE's closed-form edit of the cross-attention keys and values
    finetune, cad-finetune               gradient steps (see cad_ray.method.editing), saved as model folders
    finetune+cad-amplify                 CAD-Amplify on the finetune-erased model: recovery

The parts: prompt panels (`stages.panels`, the digits panel in `cad_ray.digits.prompts`), the workers
(`stages.edit_workers`), the search (`stages.search`) and the summary (`stages.summary`). The baselines are in
cad_ray.method.baselines.
"""

from __future__ import annotations

import hashlib
import json
import time

import pandas as pd

from cad_ray.config import AttributionConfig, EvaluationOptions
from cad_ray.digits.concepts import concept_kind
from cad_ray.errors import CadRayError
from cad_ray.judges import reference_features
from cad_ray.method.editing import Selection, contrast_concepts
from cad_ray.method.edits import EDITS, NONE, RECOVERY, picked_by  # noqa: F401 (RECOVERY, picked_by re-exported)
from cad_ray.store import PART_FILE, RunRoot, ScoreStore
# the parts, re-exported under their old paths
from cad_ray.digits.prompts import SELECTION_SEED_OFFSET, digits_prompt_set  # noqa: F401
from cad_ray.stages.edit_workers import (EDIT_COST, EDIT_MARKER, EditWorker, ImageJudge, brightness, edit_folder,  # noqa: F401
                                         finetune_key, finetune_options, load_scored_model, setting_meta)
from cad_ray.stages.panels import (LABEL_COLUMNS, check_prompt_labels, edit_rows, label_key, names_label,  # noqa: F401
                                   own_wording, prompt_panels, read_prompt_set, target_kind, target_rows)
from cad_ray.stages.search import checked_index, choose_settings, is_clean, search_rounds  # noqa: F401
from cad_ray.stages.summary import (BRIGHTNESS_MIN, accuracies, brightness_kept, real_features,  # noqa: F401
                                    retained, summarize_evaluation)


def edit_settings(edit: str, options: EvaluationOptions, target: str) -> list[tuple[str, float]]:
    """The (selection, ratio) settings an edit's rows of `target` are made at without a search pick
    (`Edit.settings`)."""
    record = EDITS[edit]
    if record.settings == "single":
        return [(record.selection, 0.0)]  # no selection takes its components: no ratio, as for `none`
    if record.settings == "finetune":
        ft = finetune_options(options, target)
        return [(ft.selection or options.selection, ft.ratio)]
    if record.settings == "recovery":
        return [(options.selection, r) for r in options.recovery_ratios]
    return [(record.selection or options.selection, r) for r in options.ratios]


def plan_test_rows(options: EvaluationOptions, prompts: pd.DataFrame, picks: dict) -> pd.DataFrame:
    """Every test-split row: `none` (at each guidance the edits are judged at), then each edit of each target.
    `picks[(edit, target)]` is the searched (selection, ratio) of a searched edit (the edits that follow one
    use its pick); without a pick every setting of `edit_settings` is made."""
    test = prompts[prompts["split"] == "test"]
    frames = [edit_rows(NONE, "", "", 0.0, options.guidance, test)]
    if any(EDITS[e].guidance == "amplify_guidance" for e in options.edits):
        frames.append(edit_rows(NONE, "", "", 0.0, options.amplify_guidance, test))
    for target in options.targets:
        for edit in options.edits:
            record = EDITS[edit]
            guidance = getattr(options, record.guidance)
            source = picked_by(edit)
            picked = (source, target) in picks
            settings = [picks[(source, target)][:2]] if picked else edit_settings(edit, options, target)
            for selection, ratio in settings:
                frames.append(edit_rows(edit, target, selection, ratio, guidance, test))
                if record.draws:  # the further draws ask only whether the target survives them
                    asked = test[target_rows(test, target)]
                    frames += [edit_rows(edit, target, selection, ratio, guidance, asked, draw=d)
                               for d in range(1, options.random_draws)]
    return pd.concat(frames, ignore_index=True)


def evaluation_metadata(manifest: dict, options: EvaluationOptions) -> dict:
    return {"fingerprint": manifest["fingerprint"], "config_hash": manifest["config_hash"],
            "options": json.loads(options.model_dump_json()), "options_hash": options.options_hash()}


def evaluation_options_hash(run: RunRoot) -> str | None:
    """The options hash stored in an existing evaluation table, if any."""
    footer = run.footer("evaluation", PART_FILE)
    return footer.metadata.get("options_hash") if footer else None


def only_lists_differ(run: RunRoot, options: EvaluationOptions) -> bool:
    """Whether the root's evaluation was made with these options but for other edits or targets: every block
    is named by its rows, so the images of the edits and targets both have are read back, not made again."""
    footer = run.footer("evaluation", PART_FILE)
    try:
        previous = EvaluationOptions.model_validate(footer.metadata["options"])
    except Exception:  # an evaluation written by another version of the options: not comparable
        return False
    return previous.options_hash(lists=False) == options.options_hash(lists=False)


ROW_KEY = ["edit", "target", "selection", "ratio", "guidance", "draw", "prompt", "seed", "split"]
SETTING_KEY = ["edit", "target", "selection", "ratio", "guidance", "draw"]  # one edit setting's rows


def block_name(rows: pd.DataFrame, meta: dict) -> str:
    """A block file is named by a hash of its rows and of everything its images depend on, so a block from
    other options, another model or other scores is never taken for this one (search passes included)."""
    text = json.dumps(meta, sort_keys=True) + rows[ROW_KEY].to_csv(index=False)
    return f"block-{hashlib.sha256(text.encode()).hexdigest()[:20]}.parquet"


def block_is_done(run: RunRoot, name: str, rows: int) -> bool:
    """A block file counts only if it is whole (footer) and has its rows."""
    return run.ours("_evaluation", name, owner={}, keys=(), rows=rows) is not None


def check_targets(options: EvaluationOptions, store: ScoreStore, root: str) -> None:
    """Every edit of every target has the scores it needs in the run (`Edit.needs`)."""
    known = {(c, o) for c, o in store.concepts().itertuples(index=False)}
    for target in options.targets:
        for edit in options.edits:
            objective = EDITS[edit].needs
            if objective is None:
                continue
            if (target, objective) not in known:
                hint = f" (list {objective} among its objectives)" if objective not in ("erase", "amplify") else ""
                raise CadRayError(f"edit {edit} of {target!r} needs {objective} scores for it in {root}{hint}; "
                                  f"the run has {', '.join(sorted(f'{c}/{o}' for c, o in known))}")
            store.check_whole("scores", target, objective)
    check_finetune_kinds(options, store.concepts()["concept"])
    check_contrasts(options, store)


def check_finetune_kinds(options: EvaluationOptions, concepts) -> None:
    """A kind in `finetune.kinds` that no concept of the run (`concepts`) has is a typo or a stale entry: its
    settings would never apply. Checked against the run's concepts, not the targets, so that `--targets` may
    leave a kind out of one evaluation."""
    kinds = {concept_kind(c) for c in concepts}
    unused = sorted(set(options.finetune.kinds) - kinds)
    if unused:
        raise CadRayError(f"evaluation.finetune.kinds names {', '.join(unused)}, a kind no concept of the run has "
                          f"(its kinds: {', '.join(sorted(str(k) for k in kinds))}): its settings would never apply")


def check_contrasts(options: EvaluationOptions, store: ScoreStore) -> None:
    """A selection part of another objective (`prior:`) needs the targets' scores of it, and a contrast needs
    other concepts' scores of the part's objective in the run: refuse before any work."""
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
                if part.contrast != "none" and not contrast_concepts(target, concepts, part.contrast, concept_kind):
                    raise CadRayError(f"selection {text!r} ranks {target!r} against other concepts "
                                      f"({part.contrast}), but the run has {objective} scores for "
                                      f"{', '.join(concepts)} only; attribute them too, or choose contrast "
                                      "'others' or 'none'")


def run(config: AttributionConfig, root: str, executor, overwrite: bool = False) -> dict:
    """The stage: make the fine-tuned edits (units: (edit, target) on actors); with a search, pick each target's
    setting on the selection split; then generate and judge the test split (units: blocks of rows, on actors
    that keep the model loaded), each block written as it finishes so that a killed driver resumes; finish with evaluation/ and
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
    made_after = {EDITS[e].after for e in options.edits}  # fine-tuned models other edits are applied on
    todo = [(e, t) for t in options.targets for e, record in EDITS.items() if record.applied_by == "fine-tuning"
            and (e in options.edits or e in made_after)
            and run_root.read_manifest(*edit_folder(e, t), EDIT_MARKER) != finetune_key(options, store, t)]
    if options.guidance is None:  # the model's own, read on a pool the stage opens anyway (each loads the model)
        guidance = executor.first(EditWorker if todo else ImageJudge, "default_guidance")
        config = config.model_copy(update={"evaluation": options.model_copy(update={"guidance": guidance})})
        options = config.evaluation
    if not overwrite and run_root.exists("evaluation", PART_FILE):
        previous = evaluation_options_hash(run_root)
        if previous is not None and previous != options.options_hash() and not only_lists_differ(run_root, options):
            raise CadRayError(f"{root} holds an evaluation made with other options; pass --overwrite to replace it "
                              "or evaluate into a copy of the root")
    if overwrite:
        run_root.remove("_evaluation")
    for _ in executor.map(EditWorker, "make_edit", todo, "fine-tuned edits"):
        pass
    executor.close_pool(EditWorker)
    # what every image depends on besides its row; in each block's name
    meta = {"fingerprint": store.fingerprint, "config_hash": store.manifest["config_hash"],
            "images": {**{k: v for k, v in options.model_dump(mode="json").items()
                          if k in ("seed", "steps", "judge", "selection")}, "finetune": options.finetune.named()}}
    counts = {"computed": 0, "skipped": 0, "actors": 0}
    metas = {}  # (edit, target) -> its images' meta: a fine-tuned edit's read from its folder once

    def meta_of(edit: str, target: str) -> dict:
        if (edit, target) not in metas:
            metas[(edit, target)] = setting_meta(meta, run_root, options, edit, target)
        return metas[(edit, target)]

    def judge(rows: pd.DataFrame) -> pd.DataFrame:
        """Generate and judge `rows` in blocks; finished blocks are read back, not made again."""
        rows = rows.reset_index(drop=True)
        blocks = {}
        # a block never holds two edit settings: another edit or target in the list leaves every other
        # setting's blocks (and names) as they were
        for (edit, target, *_), setting in rows.groupby(SETTING_KEY, sort=False, dropna=False):
            for start in range(0, len(setting), options.batch_size):
                part = setting.iloc[start:start + options.batch_size]
                blocks[block_name(part, meta_of(edit, target))] = part
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
        counts["actors"] = max(counts["actors"], executor.judge_frames(ImageJudge, frames, save))
        bar.close()
        return pd.concat([run_root.read_table("_evaluation", n).to_pandas() for n in blocks], ignore_index=True)

    picks, searched = search_rounds(options, prompts, judge) if options.search else ({}, 0)
    table = judge(plan_test_rows(options, prompts, picks))
    executor.close_pool(ImageJudge)
    summary, images = finish_evaluation(run_root, store, options, table, picks)
    return {"summary": summary, "images": images + searched, "images_selection": searched, "picks": picks,
            "actors": max(counts["actors"], 1), "run_seconds": time.time() - started, "edits_made": len(todo),
            "blocks_computed": counts["computed"], "blocks_skipped": counts["skipped"]}


def edit_seconds(run: RunRoot, edit: str, target: str) -> float:
    """How long a fine-tuned edit took to make (its folder's cost file); NaN for the other edits, whose cost is
    the attribution's, shared by every edit of the run, or a closed form of seconds made where its images are."""
    if edit not in EDITS or EDITS[edit].applied_by != "fine-tuning":
        return float("nan")
    cost = run.read_manifest(*edit_folder(edit, target), EDIT_COST)
    return float(cost["seconds"]) if cost else float("nan")  # an edit made before costs were kept


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
    summary["edit_seconds"] = [edit_seconds(run, r.edit, r.target) for r in summary.itertuples()]
    meta = evaluation_metadata(store.manifest, options)
    meta["picks"] = [[edit, target, *pick] for (edit, target), pick in sorted(picks.items())]
    stored = table.drop(columns=[c for c in ("features",) if c in table])
    run.write_table(pa.Table.from_pandas(stored, preserve_index=False), "evaluation", PART_FILE, metadata=meta)
    run.write_table(pa.Table.from_pandas(summary, preserve_index=False), "evaluation_summary", PART_FILE,
                    metadata=meta)
    return summary, len(table)
