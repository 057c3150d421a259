"""The `cad-ray` command: thin wiring from arguments to the library (the commands are in `cad_ray.commands`).

Errors the user can fix (`CadRayError`) print as one line on stderr with exit status 1; argparse's usage
errors exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cad_ray import __version__
from cad_ray.commands.attribution import cmd_attribute, cmd_layers, cmd_overlap, cmd_top, print_layers, print_top
from cad_ray.commands.inspection import LISTING_WIDTH, cmd_judges, cmd_report, cmd_status, judge_lines
from cad_ray.commands.sampling import SHOWN_ONE_BY_ONE, cmd_quality, cmd_sample, judged_line, write_atomically
from cad_ray.commands.stages import cmd_edit, cmd_evaluate, cmd_stop_workers, cmd_validate, stage_config
from cad_ray.errors import CadRayError, described
from cad_ray.method.edits import edit_help

# the commands' names, importable from here as before they moved to cad_ray.commands
__all__ = ["LISTING_WIDTH", "SHOWN_ONE_BY_ONE", "build_parser", "cmd_attribute", "cmd_edit", "cmd_evaluate",
           "cmd_judges", "cmd_layers", "cmd_overlap", "cmd_quality", "cmd_report", "cmd_run", "cmd_sample",
           "cmd_status", "cmd_top", "cmd_validate", "judge_lines", "judged_line", "main", "print_layers", "print_top",
           "stage_config", "write_atomically"]

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
    from cad_ray.config import check_device  # pydantic: imported where --device is given, not for --help

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_run(args: argparse.Namespace) -> None:
    """attribute, validate, evaluate, report: the default pipeline."""
    root = args.root or str(Path("runs") / Path(args.config).stem)
    # every stage gets the run's Ray options (--keep-workers: the three stages share the kept workers)
    common = ["--root", root, *(["--address", args.address] if args.address else []),
              *(["--workers", str(args.workers)] if args.workers else []),
              *(["--device", args.device] if args.device else []),
              *[flag for flag, on in (("--local", args.local), ("--keep-workers", args.keep_workers),
                                      ("--quiet", args.quiet)) if on]]
    for stage, extra in (("attribute", ["--config", args.config, "--show", "1"]), ("validate", ["--config", args.config]),
                         ("evaluate", ["--config", args.config])):
        print(f"\n=== cad-ray {stage} ===", flush=True)
        stage_args = build_parser().parse_args([stage, *extra, *common])
        stage_args.func(stage_args)
    from cad_ray.stages.report import write_report  # torch, pandas: imported where the pipeline runs

    print(f"\nreport: {write_report(root)}")


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
       ("--keep-workers", {"action": "store_true",
                           "help": "leave the Ray workers, with the model loaded, on the cluster at --address for the "
                                   "next command (another concept or stage starts at once); they hold their CPUs or "
                                   "GPUs until 'cad-ray stop-workers'"}),
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
                                                               "(default: 3)"}),
                ("--ray", {"action": "store_true", "help": "start Ray even for a config of one concept (without "
                                                          "--address or --workers above 1, one concept is computed "
                                                          "in this process: Ray's start costs more than its work)"})])
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
    command("evaluate", cmd_evaluate, "edit the model and judge the images (Ray job)",
            "Make every edit of the config's 'evaluation:' section (cad-erase, random, cad-amplify at each ratio; "
            "finetune, cad-finetune, finetune+cad-amplify), generate images of every prompt with the same seeds "
            "before and after, judge them on Ray actors and write evaluation/ (one row per image) and "
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
                ("--root", {"default": None, "help": "run root (default: runs/<config name>)"}), *RAY])
    command("stop-workers", cmd_stop_workers, "stop the workers --keep-workers left on a Ray cluster",
            "Stop every worker that a command with --keep-workers left running on the Ray cluster at --address "
            "(they hold their CPUs or GPUs until then).", [], [
                ("--address", {"required": True, "help": "Ray cluster address, e.g. auto"})])
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


def _stdout_reader_gone() -> bool:
    """stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll here, or stdout is no file
        return False


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
    except BrokenPipeError:  # `cad-ray top ... | head`: the reader has what it wanted; no traceback, as any Unix tool
        if not _stdout_reader_gone():  # another pipe's break (a socket, a worker) is a failure: raised
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 141
    except Exception as e:  # S3 unreachable or refused (no credentials, a closed endpoint): botocore's own words
        if not type(e).__module__.startswith(("botocore", "aiobotocore")):
            raise
        print(f"cad-ray {args.command}: error: S3: {described(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
