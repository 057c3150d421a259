"""Train the digits judges on real digits only and report their held-out accuracy.

    python jobs/train_judges.py --seed 0

The digit judge trains on 80% of scikit-learn's real digits (cad_ray.digits.split_indices) with light
noise/contrast augmentation and is scored on the other 20%; the colour judge trains on the same real digits
rendered in every colour. Neither ever sees a generated image. The reject (is an image a digit at all:
cad_ray.digits.judges.DigitReject) is fitted on the same training digits; the summary gives the share of held-out
digits it rejects and the share of uniform-noise images it keeps.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--out", default=None, help="folder (default: the package's assets/judges)")
    args = parser.parse_args(argv)

    from pathlib import Path

    from cad_ray.digits import COLOUR_NAMES, real_digits, render, split_indices
    from cad_ray.digits.judges import JUDGES_DIR, ColourNet, DigitNet, DigitReject, DigitsJudges

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    start = time.time()
    images, labels = real_digits()
    train, held_out = split_indices(len(labels))
    x, y = torch.from_numpy(images[train]), torch.from_numpy(labels[train])

    digit = DigitNet()
    opt = torch.optim.Adam(digit.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(args.epochs):
        digit.train()
        # augmentation: contrast in [0.6, 1] and Gaussian noise, so the judge tolerates imperfect ink
        scale = torch.empty(len(x), 1, 1).uniform_(0.6, 1.0)
        xa = (x * scale + 0.05 * torch.randn_like(x)).clamp(0, 1)
        loss = torch.nn.functional.cross_entropy(digit(xa), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    colour = ColourNet()
    c_imgs = np.concatenate([render(images[train], c) for c in COLOUR_NAMES])
    c_lab = np.repeat(np.arange(len(COLOUR_NAMES)), len(train))
    cx, cy = torch.from_numpy(c_imgs), torch.from_numpy(c_lab)
    opt = torch.optim.Adam(colour.parameters(), lr=0.05)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(colour(cx), cy)
        opt.zero_grad()
        loss.backward()
        opt.step()

    judges = DigitsJudges(digit, colour, DigitReject.fit(images[train]))
    held_digit = float((judges.digits(render(images[held_out], "white")) == labels[held_out]).mean())
    colour_acc = {c: float((judges.colours(render(images[held_out], c)) == i).mean())
                  for i, c in enumerate(COLOUR_NAMES)}
    held_rendered = np.concatenate([render(images[held_out], c) for c in COLOUR_NAMES])
    noise = np.random.default_rng(args.seed).random((2000, *held_rendered.shape[1:]), dtype=np.float32)
    reject = {"threshold": round(judges.reject.threshold, 4), "ink_floor": judges.reject.ink_floor,
              "held_out_digits_rejected": round(float(1 - judges.is_digit(held_rendered).mean()), 4),
              "uniform_noise_kept": round(float(judges.is_digit(noise).mean()), 4)}
    out = Path(args.out) if args.out else JUDGES_DIR
    judges.save(out)
    summary = {"seed": args.seed, "train_digits": len(train), "held_out_digits": len(held_out),
               "digit_accuracy_held_out": round(held_digit, 4), "colour_accuracy_held_out": colour_acc,
               "reject": reject,
               "wall_seconds": round(time.time() - start, 1)}
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
