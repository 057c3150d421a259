"""Random-ablation validation, core part (no Ray): seeded random subsets of a scope's components, the actual
change of J when they are zeroed, three estimators of that change, and the statistics that compare them.

The actual change is measured on a fixed evaluation batch of points in two conventions: the base term of the
erase objective frozen at the original weights (exactly what the estimators approximate), and the base term
recomputed with the ablated weights (the full counterfactual).

Estimators of J(w with S zeroed) - J(w), for a subset S:

- `cad`: first order, -sum_{i in S} w_i dJ/dw_i (the published method; the score table).
- `cad2`: first order plus the Gauss-Newton second-order term. J = sign * sum_p c_p ||r_p(w)||^2 is a sum of
  squared residuals, so zeroing S adds sign * sum_p c_p ||J_p w_S||^2 to second order (J_p the Jacobian of
  the residual; the residual's own curvature is left out, which is exact where residuals are small). That
  quadratic form is sketched once per concept with K random projections: u_k = J^T (sqrt(c) v_k), v_k
  Gaussian, so that ||sqrt(c) J w_S||^2 ~ mean_k (sum_{i in S} w_i u_k,i)^2 for every S at no further cost.
- `coar`: a ridge regression of the actual change on per-neuron ablated shares, fit on a training split of
  the random ablations (COAR, Shah et al. 2024) and evaluated on the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cad_ray.errors import CadRayError
from cad_ray.method.attribution import gradients_for, reencoded, resolve_chunk_size
from cad_ray.method.objectives import Concept
from cad_ray.method.scopes import reads_text_encoder, select_parameters
from cad_ray.seeds import numpy_rng, torch_generator



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
        self.model, self.concept = model, concept
        self.parameters = select_parameters(model.named_parameters(), scope)
        self.reads_text = reads_text_encoder(n for n, _ in self.parameters)
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
        # zeroed text-encoder components change the conditioning (both prompts'); the frozen target stays
        p = reencoded(self.model, self.concept, self.points) if self.reads_text else self.points
        eps = self.model.predict_noise(p.x, p.t, p.cond).double()

        def value(target):
            per_point = p.sign * (eps - target.double()).pow(2).flatten(1).mean(dim=1)
            return float((per_point * self.weights.to(per_point.device)).sum() / self.n_samples)

        frozen = value(p.target)
        if p.base_cond is None:  # amplify: no base term, both conventions agree
            return frozen, frozen
        return frozen, value(self.model.predict_noise(p.x, p.t, p.base_cond))

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


SKETCH_PASS_BYTES = 1 << 31  # host memory of one pass's (P, n) float64 accumulator: at SD 1.4's ff scope
# (148.7M components) one projection per pass; on the digits model all K = 64 in one pass


class SecondOrderSketch:
    """K random projections of the residual Jacobian, times the weights: u_k = J^T (sqrt(c) v_k), and
    uw_k = u_k * w / sqrt(K), so that the second-order term of a subset S is sign * sum_k (sum_{i in S} uw_k,i)^2.

    Validation needs that term only for its M seeded subsets, so `subset_sums(concept, samples, subsets)`
    reduces each projection to its M sums as soon as the projection is whole and drops it: the projections
    are computed in passes of P at a time (P from `pass_bytes`, a budget for the pass's (P, n) float64
    accumulator), and the host holds O(P n + K M) numbers, never (K, n) (76 GB at SD 1.4's ff scope and
    K = 64). `attribute` is the dense (K, n) array in one pass: the reference, for small scopes.

    Cost: K vector-Jacobian products over the points, batched P at a time (`is_grads_batched`); the points
    are made once per concept and kept across passes, so a pass costs one forward and P backward passes over
    them, and nothing per subset beyond its sums.
    """

    def __init__(self, model, objective, scope: str, projections: int = 64, seed: int = 0,
                 chunk_size: int | str = 64, batch: int = 4, pass_bytes: int = SKETCH_PASS_BYTES):
        if projections < 1:
            raise CadRayError("the second-order sketch needs at least one projection")
        self.model, self.objective, self.projections = model, objective, projections
        self.seed, self.batch, self.pass_bytes = seed, batch, pass_bytes
        self.chunk_size = resolve_chunk_size(chunk_size)  # "auto" is 64 here on any device: no out-of-memory fallback
        self.parameters = select_parameters(model.named_parameters(), scope)
        self.n_components = sum(p.numel() for _, p in self.parameters)
        self.reads_text = reads_text_encoder(n for n, _ in self.parameters)

    def projections_per_pass(self) -> int:
        return max(1, min(self.projections, self.pass_bytes // (8 * self.n_components)))

    def attribute(self, concept: Concept, samples: list[int]) -> np.ndarray:
        """The dense (K, n_components) float64 array uw, in one pass (memory K x n: small scopes only)."""
        passes = self._passes(concept, samples, self.projections)
        try:
            return next(passes)[2]
        finally:
            passes.close()  # leaves gradients_for, which restores the parameters' flags

    def subset_sums(self, concept: Concept, samples: list[int], subsets: list[np.ndarray]) -> np.ndarray:
        """(K, M) float64: column s holds sum_{i in subsets[s]} uw_k,i for every projection k, computed pass by
        pass (`projections_per_pass`) without ever holding uw whole; `quadratic_terms` turns it into the
        Gauss-Newton term of each subset."""
        sums = np.empty((self.projections, len(subsets)))
        for first, last, uw in self._passes(concept, samples, self.projections_per_pass()):
            for column, subset in enumerate(subsets):
                sums[first:last, column] = uw[:, subset].sum(axis=1)
        return sums

    def _passes(self, concept: Concept, samples: list[int], per_pass: int):
        """Yield (first, last, uw[first:last]) for consecutive blocks of at most `per_pass` projections. Every
        projection is the one a single pass of all K would give: the directions of a sample are drawn for all K
        from its own generator and sliced, and the gradients are added in the same order."""
        params = [p for _, p in self.parameters]
        groups: dict[int, list[int]] = {}
        for sample in samples:  # the same batch grid as CAD, so the points are the scores' points
            groups.setdefault(sample // self.batch, []).append(sample)
        blocks = [(k, min(k + per_pass, self.projections)) for k in range(0, self.projections, per_pass)]
        kept = {}  # group -> (points, scale), kept across passes so that the trajectories are sampled once
        with gradients_for(params):
            for first, last in blocks:
                total = torch.zeros((last - first, self.n_components), dtype=torch.float64)
                for key, group in groups.items():
                    if key in kept:
                        points, scale = kept[key]
                    else:
                        points = self.objective.points(self.model, concept, group, self.seed, self.chunk_size)
                        size = points.target[0].numel()
                        scale = (points.weights() / (len(samples) * size)).sqrt()
                        if len(blocks) > 1:
                            kept[key] = points, scale
                    # per-sample projections, so that they do not depend on how samples are grouped
                    directions = torch.cat([torch.randn((self.projections, int((points.sample == s).sum()),
                                                         *points.target.shape[1:]),
                                                        generator=torch_generator(self.seed, concept.name, s,
                                                                                  "sketch"))[first:last]
                                            for s in group], dim=1)
                    for start in range(0, len(points), self.chunk_size):
                        part = points.chunk(start, start + self.chunk_size)
                        if self.reads_text:  # differentiate through the encoding
                            part = reencoded(self.model, concept, part)
                        eps = self.model.predict_noise(part.x, part.t, part.cond)
                        v = directions[:, start:start + self.chunk_size] * scale[start:start + self.chunk_size].view(
                            1, -1, *([1] * (eps.dim() - 1)))
                        grads = torch.autograd.grad(eps, params, grad_outputs=v.to(eps.device, eps.dtype),
                                                    is_grads_batched=True)
                        offset = 0
                        for g in grads:  # tensor by tensor: no second (P, n) array for the chunk
                            size = g[0].numel()
                            total[:, offset:offset + size] += g.reshape(last - first, -1).double().cpu()
                            offset += size
                        del grads  # (P, n) float32: gone before the next chunk's, or the next pass's, are made
                offset = 0
                for p in params:  # times the weights tensor by tensor: no float64 copy of them all (1.2 GB at SD size)
                    total[:, offset:offset + p.numel()] *= p.detach().reshape(-1).double().cpu()
                    offset += p.numel()
                uw = total.numpy()
                uw /= np.sqrt(self.projections)
                yield first, last, uw
                del total, uw


def quadratic_terms(sums: np.ndarray, sign: float) -> np.ndarray:
    """The sketched Gauss-Newton term of zeroing each subset S, sign * sum_k (sum_{i in S} uw_k,i)^2 (uw already
    carries the 1/sqrt(K) of the mean), from `SecondOrderSketch.subset_sums`' (K, M) array: one value per column."""
    return np.array([sign * float(z @ z) for z in np.ascontiguousarray(sums.T)])


class NeuronMap:
    """Flat component index -> neuron id, where a neuron is one output row of a tensor (a 1-D tensor is one
    neuron), in the scope's tensor order. Held as one entry per tensor, not per component: COAR needs the neuron
    of a subset's components only, and a dense id per component is 1.2 GB of int64 at SD 1.4's `ff` scope."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        rows = [shape[0] if len(shape) > 1 else 1 for shape in shapes]
        sizes = [int(np.prod(shape)) for shape in shapes]
        self.starts = np.cumsum([0] + sizes)[:-1]  # first flat index of each tensor
        self.per_row = np.asarray([size // r for size, r in zip(sizes, rows)], dtype=np.int64)
        self.first_neuron = np.cumsum([0] + rows)[:-1]
        self.n_neurons = int(sum(rows))
        self.sizes = np.repeat(self.per_row, rows)  # components per neuron

    def __call__(self, flat_indices: np.ndarray) -> np.ndarray:
        """The neuron id of each flat index."""
        flat_indices = np.asarray(flat_indices, dtype=np.int64)
        # the tensor of an index: the last one that starts at or before it
        tensor = np.searchsorted(self.starts, flat_indices, side="right") - 1
        return self.first_neuron[tensor] + (flat_indices - self.starts[tensor]) // self.per_row[tensor]


def neuron_shares(subsets: list[np.ndarray], neurons: NeuronMap) -> np.ndarray:
    """COAR's design matrix: for each subset, the share of every neuron's components that it zeroes."""
    x = np.zeros((len(subsets), neurons.n_neurons))
    for row, subset in enumerate(subsets):
        x[row] = np.bincount(neurons(subset), minlength=neurons.n_neurons) / neurons.sizes
    return x


def fit_coar(x_train: np.ndarray, y_train: np.ndarray):
    """Ridge regression with its penalty chosen by leave-one-out error; returns the fitted model."""
    from sklearn.linear_model import RidgeCV

    if len(y_train) < 3:
        raise CadRayError(f"COAR needs at least 3 training ablations, got {len(y_train)}; raise 'ablations'")
    return RidgeCV(alphas=np.logspace(-8, 4, 25)).fit(x_train, y_train)


class FirstOrder:
    """CAD's own estimate of zeroing a subset: dJ(S) ~ -sum of its scores."""

    name = "cad"

    def __init__(self, scores: np.ndarray):
        # kept in their own dtype (the score table's float32: half the memory of a float64 copy); a subset's
        # scores are widened once gathered, which sums exactly what a float64 copy of the whole table would
        self.scores = np.asarray(scores)

    def predict(self, subsets: list[np.ndarray]) -> np.ndarray:
        return np.array([-self.scores[s].astype(np.float64, copy=False).sum() for s in subsets])


class SecondOrder(FirstOrder):
    """First order plus the sketched Gauss-Newton term of each subset (`SecondOrderSketch`, `quadratic_terms`)."""

    name = "cad2"

    def __init__(self, scores: np.ndarray, quadratic_terms: np.ndarray):
        super().__init__(scores)
        self.quadratic_terms = np.asarray(quadratic_terms, dtype=np.float64)

    def predict(self, subsets: list[np.ndarray]) -> np.ndarray:
        return super().predict(subsets) + self.quadratic_terms


class Coar:
    """COAR (Shah et al.): a ridge regression of the actual change on each neuron's zeroed share, fit on
    training ablations (`fit_coar`)."""

    name = "coar"

    def __init__(self, shapes: list[tuple[int, ...]]):
        self.neurons = NeuronMap(shapes)
        self.model = None

    def features(self, subsets: list[np.ndarray]) -> np.ndarray:
        return neuron_shares(subsets, self.neurons)

    def fit(self, subsets: list[np.ndarray], actual: np.ndarray) -> "Coar":
        self.model = fit_coar(self.features(subsets), np.asarray(actual))
        return self

    def predict(self, subsets: list[np.ndarray]) -> np.ndarray:
        return self.model.predict(self.features(subsets))


def concentration(scores: np.ndarray, shares=(0.001, 0.01)) -> dict[float, float]:
    """Share of the total |score| held by the top `share` of components by |score|."""
    # sorted in the scores' own dtype, in place, then widened: |x| and the widening are exact and keep the order,
    # so this is the float64 sort of |scores|, made with one float64 array where there were two (|x|, its sort)
    magnitude = np.abs(scores)
    magnitude.sort()
    magnitude = magnitude.astype(np.float64, copy=False)[::-1]
    total = magnitude.sum()
    return {s: float(magnitude[:max(1, int(round(s * len(magnitude))))].sum() / total) if total else float("nan")
            for s in shares}


def top_set(scores: np.ndarray, share: float) -> np.ndarray:
    """Flat indices of the top `share` of components by (positive) score: what CAD-Erase would zero."""
    k = max(1, int(round(share * len(scores))))
    # ranked in float64 whatever the scores' dtype, as validation always ranked them, so that ties at the k-th
    # score fall as they did; the k indices are copied out of argpartition's n of them (a view would keep all n)
    key = np.negative(scores, dtype=np.float64)
    return np.argpartition(key, k - 1)[:k].copy()


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.unique(a), np.unique(b)
    union = len(np.union1d(a, b))
    return len(np.intersect1d(a, b, assume_unique=True)) / union if union else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """scipy's Pearson r; NaN where it is undefined (fewer than two points, or a constant input)."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(stats.pearsonr(x, y).statistic)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """scipy's Spearman rho; NaN where it is undefined."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def _row_correlations(xs: np.ndarray, ys: np.ndarray, ranked: bool) -> np.ndarray:
    """`pearson` (ranked: `spearman`) of each row pair of two (B, n) arrays, all rows at once: NaN where those
    give NaN."""
    from scipy import stats

    xs, ys = np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64)  # copies: undefined rows are overwritten
    if xs.shape[1] < 2:
        return np.full(len(xs), np.nan)
    # `pearson`'s own test (std exactly 0), and scipy's (all values equal: the std of [0.1] * 3 is not 0)
    undefined = ((xs.std(axis=1) == 0) | (ys.std(axis=1) == 0)
                 | (xs == xs[:, :1]).all(axis=1) | (ys == ys[:, :1]).all(axis=1))
    # given a defined stand-in, so that scipy does not warn of constant input for rows whose value is dropped
    xs[undefined] = ys[undefined] = np.arange(xs.shape[1])
    if ranked:  # Spearman's rho is Pearson's r of the ranks, ties at their average rank as in spearmanr
        xs, ys = stats.rankdata(xs, axis=1), stats.rankdata(ys, axis=1)
    r = stats.pearsonr(xs, ys, axis=1).statistic
    r[undefined] = np.nan
    return r


def bootstrap_interval(x, y, statistic, resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(x, y) over resampled pairs. Not scipy.stats.bootstrap: on a
    small test split some resamples are constant (r undefined), and scipy then returns NaN for the whole
    interval; here those resamples are left out. `pearson` and `spearman` are computed for all resamples at
    once; any other statistic is called once per resample."""
    x, y = np.asarray(x), np.asarray(y)
    # row k is the k-th resample that one draw of len(x) indices per resample gave, so the intervals are those
    # of before: the bit generator, not the call, keeps the unused half of a 64-bit word, so one (resamples, n)
    # draw reads the same stream (a test compares the two)
    indices = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    ranked = {pearson: False, spearman: True}.get(statistic)
    if ranked is None:
        values = np.asarray([statistic(x[i], y[i]) for i in indices], dtype=np.float64)
    else:
        values = _row_correlations(x[indices], y[indices], ranked)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))
