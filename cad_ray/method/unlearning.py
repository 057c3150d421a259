"""Erasure that lives in the weights: a few gradient steps on the components CAD selects, against the attacks
that bring a word-deep erasure back (core, no Ray).

Zeroing the components that carry a concept's *words* leaves every weight that draws it: one learned word
(textual inversion) or a noised image of it (diffusion completion) brings it back (`cad_ray.method.probes`).
`adversarial_finetune` moves only the components a CAD selection names (`masks`), as adversarial unlearning
does (AdvUnlearn, Zhang et al., 2024), in rounds:

1. attack: learn a word embedding that draws the concept on the model as it now is (the inversion probe);
2. unlearn: on the unedited model's images of the concept, noised at random timesteps, the edited model's
   prediction under the concept's prompts, the empty prompt and the attack's word is pulled to a target that
   does not draw it, while other concepts' images under their prompts and the empty prompt keep the unedited
   model's predictions (the retain loss: what the edit must not change).

The target (`target`): `esd` is ESD's, the unedited empty-prompt prediction pushed away from the concept's,
`base - eta * (concept - base)`; it leaves the empty prompt's own denoising of the concept as it was, so a
noised image of the concept is still completed. `nearest` is what a model that never learned the concept would
predict there: the unedited prediction under the nearest other concept's prompt (per image, the one whose
prediction is closest to the concept's), pushed away from the concept's by `eta` (it erases little: where
the image already shows the concept, every prompt's prediction is close to the concept's). `images`: from
`images_from` of the training timesteps up, the empty prompt's target is the noise that would make x_t a noised
image of the nearest other concept's image (what a model trained without the concept would denoise it
towards), and the concept's prompts and the attack's word are that target pushed from the concept's prediction
as ESD does; below `images_from`, ESD's target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cad_ray.errors import CadRayError
from cad_ray.method.objectives import denoising_target
from cad_ray.method.probes import (ProbeSettings, TextualInversion, concept_images, learned_word,
                                   noised_batch)
from cad_ray.method.scopes import select_parameters
from cad_ray.models.base import NEGATIVE_PROMPT
from cad_ray.seeds import derive_seed, torch_generator

TARGETS = ("esd", "nearest", "images")
MATCHES = ("pixels", "shape")


@dataclass(frozen=True)
class UnlearningSettings:
    rounds: int = 3  # attack-then-unlearn rounds; the first unlearns without an attack's word
    steps: int = 100  # Adam steps per round
    lr: float = 3e-3
    batch: int = 32  # images of the concept per step, and at most as many of the other concept kept
    images: int = 64  # the unedited model's images of the concept the steps noise
    retain_images: int = 32  # of each other concept
    retain_weight: float = 1.0  # of the retain loss against the unlearning loss
    eta: float = 1.0  # how far beyond the target the prediction is pushed from the concept's
    target: str = "images"
    images_from: float = 0.1  # `images`: from this share of the training timesteps up, below it `esd`'s target
    match: str = "pixels"  # `images`: the nearest other image by its pixels, or by its shape (channels' maximum)
    attack: ProbeSettings = ProbeSettings(steps=100)
    sampling_steps: int | None = None  # of the images made for the steps (default: the model's)
    # the concept's timesteps t = T * u ** power: above 1, more of the steps where a lightly noised image of the
    # concept is finished (the completion probe's low strengths); the kept concepts' stay uniform
    timestep_power: float = 1.0


def adversarial_finetune(model, concept, word: str, others: dict[str, list[str]], scope: str,
                         masks: dict | None, settings: UnlearningSettings = UnlearningSettings(),
                         seed: int = 0, progress=None, images: dict | None = None) -> dict[str, torch.Tensor]:
    """New values of the scoped tensors (only `masks`' components move; all of them without masks) that make
    the model unable to draw `concept`, whatever the words, while it keeps drawing `others` (name -> prompts).
    The prompts are encoded once, without gradients, so the erasure lives in the denoiser: a selected component
    of the text encoder keeps its value (moving words is what the probes undo). The model is left as it was.
    `images`: a dict kept across calls on the same unedited model, in which the images the steps noise are kept
    (every target's edit draws the same images of each other concept)."""
    if settings.target not in TARGETS:
        raise CadRayError(f"unknown unlearning target {settings.target!r}; choose one of {', '.join(TARGETS)}")
    if settings.match not in MATCHES:
        raise CadRayError(f"unknown image match {settings.match!r}; choose one of {', '.join(MATCHES)}")
    if not others:
        raise CadRayError("adversarial fine-tuning needs other concepts to keep (the retain loss)")
    parameters = dict(select_parameters(model.named_parameters(), scope))
    grad_masks = {n: torch.ones_like(p) if masks is None else torch.as_tensor(masks[n], device=p.device).to(p.dtype)
                  for n, p in parameters.items() if masks is None or (n in masks and masks[n].any())}
    if not grad_masks:
        raise CadRayError(f"the selection takes no component in scope {scope!r}: nothing to fine-tune")
    moving = {n: parameters[n] for n in grad_masks}
    original = {n: p.detach().clone() for n, p in moving.items()}
    prompts = list(concept.prompts)
    steps = settings.sampling_steps
    memo = {} if images is None else images

    def drawn(asked: list[str], n: int, seed_: int) -> torch.Tensor:
        key = (tuple(asked), n, seed_, steps)
        if key not in memo:
            memo[key] = concept_images(model, asked, n, seed_, steps)
        return memo[key]

    with torch.no_grad():
        x0 = drawn(prompts, settings.images, derive_seed(seed, "unlearn", concept.name))
        kept = {name: drawn(p, settings.retain_images, derive_seed(seed, "retain", name)) for name, p in others.items()}
        empty = model.encode([NEGATIVE_PROMPT])
    attack = TextualInversion(model, word, prompts, settings.attack)
    generator = torch_generator(seed, "unlearn-steps", concept.name)
    optimizer = torch.optim.Adam(list(moving.values()), lr=settings.lr)
    names = list(kept)
    pool = torch.cat(list(kept.values()))  # the `images` target's other concepts' images

    def unedited(fn):
        """`fn()` on the unedited weights (the targets), the moving ones put back after."""
        now = {n: p.detach().clone() for n, p in moving.items()}
        with torch.no_grad():
            for n, p in moving.items():
                p.copy_(original[n])
            try:
                return fn()
            finally:
                for n, p in moving.items():
                    p.copy_(now[n])

    try:
        for round_ in range(settings.rounds):
            vector = attack.fit(model, x0, seed=derive_seed(seed, "attack", round_)) if round_ else None
            for p in moving.values():
                p.requires_grad_(True)
            for step in range(settings.steps):
                rows = torch.randperm(len(x0), generator=generator)[:settings.batch]
                x_t, t, _ = noised_batch(model, x0[rows], generator, settings.timestep_power)
                asked = [prompts[int(r) % len(prompts)] for r in rows]
                name = names[step % len(names)]  # one other concept a step, in turn
                picked = torch.arange(len(kept[name]))
                if settings.batch < len(picked):  # as many of its images as of the concept's (a step's cost)
                    picked = torch.randperm(len(picked), generator=generator)[:settings.batch]
                images = kept[name][picked]
                y_t, s, _ = noised_batch(model, images, generator)
                with torch.no_grad():
                    conditions = [model.encode(asked), empty.expand(len(rows), *empty.shape[1:])]
                    if vector is not None:
                        with learned_word(model, attack.token_id, vector):
                            conditions.append(model.encode(asked))
                    keep = [model.encode([others[name][int(r) % len(others[name])] for r in picked]),
                            empty.expand(len(images), *empty.shape[1:])]
                    # every target before any forward pass that backward needs: swapping the weights in place
                    # after one would change what it saved
                    def unedited_targets():
                        own, base, *kept_targets = model.predict_noise_batched(
                            [(x_t, t, conditions[0]), (x_t, t, conditions[1])] + [(y_t, s, c) for c in keep])
                        return _target(model, x_t, t, own, base, len(conditions), rows, others, settings,
                                       x0[rows], pool), kept_targets

                    target, kept_targets = unedited(unedited_targets)
                targets = target if isinstance(target, list) else [target] * len(conditions)
                out = model.predict_noise_batched([(x_t, t, c) for c in conditions] + [(y_t, s, c) for c in keep])
                loss = sum((o - k).pow(2).mean() for o, k in zip(out, targets))
                loss = loss + settings.retain_weight * sum((o - k).pow(2).mean()
                                                           for o, k in zip(out[len(conditions):], kept_targets))
                optimizer.zero_grad()
                loss.backward()
                for n, p in moving.items():
                    if p.grad is not None:  # None: the loss does not reach it (the text encoder's: see above)
                        p.grad *= grad_masks[n]
                optimizer.step()
                if progress is not None:
                    progress()
            for p in moving.values():
                p.requires_grad_(False)
                p.grad = None
        return {n: p.detach().clone() for n, p in parameters.items()}
    finally:
        with torch.no_grad():
            for n, p in moving.items():
                p.requires_grad_(False)
                p.grad = None
                p.copy_(original[n])


def nearest_images(x0: torch.Tensor, pool: torch.Tensor, match: str = "pixels") -> torch.Tensor:
    """For each image of `x0`, the nearest image of `pool` (N, C, H, W), by its pixels or by its shape: the
    channels' maximum, what an image draws whatever its colour (images in disjoint channels are all equally far
    by pixels, so the nearest would be any shape)."""
    def seen(x):
        return (x.amax(dim=1) if match == "shape" else x).flatten(1).float()

    return pool[torch.cdist(seen(x0), seen(pool)).argmin(1)]


def _target(model, x_t, t, own, base, conditions: int, rows, others, settings: UnlearningSettings, x0=None,
            pool=None):
    """What the edited model should predict at (x_t, t) under each of `conditions` conditions (on the unedited
    weights), from its predictions under the concept's prompts (`own`) and the empty prompt (`base`)."""
    if settings.target in ("esd", "images"):
        esd = base - settings.eta * (own - base)
        if settings.target == "esd":
            return esd
        # what the model would be trained to output had x_t come from the nearest image of another concept: a
        # noised image of the concept is then denoised into something else, whatever the prompt (completion)
        nearest = nearest_images(x0, pool, settings.match).to(x_t.dtype)
        alphas = model.scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, *[1] * (x_t.dim() - 1)).to(x_t.dtype)
        noise = (x_t - alphas.sqrt() * nearest) / (1 - alphas).sqrt()
        other = denoising_target(model.prediction_type, nearest, noise, alphas)
        late = (t >= settings.images_from * len(model.scheduler.alphas_cumprod)).view(-1, *[1] * (x_t.dim() - 1))
        # the empty prompt goes to the other image; the concept's prompts and the attack's word are anchored
        # there and pushed from the concept as ESD does, so that guidance toward them draws no concept either
        empty = torch.where(late.to(x_t.device), other, base)
        worded = empty - settings.eta * (own - base)
        return [worded, empty] + [worded] * (conditions - 2)
    candidates = torch.stack([model.predict_noise(x_t, t, model.encode([p[int(r) % len(p)] for r in rows]))
                              for p in others.values()])
    distance = (candidates - own[None]).pow(2).flatten(2).mean(-1)
    nearest = candidates[distance.argmin(0), torch.arange(len(rows))]
    return nearest - settings.eta * (own - nearest)
