"""How well the digits model draws what it is asked for, judged by the independent judges."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cad_ray.digits import COLOUR_NAMES, canonical_prompt, parse_prompt
from cad_ray.digits.judges import builtin_judges


def judge_samples(model, prompts: list[str], seed: int, guidance: float | None = None, steps: int | None = None,
                  judges=None, batch_size: int = 200, progress: bool = False) -> pd.DataFrame:
    """Sample one image per prompt (image k from seed stream k) and judge it: one row per image. `progress`:
    a bar of images judged, and one of the current batch's sampling steps."""
    from tqdm.auto import tqdm

    judges = judges or builtin_judges()
    rows = []
    bar = tqdm(total=len(prompts), unit="image", desc="judged", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        images = model.sample(chunk, seed=seed, guidance=guidance, steps=steps, ids=range(start, start + len(chunk)),
                              progress=progress).images
        bar.update(len(chunk))
        digits, colours = judges.digits(images, reject=True), judges.colours(images)  # -1: no digit
        for prompt, d, c in zip(chunk, digits, colours):
            asked = parse_prompt(prompt)
            rows.append({"prompt": prompt, "digit": asked.digit, "colour": asked.colour,
                         "predicted_digit": int(d), "predicted_colour": COLOUR_NAMES[int(c)]})
    bar.close()
    table = pd.DataFrame(rows)
    table["digit_correct"] = table["digit"] == table["predicted_digit"]
    table["colour_correct"] = table["colour"] == table["predicted_colour"]
    return table


def digits_quality(model, n_per_prompt: int, seed: int = 0, guidance: float | None = None,
                   steps: int | None = None, judges=None, progress: bool = False) -> pd.DataFrame:
    """Judge `n_per_prompt` samples of every (digit, colour) prompt ("a red seven", ...)."""
    prompts = [canonical_prompt(d, c) for d in range(10) for c in COLOUR_NAMES for _ in range(n_per_prompt)]
    return judge_samples(model, prompts, seed, guidance, steps, judges, progress=progress)


def quality_summary(table: pd.DataFrame) -> dict:
    per_digit = table.groupby("digit")["digit_correct"].mean()
    return {
        "images": int(len(table)),
        "digit_accuracy": float(table["digit_correct"].mean()),
        "worst_digit": int(per_digit.idxmin()),
        "worst_digit_accuracy": float(per_digit.min()),
        "colour_accuracy": float(table["colour_correct"].mean()),
        "per_digit": {int(k): round(float(v), 4) for k, v in per_digit.items()},
        "per_colour": {k: round(float(v), 4) for k, v in table.groupby("colour")["colour_correct"].mean().items()},
    }


def meets_quality_bar(summary: dict) -> bool:
    """The bar of the digits world: digit >= 90% overall and >= 75% for each digit, colour >= 95%."""
    return (summary["digit_accuracy"] >= 0.90 and summary["worst_digit_accuracy"] >= 0.75
            and summary["colour_accuracy"] >= 0.95)


def image_grid(images: np.ndarray, columns: int | None = None, cell: int = 64, gap: int = 2) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] -> one uint8 grid, each image upscaled (nearest) to about `cell` pixels."""
    n, h, w, _ = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    scale = max(1, cell // max(h, w))
    big = np.kron(np.clip(images, 0, 1), np.ones((1, scale, scale, 1)))
    H, W = h * scale, w * scale
    grid = np.full((rows * (H + gap) + gap, columns * (W + gap) + gap, 3), 0.35)
    for k in range(n):
        r, c = divmod(k, columns)
        grid[gap + r * (H + gap): gap + r * (H + gap) + H, gap + c * (W + gap): gap + c * (W + gap) + W] = big[k]
    return (grid * 255).round().astype(np.uint8)
