"""Train the built-in digits model from a seed and save it in diffusers folder layout.

    python jobs/train_digits.py --seed 0 --steps 6000 --out cad_ray/assets/digits-model

reproduces the shipped weights (same seed, same torch build, same thread count).

    python jobs/train_digits.py --exclude three --out runs/never-three

trains a reference that never saw a three (its images are left out of the data, its words stay in the vocabulary
with their untrained embeddings): the completeness probes' "as erased as never learned" line (docs/editing.md).
`--exclude zero four seven eight red white` leaves out several digits and colours at once (no image is drawn in a
left-out colour): one reference for each of them (tests/fixtures/never-*). Training data are the
real scikit-learn digits in four colours with prompts from the digits grammar (cad_ray.digits); the judges
are trained separately (jobs/train_judges.py) and never see generated images.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    parser.add_argument("--steps", type=int, default=6000, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine decay after warm-up)")
    parser.add_argument("--ema", type=float, default=0.999, help="decay of the weight average that is saved")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (part of what makes a run reproducible)")
    parser.add_argument("--out", default="cad_ray/assets/digits-model", help="folder to write the model to")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--exclude", nargs="+", default=[], metavar="CONCEPT",
                        help="digits (words: three) and colours (red) whose images are left out of training: a "
                             "never-learned reference for each of them")
    args = parser.parse_args(argv)

    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from cad_ray.digits import COLOUR_NAMES, DIGIT_WORDS, real_digits, training_batch
    from cad_ray.models.digits import SCHEDULER_CONFIG, DigitsModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = DigitsModel.build(seed=args.seed)
    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    modules = torch.nn.ModuleDict({"unet": model.unet, "text_encoder": model.text_encoder})
    modules.requires_grad_(True).train()
    ema = copy.deepcopy(modules).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = min(500, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))) * 0.95 + 0.05

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    unknown = sorted(set(args.exclude) - set(DIGIT_WORDS) - set(COLOUR_NAMES))
    if unknown:
        parser.error(f"--exclude takes digit and colour words ({', '.join(DIGIT_WORDS + COLOUR_NAMES)}), "
                     f"not {', '.join(unknown)}")
    colours = tuple(c for c in COLOUR_NAMES if c not in args.exclude)
    if not colours:
        parser.error("--exclude leaves no colour to draw the digits in")
    labels = real_digits()[1]
    excluded = [DIGIT_WORDS.index(word) for word in args.exclude if word in DIGIT_WORDS]
    indices = np.flatnonzero(~np.isin(labels, excluded))
    alphas = noise_scheduler.alphas_cumprod
    log, running, start = [], [], time.time()
    for step in tqdm(range(args.steps), desc="training", unit="step", mininterval=5):
        images, prompts = training_batch(rng, args.batch_size, indices, colours=colours)
        x0 = DigitsModel.to_latents(images)
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),))
        x_t = noise_scheduler.add_noise(x0, noise, t)
        cond = model.text_encoder(torch.from_numpy(model.tokenizer(prompts))).last_hidden_state
        eps = model.unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
        # min-SNR-5 weighting: stops the easy low-noise steps from dominating the loss
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=5.0) / snr.clamp(min=1e-8)
        weight = weight / weight.mean()
        loss = (weight * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), modules.parameters()):
                e.lerp_(p, 1 - decay)
        running.append(loss.item())
        if (step + 1) % args.log_every == 0:
            log.append({"step": step + 1, "loss": float(np.mean(running)), "seconds": time.time() - start})
            print(json.dumps(log[-1]), flush=True)
            running = []

    model.unet.load_state_dict(ema["unet"].state_dict())
    model.text_encoder.load_state_dict(ema["text_encoder"].state_dict())
    out = Path(args.out)
    model.save_pretrained(out)
    summary = {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "ema": args.ema, "threads": args.threads, "exclude": sorted(args.exclude), "torch": torch.__version__,
               "wall_seconds": round(time.time() - start, 1), "final_loss": log[-1]["loss"] if log else None,
               "fingerprint": model.fingerprint()}
    (out / "training.json").write_text(json.dumps({"summary": summary, "log": log}, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
