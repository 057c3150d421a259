"""Core of the random-ablation validation: subsets, actual changes, statistics."""

import numpy as np
import pytest
import torch
from conftest import untrained_float64_model

from cad_ray.method.attribution import CAD
from cad_ray.errors import CadRayError
from cad_ray.method.objectives import Concept, EraseObjective
from cad_ray.method.estimators import (AblationEvaluator, FirstOrder, bootstrap_interval, pearson,
                                random_subset, spearman)


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
