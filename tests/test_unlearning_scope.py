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


def test_images_kept_across_targets_change_no_weight(digits_model):
    """A worker making every target's edit keeps the unedited model's images of each other concept: the second
    target draws only its own, and its weights are those of a call that draws everything anew."""
    settings = UnlearningSettings(rounds=1, steps=2, images=4, retain_images=2, batch=4, sampling_steps=4)
    others = {"red": all_prompts(3, "red")}
    masks = {n: np.ones(tuple(p.shape), dtype=bool) for n, p in digits_model.named_parameters()
             if n.endswith("conv_out.weight")}
    memo = {}
    for name in ("blue", "green"):
        prompts, bases, _ = digits_concept(name)
        concept = Concept(name, tuple(prompts), tuple(bases), None)
        kept = adversarial_finetune(digits_model, concept, name, others, "all", masks, settings, images=memo)
        fresh = adversarial_finetune(digits_model, concept, name, others, "all", masks, settings)
        assert all(torch.equal(kept[n], fresh[n]) for n in fresh)
    assert len(memo) == 3  # blue's and green's own images, red's once


def test_a_smaller_batch_keeps_as_many_other_images_a_step(digits_model, monkeypatch):
    """`batch` bounds the retain loss's images a step too (the step's cost)."""
    import cad_ray.method.unlearning as unlearning

    prompts, bases, _ = digits_concept("blue")
    concept = Concept("blue", tuple(prompts), tuple(bases), None)
    others = {"red": all_prompts(3, "red")}
    masks = {n: np.ones(tuple(p.shape), dtype=bool) for n, p in digits_model.named_parameters()
             if n.endswith("conv_out.weight")}
    seen = []
    noised = unlearning.noised_batch
    monkeypatch.setattr(unlearning, "noised_batch", lambda m, x0, g, *a: seen.append(len(x0)) or noised(m, x0, g, *a))
    for batch in (4, 2):
        seen.clear()
        settings = UnlearningSettings(rounds=1, steps=2, images=4, retain_images=4, batch=batch, sampling_steps=4)
        adversarial_finetune(digits_model, concept, "blue", others, "all", masks, settings)
        assert seen == [batch, batch] * 2  # the concept's and the kept concept's, each step


def test_timestep_power_draws_more_low_noise_steps_and_one_keeps_the_uniform_draws(digits_model):
    from cad_ray.method.probes import noised_batch

    x0 = torch.zeros(4096, 1, 1, 1)
    _, uniform, _ = noised_batch(digits_model, x0, torch.Generator().manual_seed(0))
    expected = torch.randint(0, len(digits_model.scheduler.alphas_cumprod), (4096,),
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform, expected)  # edits made before the setting keep their steps
    _, low, _ = noised_batch(digits_model, x0, torch.Generator().manual_seed(0), power=2.0)
    quarter = len(digits_model.scheduler.alphas_cumprod) // 4
    assert (uniform < quarter).float().mean() < 0.3 and (low < quarter).float().mean() > 0.45  # 1/4 and 1/2
