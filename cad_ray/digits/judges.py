"""Judges for the digits world: a digit classifier and a colour classifier.

Both are trained only on the real scikit-learn digits (jobs/train_judges.py), never on generated images, and
share nothing with the generator. The digit judge sees ink intensity (max over channels), so its verdict does
not depend on colour; its penultimate layer gives the features for the Frechet distance.

The digit judge alone names one of ten digits for any image, noise included. `DigitReject` says whether an image
is a digit at all: its ink, scaled to its brightest pixel (so a dimmed digit is still a digit), must lie near the
principal subspace of the real digits (reconstruction distance at most the 99.9th percentile of the real training
digits'), and it must have some ink. `digits(images, reject=True)` gives NO_DIGIT (-1) for the rest, and
`digit_words` the word "none".
"""

from __future__ import annotations

import warnings

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cad_ray.digits import COLOUR_NAMES, DIGIT_WORDS, IMAGE_SIZE, real_digits, split_indices
from cad_ray.errors import CadRayError

JUDGES_DIR = Path(__file__).resolve().parent.parent / "assets" / "judges"
NO_DIGIT = -1  # `digits(images, reject=True)` for an image that is no digit (noise, a blank or uniform image)
NO_DIGIT_WORD = "none"  # its word (`digit_words`)
REJECT_COMPONENTS = 12  # principal components of the real digits' normalised ink that a digit lies near
REJECT_QUANTILE = 0.999  # the threshold: this quantile of the real training digits' distances
INK_FLOOR = 0.1  # an image whose brightest pixel is below this has no ink: no digit
# a dim image (brightest pixel below DIM_PEAK: under any real digit at half brightness) must lie as near the
# digits' subspace as this quantile of the real digits: at low contrast the shape is the only evidence, and a broken
# model's dark noise lies between the 99% and 99.9% real distances (docs/editing.md)
DIM_PEAK = 0.4
DIM_QUANTILE = 0.99


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
    """Each pixel's ink whatever its colour: the channels' maximum (a tensor keeps its gradients)."""
    images = images.float() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images, np.float32))
    return images.max(dim=-1).values


def normalised_ink(images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, 64) ink scaled so each image's brightest pixel is 1, and (N,) each image's brightest pixel."""
    ink = intensity(images).numpy().reshape(len(images), -1).astype(np.float64)
    peak = ink.max(axis=1)
    return ink / np.maximum(peak, 1e-6)[:, None], peak


class DigitReject:
    """Whether an image is a digit at all: its normalised ink's distance to the real digits' principal subspace
    (`REJECT_COMPONENTS` components) is at most `threshold`, and its brightest pixel is at least `ink_floor`; a
    dim one (brightest pixel below `dim_peak`) lies within `dim_threshold`. Fitted on real digits only (`fit`),
    like the judges."""

    def __init__(self, mean: np.ndarray, basis: np.ndarray, threshold: float, ink_floor: float = INK_FLOOR,
                 dim_threshold: float = np.inf, dim_peak: float = DIM_PEAK):
        self.mean, self.basis = np.asarray(mean, np.float64), np.asarray(basis, np.float64)
        self.threshold, self.ink_floor = float(threshold), float(ink_floor)
        self.dim_threshold, self.dim_peak = float(dim_threshold), float(dim_peak)

    @classmethod
    def fit(cls, intensities: np.ndarray, components: int = REJECT_COMPONENTS,
            quantile: float = REJECT_QUANTILE) -> "DigitReject":
        """From real digits' (N, 8, 8) intensities in [0, 1]."""
        ink, _ = normalised_ink(np.asarray(intensities, np.float32)[..., None])
        mean = ink.mean(axis=0)
        _, _, vt = np.linalg.svd(ink - mean, full_matrices=False)
        reject = cls(mean, vt[:components], np.inf)
        distances = reject.distance(intensities[..., None])
        reject.threshold = float(np.quantile(distances, quantile))
        reject.dim_threshold = float(np.quantile(distances, DIM_QUANTILE))
        return reject

    def distance(self, images: np.ndarray) -> np.ndarray:
        """(N,) distance of each image's normalised ink to the real digits' principal subspace."""
        ink, _ = normalised_ink(images)
        centred = ink - self.mean
        residual = centred - (centred @ self.basis.T) @ self.basis
        return np.sqrt((residual ** 2).sum(axis=1))

    def is_digit(self, images: np.ndarray) -> np.ndarray:
        _, peak = normalised_ink(images)
        distance = self.distance(images)
        return (peak >= self.ink_floor) & (distance <= self.threshold) & \
            ((peak >= self.dim_peak) | (distance <= self.dim_threshold))

    def tensors(self) -> dict:
        return {"mean": torch.from_numpy(self.mean), "basis": torch.from_numpy(np.ascontiguousarray(self.basis)),
                "threshold": torch.tensor([self.threshold], dtype=torch.float64),
                "ink_floor": torch.tensor([self.ink_floor], dtype=torch.float64),
                "dim_threshold": torch.tensor([self.dim_threshold], dtype=torch.float64),
                "dim_peak": torch.tensor([self.dim_peak], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict) -> "DigitReject":
        # a reject saved before the dim rule: none (dim_threshold infinite)
        return cls(tensors["mean"].numpy(), tensors["basis"].numpy(), float(tensors["threshold"][0]),
                   float(tensors["ink_floor"][0]), float(tensors.get("dim_threshold", torch.tensor([np.inf]))[0]),
                   float(tensors.get("dim_peak", torch.tensor([DIM_PEAK]))[0]))


def real_digits_reject() -> DigitReject:
    """The reject fitted on the real training digits (the judges' own split), for a judges folder without one."""
    images, labels = real_digits()
    train, _ = split_indices(len(labels))
    return DigitReject.fit(images[train])


class DigitsJudges:
    """Verdicts on (N, 8, 8, 3) images in [0, 1]: which digit (or none), which colour, and judge features."""

    def __init__(self, digit_net: DigitNet, colour_net: ColourNet, reject: DigitReject | None = None):
        self.digit_net = digit_net.eval()
        self.colour_net = colour_net.eval()
        self.reject = reject if reject is not None else real_digits_reject()

    @torch.no_grad()
    def digit_probabilities(self, images: np.ndarray) -> np.ndarray:
        return torch.softmax(self.digit_net(intensity(images)), dim=-1).numpy()

    def digits(self, images: np.ndarray, reject: bool = False) -> np.ndarray:
        """The digit (0-9) each image shows; with `reject`, NO_DIGIT (-1) for an image that is no digit (noise,
        a blank or uniform image: `is_digit`). Without it, the classifier's top class for any image."""
        digits = self.digit_probabilities(images).argmax(axis=1)
        return np.where(self.is_digit(images), digits, NO_DIGIT) if reject else digits

    def is_digit(self, images: np.ndarray) -> np.ndarray:
        """(N,) bool: whether each image is a digit at all (`DigitReject`)."""
        return self.reject.is_digit(images)

    def digit_words(self, images: np.ndarray) -> list[str]:
        """Each image's digit as a word ("seven"), or NO_DIGIT_WORD ("none") for an image that is no digit."""
        return [NO_DIGIT_WORD if d == NO_DIGIT else DIGIT_WORDS[d] for d in self.digits(images, reject=True)]

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
        save_file(self.reject.tensors(), str(folder / "reject.safetensors"))

    @classmethod
    def load(cls, folder: Path = JUDGES_DIR) -> "DigitsJudges":
        from safetensors.torch import load_file

        try:
            digit, colour = DigitNet(), ColourNet()
            digit.load_state_dict(load_file(str(folder / "digit.safetensors")))
            colour.load_state_dict(load_file(str(folder / "colour.safetensors")))
            # a folder written before the reject existed: fit it on the real digits, as jobs/train_judges.py does
            reject_file = folder / "reject.safetensors"
            reject = DigitReject.from_tensors(load_file(str(reject_file))) if reject_file.is_file() else None
        except Exception as e:
            raise CadRayError(f"cannot load the digits judges from {folder}: {e}") from None
        return cls(digit, colour, reject)


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

