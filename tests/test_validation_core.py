"""Core of the random-ablation validation: subsets, actual changes, statistics."""

import numpy as np
import pytest
import torch
from conftest import untrained_float64_model

from cad_ray.method.attribution import CAD
from cad_ray.errors import CadRayError
from cad_ray.method.objectives import Concept, EraseObjective
from cad_ray.method.estimators import (AblationEvaluator, FirstOrder, SecondOrderSketch, bootstrap_interval,
                                       pearson, quadratic_terms, random_subset, spearman)


def test_subsets_are_seeded_sized_and_distinct():
    a = random_subset(10_000, 0.01, 3, seed=0)
    assert len(a) == 100 and len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, random_subset(10_000, 0.01, 3, seed=0))
    assert not np.array_equal(a, random_subset(10_000, 0.01, 4, seed=0))
    assert len(random_subset(50, 0.001, 0, seed=0)) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_fraction_outside_the_open_interval_is_refused(fraction):
    with pytest.raises(CadRayError, match=r"in \(0, 1\)"):
        random_subset(100, fraction, 0, seed=0)


def test_planted_linear_relation_has_correlation_one():
    x = np.linspace(-1, 1, 50)
    assert pearson(x, 3 * x + 2) == pytest.approx(1.0)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    noisy = 3 * x + np.random.default_rng(0).normal(0, 0.5, 50)
    low, high = bootstrap_interval(x, noisy, pearson)
    assert low < pearson(x, noisy) < high
    # more noise: a lower correlation and a wider interval
    noisier = 3 * x + np.random.default_rng(0).normal(0, 3.0, 50)
    low2, high2 = bootstrap_interval(x, noisier, pearson)
    assert high2 < low and high2 - low2 > high - low


def test_bootstrap_interval_equals_scipy_resample_by_resample_with_ties_and_constant_resamples():
    from scipy import stats

    # ties on both sides (Spearman's average ranks), and x mostly one value, so that some resamples are
    # constant in x and must be left out
    x = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0, 3.0, 3.0, 7.0])
    y = np.array([1.0, 0.0, 1.0, 2.0, 2.0, 5.0, 4.0, 4.0, 6.0, 3.5])
    rng = np.random.default_rng(4)
    resamples = [rng.integers(0, len(x), len(x)) for _ in range(1000)]  # one draw per resample
    defined = [i for i in resamples if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0]
    assert 0 < len(resamples) - len(defined) < 50
    for statistic, reference in ((pearson, stats.pearsonr), (spearman, stats.spearmanr)):
        values = [reference(x[i], y[i]).statistic for i in defined]
        expected = np.quantile(values, 0.025), np.quantile(values, 0.975)
        assert bootstrap_interval(x, y, statistic, seed=4) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        # a resample where one side is constant is undefined, and with nothing else there is no interval
        assert np.isnan(bootstrap_interval(x[:4], y[:4], statistic)).all()


@pytest.fixture(scope="module")
def float64_model():
    return untrained_float64_model(seed=7)


def test_actual_change_restores_weights_and_matches_first_order_for_tiny_ablations(float64_model):
    concept = Concept("three", ("three",))
    objective = EraseObjective(steps=5)
    evaluator = AblationEvaluator(float64_model, objective, concept, "ff", [0, 1], seed=0)
    before = [p.detach().clone() for _, p in evaluator.parameters]
    attribution = CAD(float64_model, objective, "ff").attribute(concept, [0, 1])
    flat = np.concatenate([attribution.scores[n].flatten().numpy() for n, _ in evaluator.parameters])
    weights = np.concatenate([p.detach().flatten().numpy() for _, p in evaluator.parameters])
    tiny = np.argsort(np.abs(weights))[:20]  # components whose zeroing is a tiny step
    change = evaluator.change(tiny)
    assert change.frozen_base == pytest.approx(FirstOrder(flat).predict([tiny])[0], rel=1e-3)
    for (_, p), b in zip(evaluator.parameters, before):
        assert torch.equal(p, b)
    with pytest.raises(CadRayError, match="out of range"):
        evaluator.change(np.array([evaluator.n_components]))


class CountingObjective:
    """An objective that counts how often its points (the sampled trajectories) are made."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def points(self, *args, **kwargs):
        self.calls += 1
        return self.inner.points(*args, **kwargs)


def test_streaming_sketch_equals_the_dense_one_without_holding_k_by_n(float64_model):
    """The sketch reduced pass by pass to its per-subset sums (P projections at a time, never the (K, n) array)
    gives the dense sketch's second-order term of every subset; the trajectories are sampled once, not per pass."""
    concept, samples, projections = Concept("three", ("three",)), [0, 1, 2], 3  # batch 2: groups [0, 1] and [2]
    dense = SecondOrderSketch(float64_model, EraseObjective(steps=2), "ff", projections, seed=0, batch=2)
    uw = dense.attribute(concept, samples)
    n = dense.n_components
    assert uw.shape == (projections, n) and np.abs(uw).max() > 0
    subsets = [random_subset(n, fraction, a, seed=0) for fraction in (0.001, 0.05, 0.3) for a in range(3)]
    expected = np.array([float(uw[:, s].sum(axis=1) @ uw[:, s].sum(axis=1)) for s in subsets])  # the definition
    assert np.all(expected > 0)
    for per_pass in (1, 2):  # one projection per pass, and passes of 2 and 1
        objective = CountingObjective(EraseObjective(steps=2))
        streaming = SecondOrderSketch(float64_model, objective, "ff", projections, seed=0, batch=2,
                                      pass_bytes=8 * n * per_pass)
        assert streaming.projections_per_pass() == per_pass
        sums = streaming.subset_sums(concept, samples, [s.astype(np.int32) for s in subsets])
        assert sums.shape == (projections, len(subsets))
        np.testing.assert_allclose(quadratic_terms(sums, objective.sign), expected, rtol=1e-9)
        assert objective.calls == 2  # once per batch group, whatever the number of passes
    assert not any(p.requires_grad for _, p in streaming.parameters)  # gradients_for restored the flags
