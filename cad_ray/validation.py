"""Random-ablation validation, core part (no Ray): seeded random subsets of a scope's components, the actual
change of J when they are zeroed, and the statistics that compare it with a prediction.

The actual change is measured on a fixed evaluation batch of points in two conventions: the base term of the
erase objective frozen at the original weights (exactly what the first-order estimate approximates), and
the base term recomputed with the ablated weights (the full counterfactual).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import CadRayError
from .objectives import Concept, point_values
from .scopes import select_parameters
from .seeds import numpy_rng


def random_subset(n_components: int, fraction: float, ablation: int, seed: int) -> np.ndarray:
    """Sorted flat indices of ablation number `ablation` at `fraction`; re-drawn identically from its seed."""
    if not 0 < fraction < 1:
        raise CadRayError(f"ablation fraction must be in (0, 1), got {fraction}")
    if ablation < 0:
        raise CadRayError(f"ablation index must be non-negative, got {ablation}")
    size = max(1, int(round(fraction * n_components)))
    rng = numpy_rng(seed, "ablation", repr(float(fraction)), ablation)
    return np.sort(rng.choice(n_components, size=size, replace=False))


@dataclass
class ObjectiveChange:
    frozen_base: float  # J(ablated) - J with the base term at the original weights
    ablated_base: float  # the same with the base term recomputed under the ablation


class AblationEvaluator:
    """J on a fixed batch of points, before and after zeroing flat index sets of the scope's components."""

    def __init__(self, model, objective, concept: Concept, scope: str, samples: list[int], seed: int):
        if not samples:
            raise CadRayError("the evaluation batch needs at least one sample")
        self.model = model
        self.parameters = select_parameters(model.named_parameters(), scope)
        self.sizes = [p.numel() for _, p in self.parameters]
        self.offsets = np.cumsum([0] + self.sizes)
        self.points = objective.points(model, concept, list(samples), seed)
        self.weights = self.points.weights()
        self.n_samples = len(samples)
        self.base = self._values()

    @property
    def n_components(self) -> int:
        return int(self.offsets[-1])

    @torch.no_grad()
    def _values(self) -> tuple[float, float]:
        p = self.points
        frozen = (point_values(self.model, p).double() * self.weights).sum() / self.n_samples
        if p.base_cond is None:  # amplify: no base term, both conventions agree
            return float(frozen), float(frozen)
        target = self.model.predict_noise(p.x, p.t, p.base_cond)
        recomputed = (point_values(self.model, p, target).double() * self.weights).sum() / self.n_samples
        return float(frozen), float(recomputed)

    @torch.no_grad()
    def change(self, flat_indices: np.ndarray) -> ObjectiveChange:
        """Zero the components, measure J in both conventions, and restore the weights exactly."""
        flat_indices = np.asarray(flat_indices, dtype=np.int64)
        if flat_indices.size and (flat_indices.min() < 0 or flat_indices.max() >= self.n_components):
            raise CadRayError(f"component index out of range 0..{self.n_components - 1}")
        saved = []
        for k, (_, p) in enumerate(self.parameters):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            local = flat_indices[(flat_indices >= lo) & (flat_indices < hi)] - lo
            if local.size:
                idx = torch.from_numpy(local).to(p.device)
                saved.append((p, idx, p.view(-1)[idx].clone()))
                p.view(-1)[idx] = 0
        try:
            frozen, recomputed = self._values()
        finally:
            for p, idx, values in saved:
                p.view(-1)[idx] = values
        return ObjectiveChange(frozen - self.base[0], recomputed - self.base[1])


def first_order_prediction(flat_scores: np.ndarray, flat_indices: np.ndarray) -> float:
    """CAD's prediction of J(ablated) - J: minus the sum of the zeroed components' scores."""
    return -float(np.asarray(flat_scores, dtype=np.float64)[flat_indices].sum())


def _rank(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    # average ranks of ties
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_rank(np.asarray(x)), _rank(np.asarray(y)))


def bootstrap_interval(x, y, statistic, resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(x, y) over resampled pairs."""
    x, y = np.asarray(x), np.asarray(y)
    rng = np.random.default_rng(seed)
    values = [statistic(x[i], y[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(resamples))]
    values = np.asarray([v for v in values if np.isfinite(v)])
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))
