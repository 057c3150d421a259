"""Completeness probes: is a concept gone from the model, or only from the words that ask for it?

An erasure that zeroes a concept's words passes every test that asks for the concept by its words, and says
nothing about whether the model can still draw it. The probes ask the model in other ways ("Circumventing
Concept Erasure Methods", Pham et al., ICLR 2024; "When Are Concepts Erased From Diffusion Models?", 2025):

- `inversion` (textual inversion): one new word embedding, learned against the model under test from images of
  the concept (by default the unedited model's), its norm bounded by the largest real word's, so that it is a
  word the text encoder could have had; then sampled on seeds the learning never saw.
- `completion` (diffusion completion): an image of the concept noised to a step of the sampler and denoised by
  the model under test, with the concept's prompt and with the empty prompt. From the last step nothing is
  left to denoise (the start image comes back); from the first, nothing of it is left.
- `soft-prompt`: the whole conditioning sequence (the text encoder's output) learned the same way. It is not
  bounded to anything a word could give, so it can make a model that never saw the concept draw it; read it
  beside its floor.
- `guidance` (classifier guidance, Dhariwal and Nichol, 2021): every sampling step is pushed up the gradient of
  a differentiable judge's log-probability of the concept on the step's predicted clean image, with the
  concept's prompt and with the empty prompt. The judge that steers also judges, so an image can be steered
  into fooling it: read it beside its floor (the same guidance on a model that never learned the concept).

Each probe returns images; the caller judges them with the same judges as every other image, and reads each
probe's figure beside its floor (the same probe without the learned part, or on a model that never learned the
concept) and its ceiling (the unedited model). No Ray here: the evaluation stage runs probes as work units.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from cad_ray.errors import CadRayError
from cad_ray.method.objectives import denoising_target
from cad_ray.method.scopes import special_token_ids
from cad_ray.models.base import NEGATIVE_PROMPT
from cad_ray.seeds import derive_seed, torch_generator

PROBES = ("inversion", "completion", "soft-prompt", "guidance")


@dataclass(frozen=True)
class ProbeSettings:
    """How hard a probe attacks: the published textual-inversion attack uses a few hundred Adam steps."""

    steps: int = 200  # optimiser steps of the learned embedding or sequence
    lr: float = 0.02
    batch: int = 32  # images per step
    images: int = 128  # images of the concept the attack learns from
    strengths: tuple[float, ...] = (0.25, 0.5, 0.75)  # completion: the share of the sampling steps re-run


def token_embedding(model) -> torch.nn.Embedding:
    """The text encoder's word table (a CLIP text model's `token_embedding`)."""
    encoder = getattr(model, "text_encoder", None)
    if encoder is None:
        raise CadRayError(f"the {model.kind} model has no text encoder: the inversion probe learns a word for it")
    return encoder.get_input_embeddings()


def word_id(model, word: str) -> int:
    """The token id of `word`: where the inversion probe puts its learned embedding."""
    tokenizer = model.tokenizer
    if hasattr(tokenizer, "ids"):  # the digits tokenizer: one token a word
        if word not in tokenizer.ids:
            raise CadRayError(f"the inversion probe needs the concept's word in the vocabulary; {word!r} is not")
        return int(tokenizer.ids[word])
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise CadRayError(f"the inversion probe cannot place a word for {word!r}: it has no tokens")
    return int(ids[0])


def word_norm_bound(model) -> float:
    """The largest norm of a real word's embedding (special tokens left out): the learned word stays within."""
    table = token_embedding(model).weight.detach()
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[special_token_ids(model)] = False
    return float(table[keep].norm(dim=1).max())


@contextmanager
def learned_word(model, token_id: int, vector: torch.Tensor):
    """Every occurrence of `token_id` in a prompt reads `vector` instead of its row of the table (the row
    itself is untouched, so an edit that zeroed it stays zeroed)."""
    def replace(module, inputs, output):
        ids = inputs[0]
        return torch.where((ids == token_id)[..., None], vector.to(output.dtype), output)

    handle = token_embedding(model).register_forward_hook(replace)
    try:
        yield model
    finally:
        handle.remove()


def cycled(prompts: list[str], n: int) -> list[str]:
    """n prompts, the given ones in turn: image k is drawn from prompts[k % len(prompts)], so that another
    concept's prompts at the same index word the same thing otherwise (a colour's "a red seven", "a blue seven")."""
    return [prompts[k % len(prompts)] for k in range(n)]


def concept_word(name: str) -> str:
    """The word an attack learns for a concept: its name as a prompt writes it (the first word)."""
    return name.replace("_", " ").split()[0]


def concept_images(model, prompts: list[str], n: int, seed: int, steps: int | None = None) -> torch.Tensor:
    """n final latents of the concept drawn by `model` (the unedited one), its prompts in turn: what the attacks
    learn from and what completion starts from."""
    return model.sample(cycled(prompts, n), seed=derive_seed(seed, "probe-images"), steps=steps).latents[-1]


def noised_batch(model, x0: torch.Tensor, generator: torch.Generator, power: float = 1.0):
    """A denoising-loss batch: x0 noised at uniform training timesteps (`power` > 1: t = T * u ** power, more of
    them at low noise), and what the model should output."""
    alphas_all = model.scheduler.alphas_cumprod.to(x0.device)
    if power == 1.0:
        t = torch.randint(0, len(alphas_all), (len(x0),), generator=generator)
    else:
        t = (torch.rand(len(x0), generator=generator) ** power * len(alphas_all)).long().clamp(max=len(alphas_all) - 1)
    t = t.to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    alphas = alphas_all[t].view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
    x_t = alphas.sqrt() * x0 + (1 - alphas).sqrt() * noise
    return x_t, t, denoising_target(model.prediction_type, x0, noise, alphas)


def _fit(model, x0: torch.Tensor, conditioning, parameter: torch.Tensor, settings: ProbeSettings, seed: int,
         project=None) -> torch.Tensor:
    """Adam on the denoising loss of `x0` with `conditioning(batch_rows)` as the UNet's condition, moving only
    `parameter` (the model stays frozen); `project` keeps it in its bound after each step."""
    generator = torch_generator(seed, "probe-fit")
    parameter = parameter.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([parameter], lr=settings.lr)
    batch = min(settings.batch, len(x0))
    for _ in range(settings.steps):
        rows = torch.randperm(len(x0), generator=generator)[:batch]
        x_t, t, target = noised_batch(model, x0[rows], generator)
        out = model.predict_noise(x_t, t, conditioning(parameter, len(rows)))
        loss = (out.float() - target.float()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if project is not None:
            with torch.no_grad():
                parameter.copy_(project(parameter))
    return parameter.detach()


class TextualInversion:
    """The `inversion` probe: learn one word embedding that makes the model draw the concept's images.

    `attribute`-like single call: `fit(model, x0)` returns the learned vector; `sample(model, vector, ...)` draws
    with it. The prompts are the concept's own wordings that contain `word`; the word's slot reads the vector."""

    def __init__(self, model, word: str, prompts: list[str], settings: ProbeSettings = ProbeSettings(),
                 bound: float | None = None):
        self.token_id = word_id(model, word)
        tokens = [model.tokenizer.words(p) if hasattr(model.tokenizer, "words") else p.split() for p in prompts]
        self.prompts = [p for p, words in zip(prompts, tokens) if word in words]
        if not self.prompts:
            raise CadRayError(f"the inversion probe needs prompts that contain the word {word!r}")
        self.settings = settings
        self.bound = word_norm_bound(model) if bound is None else float(bound)

    def initial(self, model) -> torch.Tensor:
        """The floor's embedding: the mean of the real words' rows, a word that asks for nothing in particular."""
        table = token_embedding(model).weight.detach()
        keep = torch.ones(len(table), dtype=torch.bool)
        keep[special_token_ids(model) + [self.token_id]] = False
        return table[keep].mean(dim=0)

    def _project(self, vector: torch.Tensor) -> torch.Tensor:
        norm = vector.norm()
        return vector * (self.bound / norm) if norm > self.bound else vector

    def fit(self, model, x0: torch.Tensor, seed: int = 0) -> torch.Tensor:
        prompts = self.prompts

        def conditioning(vector, n):
            with learned_word(model, self.token_id, vector):
                return model.encode(cycled(prompts, n))

        with torch.enable_grad():
            return _fit(model, x0, conditioning, self.initial(model), self.settings, seed, self._project)

    def asked(self, n: int) -> list[str]:
        """The prompts of n sampled images: the concept's wordings in turn, its word reading the vector."""
        return cycled(self.prompts, n)

    @torch.no_grad()
    def sample(self, model, vector: torch.Tensor, n: int, seed: int, steps: int | None = None,
               guidance: float | None = None):
        with learned_word(model, self.token_id, vector):
            return model.sample(self.asked(n), seed=derive_seed(seed, "probe-sample"), steps=steps,
                                guidance=guidance)


class SoftPrompt:
    """The `soft-prompt` probe: learn the whole conditioning sequence (L, D), unbounded, from the concept's
    images. It starts from the empty prompt's encoding (its floor)."""

    def __init__(self, settings: ProbeSettings = ProbeSettings()):
        self.settings = settings

    @torch.no_grad()
    def initial(self, model) -> torch.Tensor:
        """The floor's sequence: the empty prompt's encoding."""
        return model.encode([NEGATIVE_PROMPT])[0].detach()

    def fit(self, model, x0: torch.Tensor, seed: int = 0) -> torch.Tensor:
        with torch.enable_grad():
            return _fit(model, x0, lambda seq, n: seq.expand(n, *seq.shape), self.initial(model), self.settings, seed)

    def asked(self, n: int) -> list[str]:
        return ["<soft prompt>"] * n

    @torch.no_grad()
    def sample(self, model, sequence: torch.Tensor, n: int, seed: int, steps: int | None = None,
               guidance: float | None = None):
        return model.sample(self.asked(n), seed=derive_seed(seed, "probe-sample"), steps=steps, guidance=guidance,
                            conditioning=sequence.expand(n, *sequence.shape))


def completion_step(steps: int, strength: float) -> int:
    """The step a completion of the given strength starts at: strength 1 re-runs every step (pure noise at
    the start, nothing of the image left), strength 0 none (the image itself)."""
    if not 0 <= strength <= 1 or not np.isfinite(strength):
        raise CadRayError(f"a completion strength is a share of the sampling steps from 0 to 1, got {strength}")
    return steps - int(round(strength * steps))


@torch.no_grad()
def complete(model, x0: torch.Tensor, prompts: list[str], strength: float, seed: int, steps: int | None = None,
             guidance: float | None = None):
    """The `completion` probe: `x0` noised to the step that `strength` says, then denoised by `model` with
    `prompts` (the concept's own, or the empty prompt); image k's noise comes from (seed, k)."""
    steps = model.default_steps if steps is None else steps
    start_step = completion_step(steps, strength)
    seed = derive_seed(seed, "probe-completion")
    start = model.noised_to_step(x0, steps, start_step, seed)
    return model.sample(list(prompts), seed=seed, steps=steps, start=start, start_step=start_step, guidance=guidance)


def _epsilon(kind: str, out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The noise a model output of prediction type `kind` stands for at x (= sqrt(alpha) x0 + sqrt(1-alpha) eps)."""
    if kind == "epsilon":
        return out
    if kind == "v_prediction":
        return alpha.sqrt() * out + (1 - alpha).sqrt() * x
    if kind == "sample":
        return (x - alpha.sqrt() * out) / (1 - alpha).sqrt()
    raise CadRayError(f"the guidance probe does not know the prediction type {kind!r}")


def _output(kind: str, eps: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """`_epsilon`'s inverse: the model output of type `kind` that stands for the noise `eps` at x."""
    return denoising_target(kind, (x - (1 - alpha).sqrt() * eps) / alpha.sqrt(), eps, alpha)


class ClassifierGuidance:
    """The `guidance` probe: sampling steered toward `label` by a differentiable judge.

    `log_probability(images, label)` takes (N, H, W, 3) images in [0, 1] (the model's `decode_tensor`) and
    returns log p(label | image) per image, with gradients. At each step the noise the model predicts is moved
    by `-scale * sqrt(1 - alpha) * grad log p(label | x0_hat(x_t))` (classifier guidance on the predicted clean
    image; the UNet's own output is held fixed in the gradient, as universal guidance does, so a step costs one
    judge backward and no UNet backward). Scale 0 is plain sampling: the probe's floor on the same model."""

    def __init__(self, log_probability, label: str, scale: float):
        if not np.isfinite(scale) or scale < 0:
            raise CadRayError(f"a guidance probe's scale is a finite number >= 0, got {scale}")
        self.log_probability, self.label, self.scale = log_probability, label, float(scale)

    def guide(self, model):
        kind, alphas = model.prediction_type, model.scheduler.alphas_cumprod

        def guide(x_in: torch.Tensor, t, out: torch.Tensor) -> torch.Tensor:
            alpha = alphas[int(round(float(t)))].to(x_in.device, torch.float32)
            with torch.enable_grad():
                x = x_in.detach().float().requires_grad_(True)
                eps = _epsilon(kind, out.detach().float(), x, alpha)
                x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
                log_p = self.log_probability(model.decode_tensor(x0.to(x_in.dtype)), self.label).sum()
                (gradient,) = torch.autograd.grad(log_p, x)
            x = x_in.float()
            eps = _epsilon(kind, out.float(), x, alpha) - self.scale * (1 - alpha).sqrt() * gradient
            return _output(kind, eps, x, alpha).to(out.dtype)

        return guide

    @torch.no_grad()
    def sample(self, model, prompts: list[str], n: int, seed: int, steps: int | None = None,
               guidance: float | None = None):
        return model.sample(cycled(prompts, n), seed=derive_seed(seed, "probe-sample"), steps=steps,
                            guidance=guidance, guide=self.guide(model) if self.scale else None)
