"""What each erasure method costs on the built-in digits model, in one process (model already loaded): the
seconds to make one concept's edit from nothing, as `jobs/configs/digits-baselines.yaml` makes it.

    python bench/baseline_cost.py [--concept seven] [--threads 2] [--json PATH]

- cad: the erase objective's scores over ff+attn2+tokens (samples 8, T = 50), the work behind every CAD-Erase
  selection (and behind gradient and magnitude, which are read from the same table);
- conceptprune: its statistics (8 concept and 8 base trajectories, T = 50, hooks on ff.net.2) and the scores;
- uce: the closed form over every attn2 key and value projection, the other digits' wordings kept;
- finetune: the ESD-style baseline, 100 Adam steps over the points of 8 trajectories.
Selecting and zeroing are milliseconds for every method and are not timed. Each is the best of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    from cad_ray.config import ConceptSpec
    from cad_ray.digits import DIGIT_WORDS
    from cad_ray.method.attribution import CAD
    from cad_ray.method.baselines import ConceptPrune, uce_weights
    from cad_ray.method.concepts import build_concept
    from cad_ray.method.editing import finetune
    from cad_ray.method.objectives import make_objective
    from cad_ray.models import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="seven")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    concept = build_concept(ConceptSpec(name=args.concept), model)
    samples = list(range(args.samples))
    erase = make_objective("erase", steps=50)
    cad = CAD(model, erase, "ff+attn2+tokens", chunk_size=64, batch=4)
    prune = ConceptPrune(model, timesteps=10, steps=50, batch=4)
    others = [w for w in DIGIT_WORDS if w != args.concept]
    kept = [p for w in others for p in build_concept(ConceptSpec(name=w), model).prompts]
    seconds = {
        "cad": best_of(args.repeats, lambda: cad.attribute(concept, samples, block=4)),
        "conceptprune": best_of(args.repeats, lambda: prune.finish(concept, prune.partial_sum(concept, samples))),
        "uce": best_of(args.repeats, lambda: uce_weights(model, list(concept.prompts), kept)),
        "finetune": best_of(1, lambda: finetune(model, concept, erase, "ff+attn2+tokens", samples, 0, 100, 3e-3,
                                                None, 64, 1.0)),
    }
    out = {"concept": args.concept, "samples": args.samples, "threads": args.threads, "seconds": seconds}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
