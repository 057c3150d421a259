"""Concept objectives J(c, w): how strongly the model expresses concept c.

Both objectives are J = sign * mean_k || eps(x_k, cond_k, t_k; w) - target_k ||^2 over evaluation points,
where eps is the UNet's output (a noise prediction, or v, or x_0: the scheduler's `prediction_type`) and
x_k is the UNet's input, `scheduler.scale_model_input` already applied:

- erase (sign +1): x_k are the points of guided sampling trajectories for the concept's prompts, target_k is
  the stop-gradient output for the base prompt at the same point (computed once, at the weights the points
  were made with) -- two outputs of the same kind, whatever the prediction type;
- amplify (sign -1): x_k = noised images of the concept (real ones when the concept has them, else the final
  samples of its trajectories), target_k = what the model was trained to predict there: the noise that was
  added (epsilon), v = sqrt(a) noise - sqrt(1 - a) x_0 (v_prediction) or x_0 (sample).

Each sample's randomness comes from (run seed, concept, sample index) alone, so the points of a sample are
the same however the samples are split into shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cad_ray.errors import CadRayError
from cad_ray.models.base import NEGATIVE_PROMPT, PREDICTION_TYPES, check_scheduler, prediction_type
from cad_ray.seeds import derive_seed, numpy_rng, torch_generator


@dataclass(frozen=True)
class Concept:
    """A concept: its prompts, the base prompt of each (erase objective), and optional real images (amplify).

    `images` are in the model's input space (N, C, H, W); `base_prompts` has one entry per prompt.
    """

    name: str
    prompts: tuple[str, ...]
    base_prompts: tuple[str, ...] = ()
    images: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not self.name:
            raise CadRayError("a concept needs a name")
        if not self.prompts:
            raise CadRayError(f"concept {self.name!r} has an empty prompt list")
        if not self.base_prompts:
            object.__setattr__(self, "base_prompts", (NEGATIVE_PROMPT,) * len(self.prompts))
        elif len(self.base_prompts) == 1:
            object.__setattr__(self, "base_prompts", tuple(self.base_prompts) * len(self.prompts))
        elif len(self.base_prompts) != len(self.prompts):
            raise CadRayError(f"concept {self.name!r}: {len(self.base_prompts)} base prompts for "
                              f"{len(self.prompts)} prompts")

    def prompt(self, sample: int) -> tuple[str, str]:
        k = sample % len(self.prompts)
        return self.prompts[k], self.base_prompts[k]


@dataclass
class Points:
    """Evaluation points of a block of samples; `sample[k]` is the sample index point k belongs to.

    `x` is the UNet's input (already `scale_model_input`-ed), so `model.predict_noise(x, t, cond)` is the
    UNet's output at the point with any scheduler; `target` is in the UNet's output space."""

    x: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor
    sample: torch.Tensor
    sign: float
    base_cond: torch.Tensor | None = None  # erase only: lets the base term be recomputed under an ablation

    def __len__(self) -> int:
        return len(self.t)

    def chunk(self, start: int, stop: int) -> "Points":
        part = lambda v: None if v is None else v[start:stop]  # noqa: E731
        return Points(part(self.x), part(self.t), part(self.cond), part(self.target), part(self.sample),
                      self.sign, part(self.base_cond))

    def weights(self) -> torch.Tensor:
        """1 / (points of the same sample), so that each sample's J is the mean over its points."""
        _, inverse, counts = torch.unique(self.sample, return_inverse=True, return_counts=True)
        return 1.0 / counts[inverse].double()


def point_values(model, points: Points, target: torch.Tensor | None = None) -> torch.Tensor:
    """sign * ||eps - target||^2 (mean over elements) for each point; differentiable in the weights."""
    eps = model.predict_noise(points.x, points.t, points.cond)
    return squared_errors(eps, points.target if target is None else target, points.sign)


def squared_errors(eps: torch.Tensor, target: torch.Tensor, sign: float) -> torch.Tensor:
    """sign * ||eps - target||^2 (mean over elements) per row."""
    dtype = torch.promote_types(eps.dtype, torch.float32)  # half-precision models: compare in float32
    return sign * (eps.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1)


def denoising_target(kind: str, x0: torch.Tensor, noise: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """What a `kind` model is trained to output at x_t = sqrt(a) x0 + sqrt(1 - a) noise (a = alphas_cumprod[t])."""
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return alphas.sqrt() * noise - (1 - alphas).sqrt() * x0
    if kind == "sample":
        return x0
    raise CadRayError(f"unknown prediction type {kind!r}; cad-ray supports {', '.join(PREDICTION_TYPES)}")


def trajectory_seed(seed: int, concept: Concept) -> int:
    """The seed of a concept's trajectories: sample s starts from noise seeded by (this, s)."""
    return derive_seed(seed, concept.name, "trajectory")


def concept_trajectories(model, concept: Concept, prompts: list[str], samples: list[int], seed: int,
                         guidance: float | None, steps: int | None, keep_unguided: bool = False, gradient_rows=None):
    """Guided trajectories of a concept's samples; sample s starts from noise seeded by (seed, concept, s)."""
    return model.sample(prompts, seed=trajectory_seed(seed, concept), guidance=guidance, steps=steps,
                        ids=samples, keep_unguided=keep_unguided, gradient_rows=gradient_rows)


class EraseObjective:
    name = "erase"
    sign = 1.0
    phase = 0  # objectives of a later phase are attributed once every earlier one's scores are written

    # the config's defaults too (config.EraseOptions; why 10 points: docs/benchmarks.md)
    def __init__(self, guidance: float | None = None, steps: int | None = None, points_per_sample: int | None = 10,
                 fused: bool = False):
        self.guidance, self.steps, self.points_per_sample = guidance, steps, points_per_sample
        self.fused = fused  # the CAD estimator takes the points' forward pass from the sampler (`fused_backward`)

    @torch.no_grad()
    def points(self, model, concept: Concept, samples: list[int], seed: int, chunk_size: int = 256) -> Points:
        """One guided trajectory per sample; every kept (x_t, t) is a point (or a seeded subset of them).

        The points are the UNet inputs the sampler itself made, `scale_model_input(x_t, t)` at the sampler's
        own timesteps (sigma-scaled for Euler-type samplers), so J is measured where the model is used."""
        prompts, bases = map(list, zip(*(concept.prompt(s) for s in samples)))
        # the base prompt is the sampler's negative prompt (NEGATIVE_PROMPT): the target, the UNet's output for it
        # at each point, was already computed by the guidance of that step
        reuse = self.fusable(concept, samples)
        traj = concept_trajectories(model, concept, prompts, samples, seed, self.guidance, self.steps,
                                    keep_unguided=reuse)
        inputs = traj.model_inputs
        xs, ts, rows, targets = [], [], [], []
        for row, s in enumerate(samples):
            keep = self.kept_steps(concept, s, seed, len(traj.timesteps))
            xs.append(inputs[keep, row])
            if reuse:
                targets.append(traj.unguided[keep, row])
            ts.append(traj.timesteps[keep])
            rows += [row] * len(keep)
        x, t, rows = torch.cat(xs), torch.cat(ts).to(model.device), torch.tensor(rows)
        cond, base_cond = model.encode(prompts)[rows.to(model.device)], model.encode(bases)[rows.to(model.device)]
        if reuse:
            target = torch.cat(targets)
        else:
            target = torch.cat([model.predict_noise(x[i:i + chunk_size], t[i:i + chunk_size],
                                                    base_cond[i:i + chunk_size]) for i in range(0, len(t), chunk_size)])
        return Points(x, t, cond, target, torch.tensor(samples)[rows], self.sign, base_cond)

    def kept_steps(self, concept: Concept, sample: int, seed: int, steps: int) -> np.ndarray:
        """The sampler steps of `sample`'s trajectory that are points: all of them, or a seeded subset."""
        keep = np.arange(steps)
        if self.points_per_sample and self.points_per_sample < steps:
            keep = np.sort(numpy_rng(seed, concept.name, sample, "steps").choice(keep, self.points_per_sample,
                                                                                 replace=False))
        return keep

    @staticmethod
    def fusable(concept: Concept, samples: list[int]) -> bool:
        """Whether every sample's base prompt is the sampler's negative prompt (NEGATIVE_PROMPT), so that the target
        at each point is the unguided half of the sampler's own step."""
        return all(concept.prompt(s)[1] == NEGATIVE_PROMPT for s in samples)

    @torch.no_grad()
    def fused_backward(self, model, concept: Concept, samples: list[int], seed: int, backward) -> None:
        """The points that `points` makes, with their forward pass fused into the sampler's: at each point, the
        conditional half of the guided step is computed with gradients, and `backward(values, weights)` gets the
        points' J (`squared_errors` against the step's own unguided half, the target `points` would give) and
        their weights (1 / points of their sample). The same points and J as `points` + `point_values`, up to
        float rounding (the conditional outputs are computed in other batches), with one forward pass fewer per
        point. Needs `fusable`."""
        prompts = [concept.prompt(s)[0] for s in samples]
        concept_trajectories(model, concept, prompts, samples, seed, self.guidance, self.steps,
                             gradient_rows=_FusedPoints(self, concept, samples, seed, backward))

    @torch.no_grad()
    def fused_backward_stacked(self, model, parts: list[tuple[Concept, list[int]]], seed: int, backward,
                               forward_parts) -> None:
        """`fused_backward` of several concepts in one sampler call: the trajectories of `parts` ((concept,
        samples), each `fusable`) are stacked in that order, each the one `fused_backward` would sample for its
        concept (its noise comes from its concept's seed). `forward_parts(labels)` is told, before each pass
        with gradients, the part index of each of its rows; `backward(values, weights, labels)` gets the points'
        J, weights and part indices. The same points and J as `fused_backward` of each part, up to float
        rounding (the rows are computed in larger batches)."""
        prompts, seeds, ids, views = [], [], [], []
        for concept, samples in parts:
            prompts += [concept.prompt(s)[0] for s in samples]
            seeds += [trajectory_seed(seed, concept)] * len(samples)
            ids += list(samples)
            views.append(_FusedPoints(self, concept, samples, seed, None))
        model.sample(prompts, guidance=self.guidance, steps=self.steps, ids=ids, seeds=seeds,
                     gradient_rows=_StackedFusedPoints(views, backward, forward_parts))


class _FusedPoints:
    """The sampler's view of the fused erase points (`TextToImageModel.sample`'s `gradient_rows`)."""

    def __init__(self, objective: EraseObjective, concept: Concept, samples: list[int], seed: int, backward):
        self.objective, self.concept, self.samples, self.seed = objective, concept, samples, seed
        self._backward, self._kept = backward, None

    def rows(self, step: int, steps: int) -> torch.Tensor:
        if self._kept is None:  # the sampler's step count is known once its scheduler is set
            self._kept = [set(self.objective.kept_steps(self.concept, s, self.seed, steps).tolist())
                          for s in self.samples]
        return torch.tensor([row for row, kept in enumerate(self._kept) if step in kept], dtype=torch.long)

    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        """1 / (points of the row's sample) for each of `rows`."""
        return torch.tensor([1.0 / len(self._kept[row]) for row in rows.tolist()], dtype=torch.float64)

    def backward(self, step: int, rows: torch.Tensor, out_c: torch.Tensor, out_u: torch.Tensor) -> None:
        self._backward(squared_errors(out_c, out_u, self.objective.sign), self.weights(rows))


class _StackedFusedPoints:
    """The sampler's view of several concepts' fused erase points stacked in one batch (`fused_backward_stacked`):
    part i's rows follow part i - 1's."""

    def __init__(self, parts: list[_FusedPoints], backward, forward_parts):
        self.parts, self._backward, self._forward_parts = parts, backward, forward_parts
        self.offsets = np.cumsum([0] + [len(p.samples) for p in parts[:-1]]).tolist()
        self._rows: list[torch.Tensor] = []  # the step's rows of each part, and their part indices
        self._labels = torch.empty(0, dtype=torch.long)

    def rows(self, step: int, steps: int) -> torch.Tensor:
        self._rows = [part.rows(step, steps) for part in self.parts]
        self._labels = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(self._rows)])
        if len(self._labels):  # the sampler's pass with gradients comes next
            self._forward_parts(self._labels)
        return torch.cat([r + offset for r, offset in zip(self._rows, self.offsets)])

    def backward(self, step: int, rows: torch.Tensor, out_c: torch.Tensor, out_u: torch.Tensor) -> None:
        weights = torch.cat([part.weights(r) for part, r in zip(self.parts, self._rows)])
        self._backward(squared_errors(out_c, out_u, self.parts[0].objective.sign), weights, self._labels)


class AmplifyObjective:
    name = "amplify"
    sign = -1.0
    phase = 0

    def __init__(self, points_per_sample: int = 50, guidance: float | None = None, steps: int | None = None):
        if points_per_sample < 1:
            raise CadRayError("points_per_sample must be at least 1")
        self.points_per_sample, self.guidance, self.steps = points_per_sample, guidance, steps

    @torch.no_grad()
    def points(self, model, concept: Concept, samples: list[int], seed: int, chunk_size: int = 256) -> Points:
        """Per sample: one image of the concept, noised at `points_per_sample` seeded timesteps.

        The noising is the DDPM forward process at integer training timesteps, x_t = sqrt(a) x0 + sqrt(1-a) noise
        with a = alphas_cumprod[t], whatever the sampling scheduler: that x_t is already the UNet's input (no
        `scale_model_input`). For an Euler-type scheduler this is the same thing written another way: its state at
        sigma = sqrt((1 - a) / a) is x0 + sigma noise, and scale_model_input divides it by sqrt(sigma^2 + 1) =
        1 / sqrt(a), which gives this x_t; and its timesteps (timestep_type 'discrete') are on the same training
        timestep scale. Calling scale_model_input on this x_t would multiply it by sqrt(a) a second time; and a
        sampling scheduler's scale_model_input only knows the sigmas of its inference steps, not an arbitrary
        training timestep."""
        check_scheduler(model.scheduler)  # needs alphas_cumprod and discrete timesteps; a supported prediction type
        kind = prediction_type(model.scheduler)
        prompts = [concept.prompt(s)[0] for s in samples]
        if concept.images is not None:
            x0 = torch.stack([concept.images[numpy_rng(seed, concept.name, s, "image").integers(len(concept.images))]
                              for s in samples])
        else:
            x0 = concept_trajectories(model, concept, prompts, samples, seed, self.guidance, self.steps).latents[-1]
        prompts = self.conditioning(concept, samples)
        k, n_train = self.points_per_sample, model.scheduler.config.num_train_timesteps
        ts, noises = [], []
        for s in samples:
            g = torch_generator(seed, concept.name, s, "noise")
            ts.append(torch.randint(0, n_train, (k,), generator=g))
            noises.append(torch.randn((k, *x0.shape[1:]), generator=g))
        t, noise = torch.cat(ts), torch.cat(noises).to(model.device, model.dtype)
        rows = torch.arange(len(samples)).repeat_interleave(k)
        alphas = model.scheduler.alphas_cumprod[t].to(model.device, model.dtype).view(-1, 1, 1, 1)
        x0 = x0.to(model.device, model.dtype)[rows.to(model.device)]
        x = alphas.sqrt() * x0 + (1 - alphas).sqrt() * noise
        cond = model.encode(prompts)[rows.to(model.device)]
        target = denoising_target(kind, x0, noise, alphas)
        return Points(x, t.to(model.device), cond, target, torch.tensor(samples)[rows], self.sign)

    def conditioning(self, concept: Concept, samples: list[int]) -> list[str]:
        """The prompt each sample's noised image is denoised under: the concept's own."""
        return [concept.prompt(s)[0] for s in samples]


class PriorObjective(AmplifyObjective):
    """How well the model draws the concept when the prompt does not ask for it: the amplify objective's
    denoising of the concept's images, conditioned on each prompt's base prompt instead of the prompt.

    Positive scores are the components that make the concept's images likely without its words (the image
    pathway: a digit the model draws for a prompt that names no digit). Erasing the words alone leaves that
    prior, so a word-level erase is joined with these (`prior:` parts of a selection, docs/editing.md)."""

    name = "prior"

    def conditioning(self, concept: Concept, samples: list[int]) -> list[str]:
        return [concept.prompt(s)[1] for s in samples]


class ResidualObjective(AmplifyObjective):
    """What still draws the concept once a first edit has taken its words: the amplify objective (the concept's
    images denoised under its own prompts) on the model with `after` (a selection of the run's own scores) zeroed
    at `after_ratio`. The attribution stage computes it after the other objectives, on the edited model
    (`AttributionWorker.first_edit`).

    Why: a zeroed word is not an absent word. On the digits model every prompt whose digit words are zeroed
    draws the same images, more often threes and nines than a prompt with no digit word does (docs/editing.md);
    so zeroing three's words leaves three drawn. The residual scores find, contrasted
    against the other concepts' residuals, the cross-attention components that draw three from the zeroed word
    and nothing else (docs/editing.md)."""

    name = "residual"
    phase = 1  # its first edit ranks the other objectives' scores

    def __init__(self, after: str, after_ratio: float, **options):  # from the config's `residual` section
        super().__init__(**options)
        self.after, self.after_ratio = after, after_ratio


OBJECTIVES = {"erase": EraseObjective, "amplify": AmplifyObjective, "prior": PriorObjective,
              "residual": ResidualObjective}


def objective_phase(name: str) -> int:
    """When a run attributes the objective `name`: after every pair of a lower phase (0 where it names none:
    conceptprune's statistics)."""
    return getattr(OBJECTIVES.get(name), "phase", 0)


def make_objective(name: str, **options):
    if name not in OBJECTIVES:
        raise CadRayError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**options)
