"""Adversarial unlearning on a selection that takes text-encoder components too (a scope such as `all`): the
prompts are encoded without gradients, so those components keep their values and the denoiser's move (a crash
on the first step before: issue 25)."""

import numpy as np
import torch

from cad_ray.digits import all_prompts
from cad_ray.digits.concepts import digits_concept
from cad_ray.method.objectives import Concept
from cad_ray.method.probes import ProbeSettings
from cad_ray.method.unlearning import UnlearningSettings, adversarial_finetune


def test_text_encoder_components_in_the_selection_keep_their_values(digits_model):
    prompts, bases, _ = digits_concept("blue")
    concept = Concept("blue", tuple(prompts), tuple(bases), None)
    before = {n: p.detach().clone() for n, p in digits_model.named_parameters()}
    text = next(n for n in before if n.startswith("text_encoder") and n.endswith("token_embedding.weight"))
    denoiser = next(n for n in before if n.endswith("conv_out.weight"))
    masks = {n: np.ones(tuple(before[n].shape), dtype=bool) for n in (text, denoiser)}
    settings = UnlearningSettings(rounds=2, steps=2, images=4, retain_images=2, batch=4,
                                  attack=ProbeSettings(steps=2, batch=4), sampling_steps=4)
    weights = adversarial_finetune(digits_model, concept, "blue", {"red": all_prompts(3, "red")}, "all",
                                   masks, settings, seed=0)
    assert torch.equal(weights[text], before[text])
    assert not torch.equal(weights[denoiser], before[denoiser])
    assert all(torch.equal(p, before[n]) for n, p in digits_model.named_parameters())
