"""Judges for the digits world: a digit classifier and a colour classifier.

Both are trained only on the real scikit-learn digits (jobs/train_judges.py), never on generated images, and
share nothing with the generator. The digit judge sees ink intensity (max over channels), so its verdict does
not depend on colour; its penultimate layer gives the features for the Frechet distance.
"""

from __future__ import annotations

import warnings

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cad_ray.digits import COLOUR_NAMES, IMAGE_SIZE
from cad_ray.errors import CadRayError

JUDGES_DIR = Path(__file__).resolve().parent.parent / "assets" / "judges"


class DigitNet(nn.Module):
    def __init__(self, hidden: int = 256, features: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SIZE * IMAGE_SIZE, hidden), nn.ReLU(),
                                  nn.Dropout(0.2), nn.Linear(hidden, features), nn.ReLU())
        self.head = nn.Linear(features, 10)

    def forward(self, intensity: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(intensity))


class ColourNet(nn.Module):
    """Softmax regression on the share of ink in each channel (and the total ink)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, len(COLOUR_NAMES))

    @staticmethod
    def features(images: torch.Tensor) -> torch.Tensor:
        ink = images.sum(dim=(1, 2))  # (N, 3)
        total = ink.sum(dim=1, keepdim=True)
        return torch.cat([ink / total.clamp(min=1e-3), total / (IMAGE_SIZE * IMAGE_SIZE)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(images))


def intensity(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    return images.max(dim=-1).values


class DigitsJudges:
    """Verdicts on (N, 8, 8, 3) images in [0, 1]: which digit, which colour, and judge features."""

    def __init__(self, digit_net: DigitNet, colour_net: ColourNet):
        self.digit_net = digit_net.eval()
        self.colour_net = colour_net.eval()

    @torch.no_grad()
    def digit_probabilities(self, images: np.ndarray) -> np.ndarray:
        return torch.softmax(self.digit_net(intensity(images)), dim=-1).numpy()

    def digits(self, images: np.ndarray) -> np.ndarray:
        return self.digit_probabilities(images).argmax(axis=1)

    @torch.no_grad()
    def colours(self, images: np.ndarray) -> np.ndarray:
        """Index into COLOUR_NAMES of each image's colour."""
        return self.colour_net(torch.as_tensor(np.asarray(images, dtype=np.float32))).argmax(dim=-1).numpy()

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        return self.digit_net.body(intensity(images)).numpy().astype(np.float64)

    def save(self, folder: Path = JUDGES_DIR) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.digit_net.state_dict(), str(folder / "digit.safetensors"))
        save_file(self.colour_net.state_dict(), str(folder / "colour.safetensors"))

    @classmethod
    def load(cls, folder: Path = JUDGES_DIR) -> "DigitsJudges":
        from safetensors.torch import load_file

        try:
            digit, colour = DigitNet(), ColourNet()
            digit.load_state_dict(load_file(str(folder / "digit.safetensors")))
            colour.load_state_dict(load_file(str(folder / "colour.safetensors")))
        except Exception as e:
            raise CadRayError(f"cannot load the digits judges from {folder}: {e}") from None
        return cls(digit, colour)


@lru_cache(maxsize=1)
def builtin_judges() -> DigitsJudges:
    return DigitsJudges.load()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (as FID, on judge features); NaN when a set
    has no more images than feature dimensions."""
    from scipy import linalg

    if min(len(a), len(b)) <= a.shape[1]:
        return float("nan")  # fewer images than feature dimensions: the covariance is singular
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # near-singular products are common with few images per edit; the FID convention takes the real part
        # regardless. No `disp` argument: SciPy 1.18 removed it (found on the GPU machine's SciPy)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))

