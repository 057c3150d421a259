"""CAD scores: correct against plain autograd, first-order accurate, meaningful on the digits model."""

import pytest
import torch
from conftest import untrained_float64_model

from cad_ray.method.attribution import CAD
from cad_ray.errors import CadRayError
from cad_ray.models.digits import DigitsModel
from cad_ray.method.objectives import AmplifyObjective, Concept, EraseObjective, point_values
from cad_ray.method.scopes import select_parameters


@pytest.fixture(scope="module")
def small_model():
    return untrained_float64_model(seed=5)


def objective_value(model, objective, concept, samples, seed=0, points=None):
    """J = mean over samples of the mean over each sample's points, computed in one plain pass."""
    points = points or objective.points(model, concept, list(samples), seed)
    return (point_values(model, points).double() * points.weights()).sum() / len(samples), points


@pytest.mark.parametrize("objective", [EraseObjective(steps=6), EraseObjective(steps=6, fused=True),
                                       EraseObjective(steps=6, points_per_sample=4, fused=True),
                                       AmplifyObjective(points_per_sample=4, steps=6)])
def test_score_is_weight_times_autograd_gradient(small_model, objective):
    concept = Concept("seven", ("seven", "a 7"))
    cad = CAD(small_model, objective, "ff", chunk_size=5)
    attribution = cad.attribute(concept, 3)
    params = [p for _, p in cad.parameters]
    for p in params:
        p.requires_grad_(True)
    j, _ = objective_value(small_model, objective, concept, range(3))
    grads = torch.autograd.grad(j, params)
    for p in params:
        p.requires_grad_(False)
    for (name, p), g in zip(cad.parameters, grads):
        torch.testing.assert_close(attribution.scores[name], (p.detach() * g).double(), rtol=1e-9, atol=1e-15)
    assert attribution.objective_value == pytest.approx(float(j.detach()), rel=1e-9)


@pytest.mark.parametrize("scope, base, fused", [("ff", "", True), ("ff", "a digit", False),
                                               ("tokens+ff", "", False)])
def test_fused_erase_points_take_their_forward_pass_from_the_sampler(small_model, monkeypatch, scope, base, fused):
    """With `fused`, the erase points' forward pass is the sampler's own conditional pass (no separate
    `point_values` pass), except where the target is not the sampler's unguided half (another base prompt) or the
    gradient must flow through the prompt's encoding (text-encoder components); both ways give the same scores.
    The chunk (3 rows) is less than a group's points (6), so the steps' points wait for the backward in turns."""
    import cad_ray.method.attribution as attribution

    concept = Concept("seven", ("seven", "a 7"), (base,))
    expected = CAD(small_model, EraseObjective(steps=4, points_per_sample=3), scope, chunk_size=3).attribute(concept, 3)
    passes = []
    monkeypatch.setattr(attribution, "point_values", lambda *a, **k: passes.append(1) or point_values(*a, **k))
    estimator = CAD(small_model, EraseObjective(steps=4, points_per_sample=3, fused=True), scope, chunk_size=3)
    result = estimator.attribute(concept, 3)
    assert (not passes) == fused
    for name in expected.scores:
        torch.testing.assert_close(result.scores[name], expected.scores[name], rtol=1e-9, atol=1e-15)
    assert result.objective_value == pytest.approx(expected.objective_value, rel=1e-9)


def test_first_order_prediction_matches_tiny_ablations(small_model):
    concept = Concept("two", ("two",))
    objective = EraseObjective(steps=6)
    cad = CAD(small_model, objective, "ff")
    attribution = cad.attribute(concept, 2)
    j0, points = objective_value(small_model, objective, concept, range(2))
    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    for trial in range(3):
        masks = {n: torch.rand(p.shape, generator=gen) < 0.05 for n, p in cad.parameters}
        saved = {n: p.detach().clone() for n, p in cad.parameters}
        with torch.no_grad():
            for n, p in cad.parameters:  # move each chosen weight eps of the way to zero
                p[masks[n]] *= 1 - eps
        j1, _ = objective_value(small_model, objective, concept, range(2), points=points)
        with torch.no_grad():
            for n, p in cad.parameters:
                p.copy_(saved[n])
        # zeroing a component changes J by -w * dJ/dw to first order
        predicted = -eps * sum(float(attribution.scores[k][m].sum()) for k, m in masks.items())
        assert float(j1 - j0) == pytest.approx(predicted, rel=1e-3)


def test_one_pass_per_chunk_size_gives_the_same_scores(small_model):
    concept = Concept("four", ("four",))
    a = CAD(small_model, EraseObjective(steps=6), "attn2", chunk_size=2).attribute(concept, 2)
    b = CAD(small_model, EraseObjective(steps=6), "attn2", chunk_size=100).attribute(concept, 2, block=1)
    for name in a.scores:
        torch.testing.assert_close(a.scores[name], b.scores[name], rtol=1e-9, atol=1e-15)


def test_scopes_select_the_published_components(digits_model):
    ff = select_parameters(digits_model.named_parameters(), "ff")
    assert ff and all(".ff.net." in n and p.dim() == 2 for n, p in ff)
    assert all(".attn2." in n for n, _ in select_parameters(digits_model.named_parameters(), "attn2"))
    everything = select_parameters(digits_model.named_parameters(), "all")
    assert len(everything) == len(list(digits_model.named_parameters()))
    assert select_parameters(digits_model.named_parameters(), "re:mid_block.*to_k")
    with pytest.raises(CadRayError, match="matches no parameter"):
        select_parameters(digits_model.named_parameters(), "*.lora_A.weight")


def test_nan_gradient_names_the_tensor():
    model = DigitsModel.build(seed=1)
    name, param = select_parameters(model.named_parameters(), "ff")[-1]
    with torch.no_grad():
        param[0, 0] = float("nan")
    with pytest.raises(CadRayError, match="non-finite gradient .* in tensor"):
        CAD(model, EraseObjective(steps=3), "ff").attribute(Concept("one", ("one",)), 1)


def test_empty_prompt_list_is_refused():
    with pytest.raises(CadRayError, match="empty prompt list"):
        Concept("seven", ())


def test_zeroing_top_components_erases_far_more_than_random(digits_model):
    """On the trained digits model: the top-scored components of 'seven' carry it; random ones do not.

    J is measured as the full counterfactual (the base prediction recomputed with the ablated weights): with
    the base frozen at the original weights, zeroing the top components raises J, because they change the
    prediction for every prompt (see docs/attribution.md)."""
    concept = Concept("seven", ("seven", "a 7", "the digit 7"))
    objective = EraseObjective(steps=20)
    cad = CAD(digits_model, objective, "ff")
    attribution = cad.attribute(concept, 3)
    j0, points = objective_value(digits_model, objective, concept, range(3))
    scores = torch.cat([attribution.scores[n].flatten() for n, _ in cad.parameters])
    k = int(0.01 * len(scores))
    top = torch.zeros(len(scores), dtype=torch.bool)
    top[scores.topk(k).indices] = True
    random = torch.zeros(len(scores), dtype=torch.bool)
    random[torch.randperm(len(scores), generator=torch.Generator().manual_seed(0))[:k]] = True

    def drop(mask):
        saved = [p.detach().clone() for _, p in cad.parameters]
        offset = 0
        with torch.no_grad():
            for _, p in cad.parameters:
                p.view(-1)[mask[offset:offset + p.numel()]] = 0
                offset += p.numel()
            ablated_base = digits_model.predict_noise(points.x, points.t, points.base_cond)
            j1 = (point_values(digits_model, points, ablated_base).double() * points.weights()).sum() / 3
            for (_, p), s in zip(cad.parameters, saved):
                p.copy_(s)
        return float(j0 - j1)

    top_drop, random_drop = drop(top), drop(random)
    assert top_drop > 0.5 * float(j0)
    assert top_drop > 10 * abs(random_drop)


def test_the_fused_option_reaches_the_objective_and_counts_in_the_config_hash_only_when_on():
    from conftest import SMALL, small_config

    from cad_ray.stages.attribution_worker import objective_for

    plain, off, on = small_config(), small_config(erase={**SMALL.get("erase", {}), "fused": False}), \
        small_config(erase={**SMALL.get("erase", {}), "fused": True})
    assert not objective_for(plain, "erase").fused and objective_for(on, "erase").fused
    assert plain.config_hash() == off.config_hash() != on.config_hash()
    # roots made before the option resume: "fused" is not hashed at all while it is off
    assert "fused" not in plain.result_fields()["erase"] and on.result_fields()["erase"]["fused"] is True


def test_the_api_and_the_config_share_their_objective_defaults():
    """One default each: `make_objective(name)` computes what a config that leaves the objective's options out
    computes (issue 28: the API kept every point where the config kept 10)."""
    from cad_ray.config import AmplifyOptions, EraseOptions
    from cad_ray.method.objectives import make_objective

    for name, options in (("erase", EraseOptions()), ("amplify", AmplifyOptions())):
        objective = make_objective(name)
        for field, value in options.model_dump().items():
            assert getattr(objective, field) == value, (name, field)
