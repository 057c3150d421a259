"""Does a half-precision model rank components like its float32 copy? (issue 11: fp16/bf16, accumulators float64)

    python bench/half_precision.py [--concepts seven one] [--samples 8] [--scope ff] [--json out.json]

Loads the built-in digits model (or --model) in float32, bfloat16 and float16, computes CAD erase scores for each
concept with the same seeds, and reports the Jaccard index of the top-1% (and top-0.1%) sets and the Pearson
correlation of the scores against float32; and, for scale, float32 against itself with other trajectories (another
seed): the ranking's own sampling noise at this number of samples. Gradients are summed in float64 whatever the model's dtype
(`cad_ray.method.attribution.CAD`); the objective compares predictions in float32 (`point_values`).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def scores_of(model, concept, samples: int, scope: str, steps: int, seed: int = 0) -> np.ndarray:
    from cad_ray.method.attribution import CAD
    from cad_ray.method.objectives import EraseObjective

    attribution = CAD(model, EraseObjective(steps=steps), scope, chunk_size=64, seed=seed).attribute(concept, samples)
    return torch.cat([s.flatten() for s in attribution.scores.values()]).numpy()


def main() -> None:
    from cad_ray.config import ConceptSpec
    from cad_ray.method.concepts import build_concept
    from cad_ray.method.estimators import jaccard, pearson, top_set
    from cad_ray.models import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or s3:// URI (default: the digits model)")
    parser.add_argument("--concepts", nargs="+", default=["seven", "one", "four"])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scope", default="ff")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32-other-seed"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    reference = load_model(args.model)
    for name in args.concepts:
        concept = build_concept(ConceptSpec(name=name), reference)
        start = time.perf_counter()
        base = scores_of(reference, concept, args.samples, args.scope, args.steps)
        base_s = time.perf_counter() - start
        for dtype in args.dtypes:
            other_seed = dtype == "float32-other-seed"
            model = reference if other_seed else load_model(args.model, dtype=getattr(torch, dtype))
            start = time.perf_counter()
            half = scores_of(model, concept, args.samples, args.scope, args.steps, seed=1 if other_seed else 0)
            row = {"concept": name, "dtype": dtype, "components": int(base.size),
                   "jaccard_top1": jaccard(top_set(base, 0.01), top_set(half, 0.01)),
                   "jaccard_top01": jaccard(top_set(base, 0.001), top_set(half, 0.001)),
                   "pearson": pearson(base, half), "float32_s": round(base_s, 1),
                   "half_s": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
