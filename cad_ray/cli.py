"""The `cad-ray` command: thin wiring from arguments to the library.

Errors the user can fix (`CadRayError`) print as one line on stderr with exit status 1; argparse's usage
errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from cad_ray import __version__
from cad_ray.errors import CadRayError
from cad_ray.method.edits import edit_help

MODEL_HELP = ("model folder in diffusers layout or s3://bucket/prefix (default: the built-in digits model). "
              "S3 credentials and endpoint come from the environment (AWS_* variables) or ~/.aws")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _device(text: str) -> str:
    from cad_ray.config import check_device

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` to a temporary sibling, renamed onto `path` only when complete (cad_ray.store's writer)."""
    from cad_ray.store import atomic_local_file

    try:
        with atomic_local_file(str(path)) as tmp:
            write(Path(tmp))
    except OSError as e:  # a full disk, a quota: nothing half-written is left (the temporary file is removed)
        raise CadRayError(f"cannot write {path}: {e.strerror or e}") from None


def cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise CadRayError(f"--out must end in .png (image grid) or .npz (array 'images'), got {args.out!r}")
    from cad_ray.models import load_model
    from cad_ray.store.root import check_output

    check_output(args.out)  # before sampling: a run root's files, a folder, a place that cannot be written

    model = load_model(args.model, device=args.device)
    prompts = [args.prompt] * args.n
    trajectory = model.sample(prompts, seed=args.seed, guidance=args.guidance, steps=args.steps, progress=True)
    images = trajectory.images.astype(np.float32)
    if out.suffix.lower() == ".npz":
        write_atomically(out, lambda p: np.savez_compressed(p.open("wb"), images=images))
    else:
        from PIL import Image

        from cad_ray.digits.quality import image_grid

        write_atomically(out, lambda p: Image.fromarray(image_grid(images)).save(p, format="PNG"))
    print(f"wrote {out}: {args.n} image(s) of {args.prompt!r}, seed {args.seed}, "
          f"guidance {trajectory.guidance}, {len(trajectory.timesteps)} steps, model {model.source}")
    if model.kind == "digits":
        from cad_ray.digits import COLOUR_NAMES
        from cad_ray.digits.judges import NO_DIGIT_WORD, builtin_judges  # torch: imported once a command needs it

        judges = builtin_judges()
        print(judged_line(judges.digit_words(images), [COLOUR_NAMES[c] for c in judges.colours(images)],
                          NO_DIGIT_WORD))


SHOWN_ONE_BY_ONE = 16  # up to this many images, each one's verdict; beyond it, how many of each


def judged_line(digits: list[str], colours: list[str], no_digit_word: str) -> str:
    """The judges' verdicts on sampled images in one short line: each image's digit/colour for a few images, else
    a count per verdict (most frequent first). An image judged `no_digit_word` (noise) reads 'no digit'."""
    verdicts = ["no digit" if d == no_digit_word else f"{d}/{c}" for d, c in zip(digits, colours)]
    if len(verdicts) <= SHOWN_ONE_BY_ONE:
        return "judged (digit/colour): " + ", ".join(verdicts)
    counts = Counter(verdicts).most_common()
    return f"judged (digit/colour) of {len(verdicts)} images: " + ", ".join(f"{n} {v}" for v, n in counts)


def cmd_quality(args: argparse.Namespace) -> None:
    from cad_ray.models import load_model
    from cad_ray.digits.quality import digits_quality, meets_quality_bar, quality_summary
    from cad_ray.store.root import check_output

    if args.out:
        check_output(args.out)
    model = load_model(args.model, device=args.device)
    if model.kind != "digits":
        raise CadRayError("quality judges exist for the digits model only")
    summary = quality_summary(digits_quality(model, args.n, args.seed, args.guidance, args.steps))
    summary.update(seed=args.seed, guidance=args.guidance or model.default_guidance,
                   steps=args.steps or model.default_steps, meets_bar=meets_quality_bar(summary))
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        write_atomically(Path(args.out), lambda p: p.write_text(text + "\n"))


def print_top(store, concept: str, k: int, negative: bool, objective: str, method: str = "cad") -> None:
    import pandas as pd

    top = store.top(concept, k, negative=negative, objective=objective, method=method)
    top = top[top["score"] < 0] if negative else top[top["score"] > 0]  # only the sign asked for
    kind = "most negative (inhibiting)" if negative else "top positive (inducing)"
    source = {"cad": f"under the {objective} objective", "conceptprune": "by ConceptPrune's Wanda ranks",
              "gradient": f"by |dJ/dw| of the {objective} objective", "magnitude": "by |w|"}[method]
    print(f"\n{kind} components of {concept!r} {source}:")
    if len(top) < k:
        print(f"(only {len(top)} component(s) have a {'negative' if negative else 'positive'} score)")
    with pd.option_context("display.width", 200, "display.max_colwidth", 120, "display.float_format", "{:.4g}".format):
        print(top.to_string(index=False))


def print_layers(store, concept: str, objective: str) -> None:
    import pandas as pd

    layers = store.layers(concept, objective)[["tensor", "shape", "sum", "sum_positive", "sum_negative", "count"]]
    print(f"\nper-layer score summary of {concept!r} ({objective}):")
    with pd.option_context("display.width", 200, "display.max_colwidth", 120, "display.float_format", "{:.4g}".format):
        print(layers.to_string(index=False))


def cmd_attribute(args: argparse.Namespace) -> None:
    from cad_ray.config import load_config
    from cad_ray.distributed import run_attribution
    from cad_ray.store import ScoreStore

    config = load_config(args.config, {"workers": args.workers, "device": args.device})
    root = args.root or str(Path("runs") / Path(args.config).stem)
    manifest = run_attribution(config, root, address=args.address, overwrite=args.overwrite, local=args.local,
                               progress=not args.quiet)
    print(f"attribution complete in {root}: {len(config.pairs())} concept/objective pairs, "
          f"{manifest['shards_computed']} shards computed, {manifest['shards_skipped']} already done, "
          f"{manifest['workers']} worker(s), {manifest['run_seconds']:.1f} s")
    if args.quiet:
        return
    store = ScoreStore(root)
    for spec in config.concepts[: args.show]:
        for objective in spec.objectives:
            print_top(store, spec.name, 5, objective == "amplify", objective)
    if config.concepts and args.show:
        first = config.concepts[0]
        print_layers(store, first.name, first.objectives[0])
    print(f"\nquery them with pandas: pandas.read_parquet('{root}/scores', filters=[('concept', '==', "
          f"'{config.concepts[0].name}')])")


def cmd_status(args: argparse.Namespace) -> None:
    import pandas as pd

    from cad_ray.status import root_status

    table = root_status(args.root)

    def files(row) -> str:
        if pd.isna(row.done):
            return ""
        return f"{row.done}" if pd.isna(row.total) else f"{row.done} of {row.total}"

    shown = table.assign(files=[files(r) for r in table.itertuples()])[["stage", "complete", "files", "where"]]
    print(shown.to_string(index=False))
    unfinished = table[(table["stage"] != "report") & ~table["complete"]]["stage"].tolist()
    if unfinished:
        print(f"unfinished: {', '.join(unfinished)}; re-run the same command to finish: finished files are checked and kept, the rest is computed")


def cmd_top(args: argparse.Namespace) -> None:
    import pandas as pd

    from cad_ray.store import ScoreStore

    store = ScoreStore(args.root, allow_incomplete=args.allow_incomplete)
    if not args.specific:
        print_top(store, args.concept, args.k, args.negative, args.objective, args.method)
        return
    if args.method != "cad":
        raise CadRayError("--specific ranks CAD's scores; leave out --method, or --specific")
    top = store.specific(args.concept, args.against, args.objective, args.k, args.aggregate, args.negative)
    against = ", ".join(args.against) if args.against else "every other concept"
    print(f"\ncomponents most specific to {args.concept!r} ({args.objective}, against {against}, {args.aggregate}):")
    if len(top) < args.k:
        print(f"(only {len(top)} component(s) are specific to it)")
    with pd.option_context("display.width", 200, "display.max_colwidth", 120, "display.float_format", "{:.4g}".format):
        print(top.to_string(index=False))


def cmd_layers(args: argparse.Namespace) -> None:
    from cad_ray.store import ScoreStore

    print_layers(ScoreStore(args.root, allow_incomplete=args.allow_incomplete), args.concept, args.objective)


def cmd_overlap(args: argparse.Namespace) -> None:
    from cad_ray.store import ScoreStore

    store = ScoreStore(args.root, allow_incomplete=args.allow_incomplete)
    result = store.overlap(args.a, args.b, args.k, args.objective, args.negative, args.method, args.method_b)
    methods = args.method if not args.method_b else f"{args.method} against {args.method_b}"
    print(f"top-{args.k} {'negative' if args.negative else 'positive'} components of {args.a!r} and {args.b!r} "
          f"({args.objective}, {methods}): {result['shared']} shared, Jaccard {result['jaccard']:.3f}")
    short = [f"{name!r} has {size}" for name, size in ((args.a, result["size_a"]), (args.b, result["size_b"]))
             if size < args.k]
    if short:
        print(f"(only components of the sign asked for are counted: {', '.join(short)})")


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
                            progress=not args.quiet)
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
                            overwrite=args.overwrite)
    summary = result["summary"]
    print(f"evaluation complete in {args.root}: {result['images']} images judged by {result['actors']} actor(s), "
          f"{result['edits_made']} fine-tuned edit(s) made, {result['blocks_computed']} blocks computed, "
          f"{result['blocks_skipped']} already done, {result['run_seconds']:.1f} s")
    if args.quiet:
        return
    columns = ["edit", "target", "ratio", "guidance", "zeroed", "target_accuracy", "others_accuracy",
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


def cmd_report(args: argparse.Namespace) -> None:
    from cad_ray.stages.report import write_report
    from cad_ray.store import RunRoot
    from cad_ray.store.root import check_output

    if args.out:
        run = RunRoot(args.root)
        check_output(args.out, allowed=() if run.is_s3 else (run.join("report.html"),))
    try:
        where = write_report(args.root, args.out)
    except OSError as e:  # a full disk: the report is written to a temporary file first, removed on failure
        raise CadRayError(f"cannot write the report: {e.strerror or e}") from None
    print(f"report: {where}")


def cmd_edit(args: argparse.Namespace) -> None:
    """Any edit of the registry (`cad_ray.method.edits`), made as the evaluation makes it, saved as a folder."""
    from cad_ray.method.editing import Selection, check_fingerprint, check_ratio, select, unselectable, zero_components
    from cad_ray.method.edits import EDITS
    from cad_ray.method.scopes import never_selected
    from cad_ray.models import load_model
    from cad_ray.stages.edit_workers import edit_masks, edit_uce
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
    if args.selection is None:  # the root's own: its config's evaluation.selection (the evaluation's, where it ran)
        args.selection = stage_config(args.root, None, "evaluation", {}).evaluation.selection
    selection = Selection.parse(edit.selection or args.selection) if edit.zeroes else None
    if selection is not None and edit.method:
        selection = selection.with_method(edit.method, edit.contrast)
    target = Path(os.path.realpath(out))  # '.' or 'x/..' has no name to put a temporary folder beside
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
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
    if target.exists():
        target.rmdir()  # empty, checked above
    os.replace(tmp, target)
    print(f"wrote {out}: {args.edit} of {args.target!r}, {what}; load it with --model {out}")


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
    if run.read_manifest(*edit_folder(finetuned, args.target), EDIT_MARKER) != finetune_key(options, store):
        run.check_writable()
        EditWorker(config, args.root).make(finetuned, args.target)
    editor = Editor(config, run, model, store)
    text = str(selection) if selection is not None else ""
    with editor.applied(edit.name, args.target, text, args.ratio or 1.0):
        model.save_pretrained(tmp)
    zeroed = editor.zeroed(edit.name, args.target, text, args.ratio or 1.0)
    where = run.uri_under(*edit_folder(finetuned, args.target))
    return f"fine-tuned ({where})" + (f", then {zeroed} components zeroed ({selection})" if edit.zeroes else "")


def cmd_run(args: argparse.Namespace) -> None:
    """attribute, validate, evaluate, report: the default pipeline."""
    root = args.root or str(Path("runs") / Path(args.config).stem)
    common = ["--root", root, *(["--address", args.address] if args.address else []),
              *(["--workers", str(args.workers)] if args.workers else []), *(["--quiet"] if args.quiet else [])]
    for stage, extra in (("attribute", ["--config", args.config, "--show", "1"]), ("validate", ["--config", args.config]),
                         ("evaluate", ["--config", args.config])):
        print(f"\n=== cad-ray {stage} ===", flush=True)
        stage_args = build_parser().parse_args([stage, *extra, *common])
        stage_args.func(stage_args)
    from cad_ray.stages.report import write_report

    print(f"\nreport: {write_report(root)}")


def cmd_judges(args: argparse.Namespace) -> None:
    from cad_ray.judges import judge_listing

    spec = None
    if args.config:  # the judge a config names, with the options giving its weights: it can say "ready"
        from cad_ray.config import load_config

        spec = load_config(args.config).evaluation.judge
    # finds packages without importing them; no judge's code is loaded
    for line in judge_lines(judge_listing(spec)):
        print(line)


LISTING_WIDTH = 100  # `cad-ray judges` reads at 100 columns


def judge_lines(rows: list[tuple[str, str, str, str]], width: int = LISTING_WIDTH) -> list[str]:
    """One line per judge in aligned columns: name, status, needs, description. The needs column is as wide as its
    longest entry where the lines then fit in `width`, else narrower: a longer entry pushes only its own row's
    description to the right."""
    name_width = max(len(name) for name, *_ in rows)
    status_width = max(len(status) for _, status, *_ in rows)
    description_width = max(len(description) for *_, description in rows)
    room = width - name_width - status_width - description_width - 3 * 2
    needs_width = min(max(len(needs) for _, _, needs, _ in rows), max(room, 0))
    return [f"{name:<{name_width}}  {status:<{status_width}}  {needs:<{needs_width}}  {description}".rstrip()
            for name, status, needs, description in rows]


def _option_group(*options: tuple) -> argparse.ArgumentParser:
    """A parent parser holding shared options: (flags, keyword arguments) pairs."""
    group = argparse.ArgumentParser(add_help=False)
    for flags, kwargs in options:
        group.add_argument(*((flags,) if isinstance(flags, str) else flags), **kwargs)
    return group


ROOT = ("--root", {"required": True, "help": "run root: local folder or s3://bucket/prefix"})
CONFIG = ("--config", {"default": None, "help": "YAML config (the root's own by default); it must describe the same "
                                                 "attribution run, its stage section may differ"})
OVERWRITE = ("--overwrite", {"action": "store_true", "help": "replace what this stage wrote in --root with other "
                                                               "options (its tables are removed first)"})
RAY = [("--address", {"default": None, "help": "Ray cluster address (e.g. auto); default: start a local Ray"}),
       ("--workers", {"type": _positive_int, "default": None,
                      "help": "number of workers (default: one per GPU, else one per CPU)"}),
       ("--device", {"type": _device, "default": None,
                     "help": "torch device for the workers (default: cuda if present)"}),
       ("--local", {"action": "store_true", "help": "run in this process without Ray (debugging)"}),
       ("--quiet", {"action": "store_true", "help": "no progress bars, no tables printed"})]
GENERATION = [("--model", {"default": None, "help": MODEL_HELP}),
              ("--seed", {"type": int, "default": 0, "help": "seed of the starting noise (default: 0)"}),
              ("--guidance", {"type": _finite_float, "default": None,
                              "help": "classifier-free guidance scale (default: the model's, 3.0 for digits)"}),
              ("--steps", {"type": _positive_int, "default": None, "help": "sampling steps (default: the model's)"}),
              ("--device", {"type": _device, "default": None, "help": "torch device, e.g. cuda or cpu (default: cpu)"})]
EDIT_HELP = edit_help()  # every edit of the registry, with what it does
METHOD = ("--method", {"default": "cad", "choices": ["cad", "gradient", "magnitude", "conceptprune"],
                      "help": "the scores ranked: cad (w * dJ/dw, default), gradient (|dJ/dw|), magnitude (|w|), "
                              "conceptprune (its Wanda ranks; the concept must list it among its objectives)"})
QUERY = [ROOT, ("--objective", {"default": "erase", "choices": ["erase", "amplify", "prior"]}),
         ("--allow-incomplete", {"action": "store_true", "help": "read a run that has not completed"})]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cad-ray",
        description="Component attribution for text-to-image diffusion models (CAD), distributed on Ray.",
        epilog="Run 'cad-ray COMMAND --help' for each command's options.")
    parser.add_argument("--version", action="version", version=f"cad-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generation, ray, query = _option_group(*GENERATION), _option_group(*RAY), _option_group(*QUERY)
    root, root_config, overwrite = _option_group(ROOT), _option_group(ROOT, CONFIG), _option_group(OVERWRITE)

    def command(name, func, help, description, parents=(), options=()):
        p = sub.add_parser(name, help=help, description=description, parents=list(parents))
        for flags, kwargs in options:
            p.add_argument(*((flags,) if isinstance(flags, str) else flags), **kwargs)
        p.set_defaults(func=func)
        return p

    command("sample", cmd_sample, "generate images for a prompt",
            "Generate N images for a prompt with classifier-free guidance. The same seed gives the same images.",
            [generation], [
                ("--prompt", {"required": True, "help": 'prompt text, e.g. "a red seven" ("" is unconditional)'}),
                ("--n", {"type": _positive_int, "default": 8, "help": "number of images (default: 8)"}),
                ("--out", {"required": True, "help": "FILE.png (grid upscaled for viewing) or FILE.npz (array "
                                                     "'images', shape (N, H, W, 3), values in [0, 1])"})])
    command("quality", cmd_quality, "judge the digits model on every (digit, colour) prompt",
            "Sample N images for each of the 40 (digit, colour) prompts and report the judged digit and colour "
            "accuracy against the quality bar (digit >= 90%% overall and >= 75%% per digit, colour >= 95%%).",
            [generation], [
                ("--n", {"type": _positive_int, "default": 25, "help": "images per prompt (default: 25)"}),
                ("--out", {"default": None, "help": "also write the summary as JSON to this file"})])
    command("attribute", cmd_attribute, "compute CAD scores for the concepts of a config (Ray job)",
            "Compute attribution scores w * dJ/dw for every component in the scope, for every concept and "
            "objective of the config, sharded over Ray workers, and write Parquet tables scores/, neurons/, "
            "layers/ under --root. Re-running the same config on the same root resumes and skips finished shards.",
            [ray], [
                ("--config", {"required": True, "help": "YAML run config (see jobs/configs/)"}),
                ("--root", {"default": None, "help": "run root: local folder or s3://bucket/prefix "
                                                     "(default: runs/<config name>)"}),
                ("--overwrite", {"action": "store_true", "help": "replace a run made with another config in --root "
                                                                 "(its tables and every later stage's are removed)"}),
                ("--show", {"type": int, "default": 3, "help": "concepts whose top components are printed "
                                                               "(default: 3)"})])
    command("validate", cmd_validate, "check the scores against random ablations (Ray job)",
            "Draw M random subsets of the scope's components at each ablation fraction, measure the actual change "
            "of J with them zeroed on a fixed batch of held-out points, and compare it with three estimators: cad "
            "(first order), cad2 (first order plus a sketched Gauss-Newton term) and coar (ridge regression on "
            "per-neuron ablations, fit on a training split). Writes validation/, validation_summary/, "
            "localization/, overlap/ and plots/validation/ under --root. Options come from the config's "
            "'validation:' section.", [root_config, overwrite, ray], [
                ("--ablations", {"type": int, "default": None, "help": "random subsets M per fraction"}),
                ("--fractions", {"type": float, "nargs": "+", "default": None,
                                 "help": "ablation fractions, each in (0, 1)"}),
                ("--concepts", {"nargs": "+", "default": None, "help": "concepts to validate (default: all)"}),
                ("--in-sample", {"action": "store_true", "help": "evaluate on the attribution's own samples"})])
    command("evaluate", cmd_evaluate, "edit the model and judge the images (Ray Data job)",
            "Make every edit of the config's 'evaluation:' section (cad-erase, random, cad-amplify at each ratio; "
            "finetune, cad-finetune, finetune+cad-amplify), generate images of every prompt with the same seeds "
            "before and after, judge them with Ray Data actors and write evaluation/ (one row per image) and "
            "evaluation_summary/ (accuracy of the target and of the others, Frechet distance, best ratio) under "
            "--root. With evaluation.probes (inversion, completion, soft-prompt), every erasing edit is then "
            "attacked: is the concept gone from the model or only from its words (probes/, probe_summary/, "
            "probe_verdicts/; docs/editing.md).", [root_config, overwrite, ray], [
                ("--targets", {"nargs": "+", "default": None, "help": "concepts to edit"}),
                ("--edits", {"nargs": "+", "default": None, "help": "edits by name: " + EDIT_HELP}),
                ("--ratios", {"type": float, "nargs": "+", "default": None,
                              "help": "shares of components zeroed, in (0, 1]"}),
                ("--prompts", {"default": None, "help": "prompt CSV (columns prompt, evaluation_seed[, class])"}),
                ("--images-per-prompt", {"type": _positive_int, "default": None})])
    command("report", cmd_report, "write the HTML report of a run root",
            "Write a self-contained HTML page (images embedded, opens offline) with the per-layer scores, the "
            "validation and the judged edits of --root.", [root], [
                ("--out", {"default": None, "help": "local file (default: <root>/report.html)"})])
    command("edit", cmd_edit, "save a CAD-edited model as a diffusers folder",
            "Zero the top components of a concept (cad-erase: largest erase scores; cad-amplify: most negative "
            "amplify scores), or make any other edit 'cad-ray evaluate' makes (the fine-tuned ones are taken from "
            "the root, made there first where missing), and save the model in diffusers layout (safetensors); "
            "load it back with --model FOLDER. The model must be the one the scores were computed on "
            "(fingerprint).", [root], [
                ("--edit", {"required": True, "help": "the edit, made as 'cad-ray evaluate' makes it (--ratio: "
                                                      "conceptprune's skill ratio; uce, finetune and cad-finetune "
                                                      "take none): " + EDIT_HELP}),
                ("--target", {"required": True, "help": "concept to edit"}),
                ("--ratio", {"type": float, "default": None, "help": "share of each unit's components, in (0, 1]"}),
                ("--count", {"type": int, "default": None, "help": "number of components per unit instead of a "
                                                                   "ratio"}),
                ("--selection", {"default": None,
                                 "help": "scope/granularity/contrast[/floor]: a part of the run's scope, the unit "
                                         "ranked in (global, tensor, row), the contrast (none; kind: against the "
                                         "other concepts of its kind; others: against every other; -mean or -max), "
                                         "floor for the published rounding; or 'published' (ff/row/none/floor). "
                                         "An objective prefix ranks another objective's scores (prior:ff/global/"
                                         "kind-max); parts joined by | are a union. Default: the root's "
                                         "evaluation.selection (its config's; all/global/none where it names none)"}),
                ("--model", {"default": None, "help": "model to edit (default: the run's)"}),
                ("--out", {"required": True, "help": "new folder for the edited model"})])
    command("run", cmd_run, "the whole pipeline: attribute, validate, evaluate, report",
            "Run attribute, validate and evaluate with one config on one root (each resumes what is done), then "
            "write the report and print where it is.", [], [
                ("--config", {"required": True}),
                ("--root", {"default": None, "help": "run root (default: runs/<config name>)"}),
                ("--address", {"default": None}), ("--workers", {"type": _positive_int, "default": None}),
                ("--quiet", {"action": "store_true"})])
    command("status", cmd_status, "what a run root holds, stage by stage",
            "Show each stage of a run root (attribution, validation, evaluation, report): complete or not, and "
            "how many of its shard or block files are written. A re-run of the same command keeps those and "
            "computes the rest.", [root])
    command("judges", cmd_judges, "list the judges an evaluation can name",
            "List every registered judge (built-in, or a plugin under the 'cad_ray.judges' entry-point group), one "
            "line each: its name, whether it can run here (ready; needs <package>; unavailable, and why), what it "
            "needs (packages, the option naming its weights) and what it measures. A config names one in its "
            "evaluation section: judge: {name: nudenet} (docs/editing.md).", [], [
                ("--config", {"default": None, "help": "a run config whose evaluation.judge names weights: its "
                                                       "judges say ready when those weights are there"})])
    command("top", cmd_top, "print a concept's top components",
            "Print the k components with the largest scores of a concept (inducing it), or with --negative the "
            "most negative ones (inhibiting it).", [query], [
                ("--concept", {"required": True, "help": "concept name, e.g. seven"}),
                ("--k", {"type": _positive_int, "default": 20, "help": "how many (default: 20)"}),
                ("--negative", {"action": "store_true", "help": "most negative scores instead"}),
                METHOD,
                ("--specific", {"action": "store_true", "help": "rank by what the concept needs and the others do "
                                                                "not (scores normalised per concept, others "
                                                                "subtracted); see docs/editing.md"}),
                ("--against", {"nargs": "+", "default": None, "help": "with --specific: the concepts to rank "
                                                                      "against (default: every other one)"}),
                ("--aggregate", {"default": "mean", "choices": ["mean", "max"],
                                 "help": "with --specific: subtract the others' mean, or their max (protects the "
                                         "most similar concept)"})])
    command("layers", cmd_layers, "print a concept's per-layer score summary",
            "Print the sum, positive sum, negative sum and count of scores per tensor.", [query], [
                ("--concept", {"required": True, "help": "concept name, e.g. seven"})])
    command("overlap", cmd_overlap, "overlap of two concepts' top-k components",
            "Count the components shared by the top-k sets of two concepts and their Jaccard index.", [query], [
                ("--a", {"required": True, "help": "first concept"}), ("--b", {"required": True, "help": "second concept"}),
                ("--k", {"type": _positive_int, "default": 100}), ("--negative", {"action": "store_true"}),
                METHOD, ("--method-b", {"default": None, "choices": ["cad", "gradient", "magnitude", "conceptprune"],
                                        "help": "rank --b by another method (e.g. --a seven --b seven --method cad "
                                                "--method-b conceptprune: how far the two agree)"})])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CadRayError as e:
        print(f"cad-ray {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cad-ray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # S3 unreachable or refused (no credentials, a closed endpoint): botocore's own words
        if not type(e).__module__.startswith(("botocore", "aiobotocore")):
            raise
        print(f"cad-ray {args.command}: error: S3: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
