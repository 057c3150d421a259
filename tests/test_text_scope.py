"""Text-encoder components (scopes `text` and `tokens`): attributed through the encoding of the prompts, selected
and zeroed like the denoiser's, and kept apart from the denoiser scopes."""

import numpy as np
import pytest
import torch
from conftest import untrained_float64_model

from cad_ray.digits import VOCABULARY
from cad_ray.method.attribution import CAD
from cad_ray.method.objectives import Concept, EraseObjective
from cad_ray.method.scopes import select_parameters

TOKENS = "text_encoder.embeddings.token_embedding.weight"


@pytest.fixture(scope="module")
def small_model():
    return untrained_float64_model(seed=7)


def test_named_scopes_keep_the_denoiser_and_the_text_encoder_apart(digits_model):
    named = list(digits_model.named_parameters())
    unet = list(digits_model.unet.named_parameters())
    assert [n for n, _ in named[:len(unet)]] == [n for n, _ in unet]  # UNet tables keep their names and order
    for scope in ("ff", "attn2", "attn", "linear"):
        assert not any(n.startswith("text_encoder.") for n, _ in select_parameters(named, scope)), scope
    text = select_parameters(named, "text")
    assert len(text) == len(list(digits_model.text_encoder.parameters()))
    assert [n for n, _ in select_parameters(named, "tokens")] == [TOKENS]
    assert len(select_parameters(named, "all")) == len(named)


def test_text_scores_are_weight_times_the_gradient_through_the_encoding(small_model):
    """Reference: J written from scratch, each point's conditioning encoded from its own prompt inside the
    differentiated pass; the erase target (the base term) frozen as the objective defines it."""
    concept = Concept("seven", ("seven", "a 7"))
    objective = EraseObjective(steps=5)
    cad = CAD(small_model, objective, "text", chunk_size=4)
    attribution = cad.attribute(concept, 2)
    points = objective.points(small_model, concept, [0, 1], seed=0)
    params = [p for _, p in cad.parameters]
    for p in params:
        p.requires_grad_(True)
    cond = torch.cat([small_model.encode([concept.prompt(int(s))[0]]) for s in points.sample])
    eps = small_model.predict_noise(points.x, points.t, cond)
    per_point = (eps - points.target).pow(2).flatten(1).mean(dim=1)
    j = (per_point.double() * points.weights()).sum() / 2
    grads = torch.autograd.grad(j, params, allow_unused=True)
    for p in params:
        p.requires_grad_(False)
    assert float(attribution.scores[TOKENS].abs().sum()) > 0
    for (name, p), g in zip(cad.parameters, grads):
        expected = torch.zeros_like(p, dtype=torch.float64) if g is None else (p.detach() * g).double()
        torch.testing.assert_close(attribution.scores[name], expected, rtol=1e-8, atol=1e-14)


def test_only_the_words_of_a_concepts_prompts_have_token_scores(small_model):
    concept = Concept("seven", ("seven", "a 7"))
    scores = CAD(small_model, EraseObjective(steps=4), "tokens").attribute(concept, 2).scores[TOKENS]
    used = {"seven", "7", "a", "<bos>", "<eos>", "<pad>"}
    rows = scores.abs().sum(dim=1)
    assert all(rows[VOCABULARY.index(w)] > 0 for w in ("seven", "7", "a"))
    assert all(rows[k] == 0 for k, w in enumerate(VOCABULARY) if w not in used)


def test_finetuning_text_components_moves_the_words_of_the_concept_only(small_model):
    from cad_ray.method.editing import finetune

    concept = Concept("seven", ("seven", "a 7"))
    before = dict(small_model.named_parameters())[TOKENS].detach().clone()
    after = finetune(small_model, concept, EraseObjective(steps=4), "tokens", [0, 1], seed=0, steps=2, lr=1e-2)
    moved = (after[TOKENS] != before).any(dim=1)
    assert moved[VOCABULARY.index("seven")] and moved[VOCABULARY.index("7")]
    assert not moved[VOCABULARY.index("blue")] and not moved[VOCABULARY.index("nine")]
    assert torch.equal(dict(small_model.named_parameters())[TOKENS], before)  # the model is left as it was


def test_ablating_words_changes_the_objective_only_through_the_words_the_concept_uses(small_model):
    """Validation re-encodes the prompts under an ablation: zeroing the rows of the concept's words moves J,
    zeroing the rows of words it never uses does not move it at all; the sketch sees the same components."""
    from cad_ray.method.estimators import AblationEvaluator, SecondOrderSketch

    concept = Concept("seven", ("seven", "a 7"))
    evaluator = AblationEvaluator(small_model, EraseObjective(steps=4), concept, "tokens", [0], seed=0)
    width = evaluator.sizes[0] // len(VOCABULARY)

    def rows(*words):
        return np.concatenate([np.arange(width) + VOCABULARY.index(w) * width for w in words])

    assert abs(evaluator.change(rows("seven", "7")).frozen_base) > 0
    assert evaluator.change(rows("blue", "nine")).frozen_base == 0
    sketch = SecondOrderSketch(small_model, EraseObjective(steps=4), "tokens", projections=2, seed=0)
    uw = sketch.attribute(concept, [0])
    per_row = np.abs(uw).reshape(2, len(VOCABULARY), width).sum(axis=(0, 2))
    assert per_row[VOCABULARY.index("seven")] > 0 and per_row[VOCABULARY.index("blue")] == 0
