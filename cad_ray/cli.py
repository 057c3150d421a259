"""The `cad-ray` command: thin wiring from arguments to the library.

Errors the user can fix (`CadRayError`) print as one line on stderr with exit status 1; argparse's usage
errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import CadRayError

MODEL_HELP = ("model folder in diffusers layout or s3://bucket/prefix (default: the built-in digits model). "
              "S3 credentials and endpoint come from the environment (AWS_* variables) or ~/.aws")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def write_atomically(path: Path, write) -> None:
    """Write through a temporary sibling and rename, so a failure never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise CadRayError(f"--out must end in .png (image grid) or .npz (array 'images'), got {args.out!r}")
    from .models import load_model

    model = load_model(args.model, device=args.device)
    prompts = [args.prompt] * args.n
    trajectory = model.sample(prompts, seed=args.seed, guidance=args.guidance, steps=args.steps, progress=True)
    images = trajectory.images.astype(np.float32)
    if out.suffix.lower() == ".npz":
        write_atomically(out, lambda p: np.savez_compressed(p, images=images))
    else:
        from PIL import Image

        from .quality import image_grid

        write_atomically(out, lambda p: Image.fromarray(image_grid(images)).save(p, format="PNG"))
    print(f"wrote {out}: {args.n} image(s) of {args.prompt!r}, seed {args.seed}, "
          f"guidance {trajectory.guidance}, {len(trajectory.timesteps)} steps, model {model.source}")
    if model.kind == "digits":
        from .digits import COLOUR_NAMES
        from .judges import builtin_judges

        judges = builtin_judges()
        verdicts = [f"{d}/{COLOUR_NAMES[c]}" for d, c in zip(judges.digits(images), judges.colours(images))]
        print("judged (digit/colour):", " ".join(verdicts))


def cmd_quality(args: argparse.Namespace) -> None:
    from .models import load_model
    from .quality import digits_quality, meets_quality_bar, quality_summary

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


def _short_tensor(name: str) -> str:
    return name.replace("transformer_blocks.", "tb.").replace("attentions.", "attn.")


def print_top(store, concept: str, k: int, negative: bool, objective: str) -> None:
    import pandas as pd

    top = store.top(concept, k, negative=negative, objective=objective)
    top["tensor"] = top["tensor"].map(_short_tensor)
    kind = "most negative (inhibiting)" if negative else "top positive (inducing)"
    print(f"\n{kind} components of {concept!r} under the {objective} objective:")
    with pd.option_context("display.width", 200, "display.max_colwidth", 80, "display.float_format", "{:.4g}".format):
        print(top.to_string(index=False))


def print_layers(store, concept: str, objective: str) -> None:
    import pandas as pd

    layers = store.layers(concept, objective)[["tensor", "shape", "sum", "sum_positive", "sum_negative", "count"]]
    layers["tensor"] = layers["tensor"].map(_short_tensor)
    print(f"\nper-layer score summary of {concept!r} ({objective}):")
    with pd.option_context("display.width", 200, "display.max_colwidth", 80, "display.float_format", "{:.4g}".format):
        print(layers.to_string(index=False))


def cmd_attribute(args: argparse.Namespace) -> None:
    from .config import load_config
    from .distributed import run_attribution
    from .store import ScoreStore

    config = load_config(args.config, {"workers": args.workers, "device": args.device})
    root = args.root or str(Path("runs") / Path(args.config).stem)
    manifest = run_attribution(config, root, address=args.address, overwrite=args.overwrite, local=args.local,
                               progress=not args.quiet)
    print(f"attribution complete in {root}: {len(config.pairs())} concept/objective pairs, "
          f"{manifest['shards_computed']} shards computed, {manifest['shards_skipped']} already done, "
          f"{manifest['workers']} worker(s), {manifest['run_seconds']:.1f} s")
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

    from .status import root_status

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
    from .store import ScoreStore

    store = ScoreStore(args.root, allow_incomplete=args.allow_incomplete)
    print_top(store, args.concept, args.k, args.negative, args.objective)


def cmd_layers(args: argparse.Namespace) -> None:
    from .store import ScoreStore

    print_layers(ScoreStore(args.root, allow_incomplete=args.allow_incomplete), args.concept, args.objective)


def cmd_overlap(args: argparse.Namespace) -> None:
    from .store import ScoreStore

    store = ScoreStore(args.root, allow_incomplete=args.allow_incomplete)
    result = store.overlap(args.a, args.b, args.k, args.objective, args.negative)
    print(f"top-{args.k} {'negative' if args.negative else 'positive'} components of {args.a!r} and {args.b!r} "
          f"({args.objective}): {result['shared']} shared, Jaccard {result['jaccard']:.3f}")


def stage_config(root: str, config_file: str | None, section: str, overrides: dict):
    """The run's config for a later stage: the --config file if given (checked against the root by the stage),
    else the config stored in the root's manifest; `overrides` replace fields of its `section`."""
    from .config import load_config, parse_config
    from .store import RunRoot

    if config_file:
        config = load_config(config_file)
    else:
        manifest = RunRoot(root).read_manifest()
        if manifest is None:
            raise CadRayError(f"no attribution run in {root}: run 'cad-ray attribute' with this --root first")
        config = parse_config(manifest["config"], f"{root}/_manifest.json")
    data = config.model_dump(mode="json")
    data[section].update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data, "options")


def cmd_validate(args: argparse.Namespace) -> None:
    import pandas as pd

    from .distributed import run_validation

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

    from .distributed import run_evaluation

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
    columns = ["edit", "target", "ratio", "guidance", "zeroed", "target_accuracy", "others_accuracy",
               "worst_other_retained", "fd_rise", "best"]
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(summary[columns].to_string(index=False))
    print(f"\ntables: {args.root}/evaluation (one row per image), {args.root}/evaluation_summary")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    print(f"report: {write_report(args.root, args.out)}")


def cmd_edit(args: argparse.Namespace) -> None:
    from .editing import ZEROING_EDITS, check_fingerprint, check_ratio, select, zero_components
    from .models import load_model
    from .store import ScoreStore

    if args.edit not in ZEROING_EDITS:
        raise CadRayError(f"unknown edit {args.edit!r}; 'cad-ray edit' makes {', '.join(ZEROING_EDITS)} "
                          "(the fine-tuning baselines are made by 'cad-ray evaluate')")
    if (args.ratio is None) == (args.count is None):
        raise CadRayError("give --ratio or --count")
    if args.ratio is not None:
        check_ratio(args.ratio)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CadRayError(f"{out} exists and is not empty; choose a new folder for the edited model")
    store = ScoreStore(args.root)
    model = load_model(args.model if args.model else store.manifest["config"].get("model"))
    check_fingerprint(model, store.fingerprint)
    objective, largest = ZEROING_EDITS[args.edit]
    masks = select(store.tensor_scores(args.target, objective), ratio=args.ratio, count=args.count,
                   granularity=args.granularity, largest=largest)
    zeroed = zero_components(model, masks)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(tmp, out)
    print(f"wrote {out}: {args.edit} of {args.target!r}, {zeroed} components zeroed ({args.granularity}); "
          f"load it with --model {out}")


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
    from .report import write_report

    print(f"\nreport: {write_report(root)}")


def _attribute_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML run config (see jobs/configs/)")
    p.add_argument("--root", default=None, help="run root: local folder or s3://bucket/prefix "
                                                "(default: runs/<config name>)")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: start a local Ray")
    p.add_argument("--overwrite", action="store_true", help="replace a run made with another config in --root")
    p.add_argument("--workers", type=_positive_int, default=None, help="number of workers (default: one per "
                                                                       "GPU, else one per CPU)")
    p.add_argument("--device", default=None, help="torch device for the workers (default: cuda if present)")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (debugging)")
    p.add_argument("--show", type=int, default=3, help="concepts whose top components are printed (default: 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _query_arguments(p: argparse.ArgumentParser, pair: bool = False) -> None:
    p.add_argument("--root", required=True, help="run root (local folder or s3://...)")
    if pair:
        p.add_argument("--a", required=True, help="first concept")
        p.add_argument("--b", required=True, help="second concept")
    else:
        p.add_argument("--concept", required=True, help="concept name, e.g. seven")
    p.add_argument("--objective", default="erase", choices=["erase", "amplify"])
    p.add_argument("--allow-incomplete", action="store_true", help="read a run that has not completed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cad-ray",
        description="Component attribution for text-to-image diffusion models (CAD), distributed on Ray.",
        epilog="Run 'cad-ray COMMAND --help' for each command's options.")
    parser.add_argument("--version", action="version", version=f"cad-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sample", help="generate images for a prompt",
                       description="Generate N images for a prompt with classifier-free guidance. "
                                   "The same seed gives the same images.")
    p.add_argument("--prompt", required=True, help='prompt text, e.g. "a red seven" ("" is unconditional)')
    p.add_argument("--n", type=_positive_int, default=8, help="number of images (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: 0)")
    p.add_argument("--out", required=True, help="FILE.png (grid upscaled for viewing) or FILE.npz "
                                                "(array 'images', shape (N, H, W, 3), values in [0, 1])")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale "
                                                                "(default: the model's, 3.0 for digits)")
    p.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default: the model's, 50)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cpu)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("quality", help="judge the digits model on every (digit, colour) prompt",
                       description="Sample N images for each of the 40 (digit, colour) prompts and report the "
                                   "judged digit and colour accuracy against the quality bar "
                                   "(digit >= 90%% overall and >= 75%% per digit, colour >= 95%%).")
    p.add_argument("--n", type=_positive_int, default=25, help="images per prompt (default: 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=_positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="also write the summary as JSON to this file")
    p.set_defaults(func=cmd_quality)

    p = sub.add_parser("attribute", help="compute CAD scores for the concepts of a config (Ray job)",
                       description="Compute attribution scores w * dJ/dw for every component in the scope, for "
                                   "every concept and objective of the config, sharded over Ray workers, and "
                                   "write Parquet tables scores/, neurons/, layers/ under --root. Re-running "
                                   "the same config on the same root resumes and skips finished shards.")
    _attribute_arguments(p)
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("validate", help="check the scores against random ablations (Ray job)",
                       description="Draw M random subsets of the scope's components at each ablation fraction, "
                                   "measure the actual change of J with them zeroed on a fixed batch of held-out "
                                   "points, and compare it with three estimators: cad (first order), cad2 (first "
                                   "order plus a sketched Gauss-Newton term) and coar (ridge regression on "
                                   "per-neuron ablations, fit on a training split). Writes validation/, "
                                   "validation_summary/, localization/, overlap/ and plots/validation/ under "
                                   "--root. Options come from the config's 'validation:' section.")
    p.add_argument("--root", required=True, help="root of a completed attribution run (local folder or s3://...)")
    p.add_argument("--config", default=None, help="YAML config (the root's own by default); must describe the "
                                                  "same attribution run, its 'validation:' section may differ")
    p.add_argument("--ablations", type=int, default=None, help="random subsets M per fraction")
    p.add_argument("--fractions", type=float, nargs="+", default=None, help="ablation fractions, each in (0, 1)")
    p.add_argument("--concepts", nargs="+", default=None, help="concepts to validate (default: all)")
    p.add_argument("--in-sample", action="store_true", help="evaluate on the attribution's own samples")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: start a local Ray")
    p.add_argument("--overwrite", action="store_true", help="replace a validation made with other options")
    p.add_argument("--workers", type=_positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--local", action="store_true", help="run in this process without Ray (debugging)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("evaluate", help="edit the model and judge the images (Ray Data job)",
                       description="Make every edit of the config's 'evaluation:' section (cad-erase, random, "
                                   "cad-amplify at each ratio; finetune, cad-finetune, finetune+cad-amplify), "
                                   "generate images of every prompt with the same seeds before and after, judge them "
                                   "with Ray Data actors and write evaluation/ (one row per image) and "
                                   "evaluation_summary/ (accuracy of the target and of the others, Frechet distance, "
                                   "best ratio) under --root.")
    p.add_argument("--root", required=True, help="root of a completed attribution run")
    p.add_argument("--config", default=None, help="YAML config (the root's own by default)")
    p.add_argument("--targets", nargs="+", default=None, help="concepts to edit")
    p.add_argument("--edits", nargs="+", default=None, help="edits: cad-erase random cad-amplify finetune "
                                                            "cad-finetune finetune+cad-amplify")
    p.add_argument("--ratios", type=float, nargs="+", default=None, help="shares of components zeroed, in (0, 1]")
    p.add_argument("--prompts", default=None, help="prompt CSV (columns prompt, evaluation_seed[, class])")
    p.add_argument("--images-per-prompt", type=_positive_int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an evaluation made with other options")
    p.add_argument("--address", default=None)
    p.add_argument("--workers", type=_positive_int, default=None, help="actors (default: one per GPU, else CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--local", action="store_true", help="run in this process without Ray (debugging)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="write the HTML report of a run root",
                       description="Write a self-contained HTML page (images embedded, opens offline) with the "
                                   "per-layer scores, the validation and the judged edits of --root.")
    p.add_argument("--root", required=True)
    p.add_argument("--out", default=None, help="local file (default: <root>/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("edit", help="save a CAD-edited model as a diffusers folder",
                       description="Zero the top components of a concept (cad-erase: largest erase scores; "
                                   "cad-amplify: most negative amplify scores) and save the model in diffusers "
                                   "layout (safetensors); load it back with --model FOLDER. The model must be the "
                                   "one the scores were computed on (fingerprint).")
    p.add_argument("--root", required=True, help="run root with the score tables")
    p.add_argument("--edit", required=True, help="cad-erase or cad-amplify")
    p.add_argument("--target", required=True, help="concept to edit")
    p.add_argument("--ratio", type=float, default=None, help="share of each unit's components, in (0, 1]")
    p.add_argument("--count", type=int, default=None, help="number of components per unit instead of a ratio")
    p.add_argument("--granularity", default="global", choices=["global", "tensor", "row"])
    p.add_argument("--model", default=None, help="model to edit (default: the run's)")
    p.add_argument("--out", required=True, help="new folder for the edited model")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("run", help="the whole pipeline: attribute, validate, evaluate, report",
                       description="Run attribute, validate and evaluate with one config on one root (each resumes "
                                   "what is done), then write the report and print where it is.")
    p.add_argument("--config", required=True)
    p.add_argument("--root", default=None, help="run root (default: runs/<config name>)")
    p.add_argument("--address", default=None)
    p.add_argument("--workers", type=_positive_int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="what a run root holds, stage by stage",
                       description="Show each stage of a run root (attribution, validation, evaluation, report): "
                                   "complete or not, and how many of its shard or block files are written. "
                                   "A re-run of the same command keeps those and computes the rest.")
    p.add_argument("--root", required=True, help="run root (local folder or s3://...)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("top", help="print a concept's top components",
                       description="Print the k components with the largest scores of a concept (inducing it), "
                                   "or with --negative the most negative ones (inhibiting it).")
    _query_arguments(p)
    p.add_argument("--k", type=_positive_int, default=20, help="how many (default: 20)")
    p.add_argument("--negative", action="store_true", help="most negative scores instead")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("layers", help="print a concept's per-layer score summary",
                       description="Print the sum, positive sum, negative sum and count of scores per tensor.")
    _query_arguments(p)
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("overlap", help="overlap of two concepts' top-k components",
                       description="Count the components shared by the top-k sets of two concepts and their "
                                   "Jaccard index.")
    _query_arguments(p, pair=True)
    p.add_argument("--k", type=_positive_int, default=100)
    p.add_argument("--negative", action="store_true")
    p.set_defaults(func=cmd_overlap)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
