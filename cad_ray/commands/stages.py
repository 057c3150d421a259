"""The stages after the attribution: `cad-ray validate`, `cad-ray evaluate` and `cad-ray edit`, on a run root.
Libraries (torch, numpy, pandas, pyarrow, pydantic, Ray), and the modules of cad_ray that import them, are
imported inside the commands, lazy for start-up speed (`cad-ray --help` imports none of them)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from cad_ray.errors import CadRayError
from cad_ray.method.edits import EDITS, picked_by


def stage_config(root: str, config_file: str | None, section: str, overrides: dict):
    """The run's config for a later stage: the --config file if given (checked against the root by the stage),
    else the config stored in the root's manifest; `overrides` replace fields of its `section`."""
    from cad_ray.config import load_config, parse_config
    from cad_ray.store import PART_FILE, RunRoot

    if config_file:
        config = load_config(config_file)
    else:
        run = RunRoot(root)
        manifest = run.read_manifest()
        if manifest is None:
            raise CadRayError(f"no attribution run in {root}: run 'cad-ray attribute' with this --root first")
        # the options the root was made with: this stage's own earlier run, else the attribution's config file
        stage_options = dict(manifest.get("stage_options", {}))
        earlier = (run.read_manifest("_validation.json") or {}).get("options") if section == "validation" else \
            (run.footer("evaluation", PART_FILE) or [{}])[0].get("options")
        if earlier:
            stage_options[section] = earlier
        config = parse_config({**manifest["config"], **stage_options}, f"{root}/_manifest.json")
    data = config.model_dump(mode="json")
    data[section].update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data, "options")


def cmd_validate(args: argparse.Namespace) -> None:
    import pandas as pd

    from cad_ray.distributed import run_validation

    config = stage_config(args.root, args.config, "validation", {
        "ablations": args.ablations, "fractions": args.fractions, "concepts": args.concepts,
        "held_out": False if args.in_sample else None})
    config = config.model_copy(update={"workers": args.workers or config.workers,
                                       "device": args.device or config.device})
    result = run_validation(config, args.root, address=args.address, overwrite=args.overwrite, local=args.local,
                            progress=not args.quiet, keep_workers=args.keep_workers)
    options = config.validation
    summary = result["summary"]
    print(f"validation complete in {args.root}: {len(summary['concept'].unique())} concept(s), "
          f"{options.ablations} ablations at each fraction {options.fractions}, "
          f"{'held-out' if options.held_out else 'in-sample'} evaluation points, {result['shards_computed']} "
          f"shards computed, {result['shards_skipped']} already done, {result['run_seconds']:.1f} s")
    if args.quiet:
        return
    table = summary.groupby(["estimator", "fraction"])[["pearson", "spearman", "pearson_ablated_base"]].mean()
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print("\nmean over concepts, test split (actual = change of J with the base term frozen):")
        print(table.unstack("fraction").to_string())
        print("\nlocalization (share of total |score| in the top components):")
        print(result["localization"][["concept", "top_0.1%_share", "top_1%_share"]].to_string(index=False))
    print(f"\ntables: {args.root}/validation, validation_summary, localization, overlap; plots: "
          f"{args.root}/plots/validation/")


def cmd_evaluate(args: argparse.Namespace) -> None:
    import pandas as pd

    from cad_ray.distributed import run_evaluation

    config = stage_config(args.root, args.config, "evaluation", {
        "targets": args.targets, "edits": args.edits, "ratios": args.ratios, "prompts": args.prompts,
        "images_per_prompt": args.images_per_prompt})
    config = config.model_copy(update={"workers": args.workers or config.workers,
                                       "device": args.device or config.device})
    result = run_evaluation(config, args.root, address=args.address, local=args.local, progress=not args.quiet,
                            overwrite=args.overwrite, keep_workers=args.keep_workers)
    summary = result["summary"]
    print(f"evaluation complete in {args.root}: {result['images']} images judged by {result['actors']} actor(s), "
          f"{result['edits_made']} fine-tuned edit(s) made, {result['blocks_computed']} blocks computed, "
          f"{result['blocks_skipped']} already done, {result['run_seconds']:.1f} s")
    if args.quiet:
        return
    columns = ["edit", "target", "ratio", "share", "guidance", "zeroed", "target_accuracy", "others_accuracy",
               "worst_other_retained", "brightness_kept", "fd_rise", "best"]
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(summary[columns].to_string(index=False))
        probes = result.get("probes")
        if probes:
            print(f"\nprobes: {probes['units']} units ({probes['units_computed']} computed), "
                  f"{probes['seconds']:.1f} s; recovery of the target beside the never-learned level:")
            shown = probes["summary"][["edit", "target", "probe", "setting", "recovery", "unedited",
                                       "never_learned", "within"]]
            print(shown.to_string(index=False))
            print(probes["verdicts"].to_string(index=False))
    print(f"\ntables: {args.root}/evaluation (one row per image), {args.root}/evaluation_summary"
          + (f", {args.root}/probes, {args.root}/probe_summary, {args.root}/probe_verdicts"
             if result.get("probes") else ""))


def cmd_stop_workers(args: argparse.Namespace) -> None:
    from cad_ray.distributed import stop_kept_workers

    print(f"stopped {stop_kept_workers(args.address)} kept worker(s) on {args.address}")


def cmd_edit(args: argparse.Namespace) -> None:
    """Any edit of the registry (`cad_ray.method.edits`), made as the evaluation makes it, saved as a folder."""
    from cad_ray.method.editing import Selection, check_fingerprint, check_ratio
    from cad_ray.models import load_model
    from cad_ray.store import ScoreStore

    edit = EDITS.get(args.edit)
    if edit is None:
        raise CadRayError(f"unknown edit {args.edit!r}; 'cad-ray edit' makes {', '.join(EDITS)}")
    if edit.applied_by == "closed-form":
        if args.ratio is not None or args.count is not None:
            raise CadRayError(f"{edit.name} is a closed-form edit: leave out --ratio and --count")
    elif edit.applied_by == "fine-tuning":
        if args.ratio is not None or args.count is not None:
            raise CadRayError(f"{edit.name} is made by fine-tuning, as the root's evaluation.finetune options say: "
                              "leave out --ratio and --count")
    elif (args.ratio is None) == (args.count is None):
        raise CadRayError("give --ratio or --count")
    elif args.count is not None and (edit.after or edit.ranks != "scores"):
        raise CadRayError(f"--count ranks the run's scores; {edit.name} does not: give --ratio")
    if args.ratio is not None:
        check_ratio(args.ratio)
    from cad_ray.config import check_selection_prefixes

    if args.selection is not None:
        check_selection_prefixes(args.selection)  # before any reading: a selection the parser would misread
    from cad_ray.store.root import check_output

    out = Path(args.out)
    check_output(args.out, folder=True)  # not a file, not a folder that holds anything, not inside a run root
    if not Path(os.path.realpath(out)).name:
        raise CadRayError(f"--out {args.out} names no new folder for the edited model")
    store = ScoreStore(args.root)
    model = load_model(args.model if args.model else store.config.model)
    check_fingerprint(model, store.fingerprint)
    if args.selection is None and edit.zeroes and not edit.selection:
        args.selection = _recommended_selection(args.root, edit, args.target)
    selection = Selection.parse(edit.selection or args.selection) if edit.zeroes else None
    if selection is not None and edit.method:
        selection = selection.with_method(edit.method, edit.contrast)
    target = Path(os.path.realpath(out))  # '.' or 'x/..' has no name to put a temporary folder beside
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    made = tmp  # the outermost folder this command creates: removed again if the edit fails
    while not made.parent.exists():
        made = made.parent
    try:  # before any compute: a place that cannot be written is said now, not after the edit
        tmp.mkdir(parents=True, exist_ok=True)  # exist_ok: one left by a killed edit of the same pid
    except OSError as e:
        raise CadRayError(f"cannot write --out {args.out}: {e.strerror or e}") from None
    try:
        what = _make_edit(args, edit, store, model, selection, tmp)
    except BaseException:
        shutil.rmtree(made, ignore_errors=True)
        raise
    if target.exists():
        target.rmdir()  # empty, checked above
    os.replace(tmp, target)
    print(f"wrote {out}: {args.edit} of {args.target!r}, {what}; load it with --model {out}")


def _recommended_selection(root: str, edit, target: str) -> str:
    """The selection a zeroing edit takes where --selection is not given: the one the root's evaluation search
    picked for the target, else the root's evaluation.selection where its config names one. The default
    `all/global/none` ranks every scored tensor together: at an erase's ratio it breaks the model, so it is
    never taken unasked."""
    from cad_ray.store import PART_FILE, RunRoot

    footer = RunRoot(root).footer("evaluation", PART_FILE)
    for pick in ((footer[0].get("picks") if footer else None) or []):
        if list(pick[:2]) == [picked_by(edit.name), target]:
            return pick[2]
    chosen = stage_config(root, None, "evaluation", {}).evaluation.selection
    if chosen == "all/global/none":
        raise CadRayError(f"the run in {root} names no selection for {edit.name} (no search picked one for "
                          f"{target!r}, and its evaluation.selection is all/global/none, which ranks every scored "
                          "tensor together and breaks the model at an erase's ratio): give --selection, e.g. "
                          "attn2/global/kind-mean")
    return chosen


def _make_edit(args: argparse.Namespace, edit, store, model, selection, tmp: Path) -> str:
    """Apply the edit to `model` and save it to `tmp`; returns what was done."""
    from cad_ray.method.editing import select, unselectable, zero_components
    from cad_ray.method.scopes import never_selected
    from cad_ray.stages.edit_workers import edit_masks, edit_uce

    if edit.applied_by == "closed-form":
        zeroed = edit_uce(store, model, args.target)
        model.save_pretrained(tmp)
        what = f"{zeroed} cross-attention key/value projections rewritten"
    elif edit.applied_by == "fine-tuning" or edit.after:
        what = _edit_on_finetuned(args, edit, store, model, selection, tmp)
    else:
        if args.count is not None:  # a count per unit: the plain ranking of the run's scores
            if selection.also is not None:
                raise CadRayError(f"--count ranks one table; selection {selection} is a union: give --ratio")
            masks = select(unselectable(store.tensor_scores(args.target, edit.objective, selection.method),
                                        never_selected(model)),
                           count=args.count, granularity=selection.granularity, largest=edit.largest)
        else:
            seed = stage_config(args.root, None, "evaluation", {}).seed if edit.ranks == "random" else 0
            masks = edit_masks(edit.name, args.target, selection, args.ratio, 0, store, seed, never_selected(model))
        zeroed = zero_components(model, masks)
        model.save_pretrained(tmp)
        what = f"{zeroed} components zeroed ({selection})"
    return what


def _edit_on_finetuned(args: argparse.Namespace, edit, store, model, selection, tmp: Path) -> str:
    """A fine-tuned edit, or one made on a fine-tuned model: the fine-tuned model is the one 'cad-ray evaluate'
    saved in the root (made there now, as the evaluation makes it, where it is missing or stale), then the edit
    is applied as the evaluation applies it. Saves the edited model to `tmp`; returns what was done."""
    from cad_ray.stages.edit_workers import EDIT_MARKER, Editor, EditWorker, edit_folder, finetune_key
    from cad_ray.store import RunRoot

    config = stage_config(args.root, None, "evaluation", {})
    options = config.evaluation
    if edit.name not in options.edits:  # as an evaluation that makes it: a recovery needs its scores
        options = options.model_copy(update={"edits": [*options.edits, edit.name]})
        config = config.model_copy(update={"evaluation": options})
    if args.target not in [c.name for c in config.concepts]:
        raise CadRayError(f"concept {args.target!r} is not in the run; it has "
                          f"{', '.join(c.name for c in config.concepts)}")
    run = RunRoot(args.root)
    finetuned = edit.after or edit.name
    made = run.read_manifest(*edit_folder(finetuned, args.target), EDIT_MARKER)
    if made != finetune_key(options, store, args.target):
        run.check_writable()
        EditWorker(config, args.root).make(finetuned, args.target)
    editor = Editor(config, run, model, store)
    text = str(selection) if selection is not None else ""
    ratio = 0.0 if args.ratio is None else args.ratio  # a fine-tuned edit alone: no selection's ratio
    with editor.applied(edit.name, args.target, text, ratio):
        model.save_pretrained(tmp)
    zeroed = editor.zeroed(edit.name, args.target, text, ratio)
    where = run.uri_under(*edit_folder(finetuned, args.target))
    return f"fine-tuned ({where})" + (f", then {zeroed} components zeroed ({selection})" if edit.zeroes else "")
