"""`cad-ray attribute` and the queries of its scores: `top`, `layers`, `overlap`.
Libraries (torch, numpy, pandas, pyarrow, pydantic, Ray), and the modules of cad_ray that import them, are
imported inside the commands, lazy for start-up speed (`cad-ray --help` imports none of them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cad_ray.errors import CadRayError


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


def in_process(args: argparse.Namespace, concepts: int) -> bool:
    """One concept on this machine and Ray not asked for (no --ray, no --address, no --workers above 1): Ray's
    start costs more than the work it would spread (docs/benchmarks.md, "One concept without Ray")."""
    return (concepts == 1 and not args.ray and args.address is None and (args.workers or 1) == 1
            and not args.keep_workers)


def cmd_attribute(args: argparse.Namespace) -> None:
    from cad_ray.config import load_config
    from cad_ray.distributed import run_attribution
    from cad_ray.store import ScoreStore

    config = load_config(args.config, {"workers": args.workers, "device": args.device})
    root = args.root or str(Path("runs") / Path(args.config).stem)
    local = args.local or in_process(args, len(config.concepts))
    if local and not args.local and not args.quiet:
        print("one concept: computed in this process (--ray starts Ray for it)", flush=True)
    manifest = run_attribution(config, root, address=args.address, overwrite=args.overwrite, local=local,
                               progress=not args.quiet, keep_workers=args.keep_workers)
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
