"""Is it gone? One digit's erasure by several methods, each attacked by the completeness probes, on the digits model.

    python bench/erasure_probes.py --root runs/erase --target three --methods esd cad-unlearn-esd cad-unlearn-images
    python bench/erasure_probes.py --root runs/erase --target three --methods none never-learned \
        --reference tests/fixtures/never-three

`--root`: a completed attribution run over ff+attn2 (jobs/configs/digits-erase.yaml) for the CAD selections.
Methods: `none` (the unedited model: the ceiling), `never-learned` (the `--reference` model: the floor),
`words` (the target's two word rows zeroed), `esd` (ESD-style fine-tuning of every ff+attn2+tokens weight, as
the evaluation's `finetune`), `cad-unlearn-<target>` (adversarial unlearning on `--selection` at `--ratio`,
`cad_ray.method.unlearning`, with that target: esd, images, nearest). For each: plain-prompt accuracy,
inversion (learned / untrained), completion at 0.25/0.5/0.75 with own and empty prompts, every other digit's
accuracy, wall seconds of the edit. One JSON line per method (results for docs/editing.md).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="runs/erase")
    parser.add_argument("--target", default="three")
    parser.add_argument("--methods", nargs="+", default=["none", "esd", "cad-unlearn-esd", "cad-unlearn-images"])
    parser.add_argument("--reference", default="tests/fixtures/never-three")
    parser.add_argument("--selection", default="ff+attn2/global/kind-max")
    parser.add_argument("--ratio", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unlearn-steps", type=int, default=100)
    parser.add_argument("--images-from", type=float, default=0.1)
    parser.add_argument("--retain-images", type=int, default=32, help="images of each other digit kept")
    parser.add_argument("--steps", type=int, default=20, help="DDPM steps of every judged image")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cad_ray.digits import DIGIT_WORDS, all_prompts
    from cad_ray.digits.concepts import digits_concept
    from cad_ray.digits.judges import builtin_judges
    from cad_ray.method.editing import Selection, edited, finetune, weights_replaced
    from cad_ray.method.objectives import Concept, make_objective
    from cad_ray.method.probes import ProbeSettings, TextualInversion, complete, concept_images, word_id
    from cad_ray.method.scopes import never_selected
    from cad_ray.method.unlearning import UnlearningSettings, adversarial_finetune
    from cad_ray.models import load_model
    from cad_ray.store import ScoreStore

    model, judges = load_model(None), builtin_judges()
    digit = DIGIT_WORDS.index(args.target)
    prompts = all_prompts(digit, None)
    x0 = concept_images(model, prompts, 128 + 64, seed=0, steps=args.steps)
    learn, start = x0[:128], x0[128:]

    def shown(images, d=digit) -> float:
        return float((judges.digits(images, reject=True) == d).mean())

    def measure(m) -> dict:
        out = {"plain": shown(m.sample([prompts[k % len(prompts)] for k in range(32)], seed=7, steps=args.steps).images)}
        attack = TextualInversion(m, args.target, prompts, ProbeSettings())
        vector = attack.fit(m, learn, seed=0)
        out["inversion"] = shown(attack.sample(m, vector, 64, 1, steps=args.steps).images)
        out["inversion_untrained"] = shown(attack.sample(m, attack.initial(m), 64, 1, steps=args.steps).images)
        for strength in (0.25, 0.5, 0.75):
            for wording, asked in (("own", [prompts[k % len(prompts)] for k in range(64)]), ("empty", [""] * 64)):
                out[f"completion_{strength:g}_{wording}"] = shown(complete(m, start, asked, strength, 3,
                                                                           steps=args.steps).images)
        kept = {}
        for other in range(10):
            if other != digit:
                ask = all_prompts(other, None)
                kept[DIGIT_WORDS[other]] = shown(m.sample([ask[k % len(ask)] for k in range(16)], seed=7,
                                                          steps=args.steps).images, other)
        out["worst_other"] = min(kept.values())
        out["others"] = kept
        return out

    spec_prompts, bases, _ = digits_concept(args.target)
    concept = Concept(args.target, tuple(spec_prompts), tuple(bases), None)
    for method in args.methods:
        started = time.time()
        if method == "never-learned":
            result = measure(load_model(args.reference))
        elif method == "none":
            result = measure(model)
        elif method == "words":
            table = model.text_encoder.get_input_embeddings().weight
            name = next(n for n, p in model.named_parameters() if p is table)
            mask = np.zeros(tuple(table.shape), dtype=bool)
            mask[[word_id(model, args.target), word_id(model, str(digit))]] = True
            with edited(model, {name: mask}):
                result = measure(model)
        elif method == "esd":
            weights = finetune(model, concept, make_objective("erase", steps=50, points_per_sample=None),
                               "ff+attn2+tokens", list(range(8)), 0, 100, 3e-3, None, 64, 1.0)
            seconds = time.time() - started
            with weights_replaced(model, weights):
                result = measure(model)
            result["edit_seconds"] = seconds
        elif method.startswith("cad-unlearn-"):
            store = ScoreStore(args.root)
            masks = store.masks(args.target, Selection.parse(args.selection), args.ratio,
                                protected=never_selected(model))
            others = {w: all_prompts(d, None) for d, w in enumerate(DIGIT_WORDS) if d != digit}
            settings = UnlearningSettings(rounds=args.rounds, steps=args.unlearn_steps,
                                          target=method.removeprefix("cad-unlearn-"), images_from=args.images_from,
                                          retain_images=args.retain_images,
                                          sampling_steps=args.steps)
            weights = adversarial_finetune(model, concept, args.target, others, "ff+attn2", masks, settings, seed=0)
            seconds = time.time() - started
            with weights_replaced(model, weights):
                result = measure(model)
            result["edit_seconds"] = seconds
            result["moved"] = int(sum(m.sum() for m in masks.values()))
        else:
            raise SystemExit(f"unknown method {method!r}")
        print(json.dumps({"target": args.target, "method": method, **result}), flush=True)


if __name__ == "__main__":
    main()
