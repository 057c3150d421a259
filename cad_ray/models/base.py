"""The one model interface: a text-conditioned denoiser with a diffusers UNet and scheduler.

Subclasses say how prompts become conditioning (`encode`), how latents become images (`decode`) and what
shape a latent has; sampling with classifier-free guidance, noise prediction and parameter listing are
shared, so every model is attributed and edited the same way.

Schedulers: any discrete-time diffusers scheduler of the DDPM family (it has `alphas_cumprod`): DDPM, DDIM,
PNDM, Euler (ancestral), LMS, Heun, DPM-Solver(++), UniPC, ... The UNet always sees
`scheduler.scale_model_input(x_t, t)`: identity for DDPM/DDIM/DPM-Solver, x_t / sqrt(sigma^2 + 1) for the
Euler-type samplers that keep their state in sigma space. Prediction types: `epsilon`, `v_prediction` and
`sample` (the scheduler config's `prediction_type`); the UNet's output is whatever the model was trained to
predict, and guidance, being linear, is applied to it as is.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cad_ray.errors import CadRayError
from cad_ray.seeds import derive_seed

NEGATIVE_PROMPT = ""  # the shared empty prompt: the sampler's negative prompt, and the default base prompt of a concept
TEXT_ENCODER_PREFIX = "text_encoder."  # names of text-encoder components (scopes `text`, `tokens`)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler) -> str:
    """What the UNet predicts, from the scheduler's config; one-line error for a kind cad-ray cannot handle."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise CadRayError(f"{type(scheduler).__name__} has prediction_type {kind!r}; cad-ray supports "
                          f"{', '.join(PREDICTION_TYPES)}")
    return kind


def check_scheduler(scheduler) -> None:
    """Refuse, in one line, a scheduler the objectives cannot use: they need the discrete-time DDPM forward
    process (`alphas_cumprod`, integer training timesteps) and a supported prediction type."""
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise CadRayError(f"{type(scheduler).__name__} is not a discrete-time DDPM-family scheduler (it has no "
                          "alphas_cumprod); use DDPM, DDIM, PNDM, Euler, LMS, Heun, DPM-Solver or UniPC")
    if scheduler.config.get("timestep_type", "discrete") != "discrete":
        raise CadRayError(f"{type(scheduler).__name__} with timestep_type "
                          f"{scheduler.config.get('timestep_type')!r} is not supported; cad-ray needs the UNet's "
                          "discrete training timesteps (timestep_type 'discrete')")
    prediction_type(scheduler)


@dataclass
class Trajectory:
    """A guided sampling run that kept every intermediate point.

    `latents[k]` is the sampler's state `x_t` at `timesteps[k]` (k < steps); `latents[-1]` is the final
    sample. `inputs[k]` is what the UNet saw at that step, `scheduler.scale_model_input(latents[k], t_k)`:
    the same tensor for DDPM/DDIM/DPM-Solver, the sigma-space state divided by sqrt(sigma^2 + 1) for
    Euler-type samplers. It is kept because that scaling depends on the sampler's step state, which cannot be
    rebuilt reliably from t alone. `images` are the decoded final samples, (N, H, W, 3) in [0, 1], decoded by
    `decoder` on first use: attribution never looks at them, and at Stable Diffusion size a VAE decode costs more
    than a guided UNet step (docs/benchmarks.md).
    """

    prompts: list[str]
    latents: torch.Tensor  # (steps + 1, N, C, H, W)
    timesteps: torch.Tensor  # (steps,)
    decoder: Callable[[torch.Tensor], np.ndarray] = field(repr=False, compare=False)
    guidance: float
    inputs: torch.Tensor | None = None  # (steps, N, C, H, W); None: the same as latents[:-1]
    unguided: torch.Tensor | None = None  # (steps, N, C, H, W): the UNet's output for the negative prompt
    _images: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = self.decoder(self.latents[-1])
        return self._images

    @property
    def model_inputs(self) -> torch.Tensor:
        """The UNet's input at each kept step, (steps, N, C, H, W)."""
        return self.latents[:-1] if self.inputs is None else self.inputs


def check_available(device: str | torch.device) -> None:
    """Refuse, in one line, a device this machine's torch cannot compute on (checked where the model is moved,
    on the worker, not when the config is read: a config written on a laptop may name a cluster's GPUs)."""
    device = torch.device(device)
    kind = device.type
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CadRayError(f"device {str(device)!r}: this machine's torch sees no CUDA GPU; use cpu, or run "
                              "where there is one")
        if device.index is not None and device.index >= count:
            raise CadRayError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), cuda:0 to "
                              f"cuda:{count - 1}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise CadRayError(f"device {str(device)!r}: this machine's torch has no MPS support; use cpu")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise CadRayError(f"device {str(device)!r}: this machine's torch sees no XPU; use cpu")


class TextToImageModel:
    """A text-to-image diffusion model: `unet` (UNet2DConditionModel) plus `scheduler` (diffusers)."""

    kind: str = "abstract"

    def __init__(self, unet, scheduler, source: str = ""):
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.source = source
        self._fingerprint: str | None = None

    # --- what subclasses provide -------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> conditioning for the UNet's cross-attention, (N, L, D)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Final latents -> images, (N, H, W, 3) float32 in [0, 1]."""
        raise NotImplementedError

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode` as a tensor with gradients (classifier guidance differentiates a judge through it)."""
        raise NotImplementedError

    def token_lengths(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt in its encoding, start and end tokens included (padding not)."""
        raise NotImplementedError

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def weight_modules(self) -> dict[str, torch.nn.Module]:
        """The modules whose weights identify the model (fingerprint) and are saved by `save_pretrained`."""
        return {"unet": self.unet}

    def save_pretrained(self, folder: str | Path) -> None:
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device) -> "TextToImageModel":
        check_available(device)
        for module in self.weight_modules().values():
            module.to(device)
        return self

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The components a scope may name: the denoiser's parameters, named as in the UNet's state dict
        (`down_blocks.0...ff.net.0.proj.weight`), then the text encoder's, prefixed `text_encoder.`. The UNet's
        come first and unprefixed, so tables of UNet scopes keep their names and order."""
        yield from self.unet.named_parameters()
        text_encoder = getattr(self, "text_encoder", None)
        if text_encoder is not None:
            for name, parameter in text_encoder.named_parameters():
                yield TEXT_ENCODER_PREFIX + name, parameter

    @property
    def prediction_type(self) -> str:
        """What the UNet outputs: `epsilon` (the noise), `v_prediction` (v) or `sample` (x_0)."""
        return prediction_type(self.scheduler)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's output at (x_t, cond, t): the noise eps for an epsilon model, v or x_0 for the other
        prediction types (`prediction_type`). `x_t` is the UNet's input, already `scale_model_input`-ed."""
        if not torch.is_tensor(t):
            t = torch.tensor(t)
        t = t.to(x_t.device).expand(x_t.shape[0]) if t.dim() == 0 else t.to(x_t.device)
        return self.unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]

    def predict_noise_batched(self, calls: Sequence[tuple]) -> list[torch.Tensor]:
        """`predict_noise` of every (x_t, t, cond) of `calls` in one UNet call, split back: on a small model much
        of a call's cost is fixed, so one call of many images is cheaper than several small ones. A time or a
        condition given once for the call's images is repeated for each. Where the conditions' lengths differ
        they cannot be stacked, and every call runs on its own."""
        if len({tuple(c.shape[1:]) for _, _, c in calls}) > 1 or len(calls) < 2:
            return [self.predict_noise(*call) for call in calls]
        times = [torch.as_tensor(t).to(x.device).reshape(-1).expand(x.shape[0]) for x, t, _ in calls]
        conds = [c.expand(x.shape[0], *c.shape[1:]) for x, _, c in calls]
        out = self.predict_noise(torch.cat([x for x, _, _ in calls]), torch.cat(times), torch.cat(conds))
        return list(out.split([x.shape[0] for x, _, _ in calls]))

    def new_scheduler(self, steps: int):
        """A fresh copy of the sampling scheduler set to `steps` (schedulers carry state while sampling)."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def initial_noise(self, n: int, seed: int, ids: Sequence[int] | None = None, scheduler=None,
                      seeds: Sequence[int] | None = None) -> torch.Tensor:
        """x_T for n samples; sample k's noise depends on (seed, ids[k]) alone (ids default to 0..n-1),
        so a run gives the same starting points however it is batched. `seeds`, one per sample, replace `seed`
        (several concepts' trajectories in one batch, each with its concept's seed).

        Scaled by `scheduler.init_noise_sigma` (default: the model's); pass the scheduler already set to the
        sampling steps, since for Euler-type samplers that sigma depends on them (as in diffusers' pipelines)."""
        scheduler = self.scheduler if scheduler is None else scheduler
        ids = range(n) if ids is None else ids
        if len(ids) != n:
            raise ValueError(f"{n} samples but {len(ids)} ids")
        seeds = [seed] * n if seeds is None else seeds
        if len(seeds) != n:
            raise ValueError(f"{n} samples but {len(seeds)} seeds")
        shape = self.latent_shape
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(s, int(k))))
                 for s, k in zip(seeds, ids)]
        return torch.stack(noise).to(self.device, self.dtype) * scheduler.init_noise_sigma

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0, guidance: float | None = None, steps: int | None = None,
               negative_prompt: str = NEGATIVE_PROMPT, ids: Sequence[int] | None = None, progress: bool = False,
               keep_unguided: bool = False, gradient_rows=None, start: torch.Tensor | None = None,
               start_step: int = 0, conditioning: torch.Tensor | None = None, guide=None,
               seeds: Sequence[int] | None = None) -> Trajectory:
        """Sample one image per prompt with classifier-free guidance, keeping every x_t on the way.

        Image k's starting noise, and the step noise of a stochastic sampler, come from (seed, ids[k])
        alone (or (seeds[k], ids[k]) where `seeds` gives one per image), so an image is the same whatever else is
        in the batch. Each step is diffusers'
        `StableDiffusionPipeline` step: the UNet on `scale_model_input(x_t, t)`, guidance on its outputs
        (linear, so right for every prediction type), the guided output to `scheduler.step`.

        `gradient_rows` (the erase objective's fused points, `EraseObjective.fused_backward`): an object with
        `rows(k, steps)`, the batch rows whose step k is a point, and `backward(k, rows, out_c, out_u)`. For those
        rows the conditional output is computed with gradients (outside this no_grad) and handed over with the
        unconditional one before the step goes on with it detached: the points' forward pass is the sampler's
        own, not a second one.

        `start` and `start_step` (diffusion completion, as diffusers' img2img pipeline does): sampling begins at
        step `start_step` of the `steps` with `start` as its state, already noised to that step's timestep
        (`noised_to_step`); `start_step == steps` returns `start` as the final sample. `conditioning` (N, L, D)
        replaces the prompts' encoding (a soft prompt); `prompts` then only label the images. `guide(x_in, t, out)`
        returns the guided output in place of `out` (classifier guidance, `cad_ray.method.probes`)."""
        check_scheduler(self.scheduler)
        guidance = self.default_guidance if guidance is None else guidance
        steps = self.default_steps if steps is None else steps
        scheduler = self.new_scheduler(steps)
        cond = self.encode(list(prompts)) if conditioning is None else conditioning.to(self.device, self.dtype)
        uncond = self.encode([negative_prompt] * len(prompts))
        if start is None:
            x = self.initial_noise(len(prompts), seed, ids, scheduler=scheduler, seeds=seeds)
        else:
            if not 0 <= start_step <= steps:
                raise CadRayError(f"a completion starts at a step from 0 to {steps}, got {start_step}")
            x = start.to(self.device, self.dtype)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start_step * scheduler.order)
        # stochastic samplers draw their step noise from one generator per image, seeded by (seed, id)
        ids = range(len(prompts)) if ids is None else ids
        seeds = [seed] * len(prompts) if seeds is None else seeds
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = [torch.Generator().manual_seed(derive_seed(s, int(k), "steps"))
                                        for s, k in zip(seeds, ids)]
        kept, inputs, unguided = [], [], []
        timesteps = scheduler.timesteps[start_step * scheduler.order:] if start is not None else scheduler.timesteps
        iterator = timesteps
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(timesteps, desc="sampling", unit="step", leave=False)
        for k, t in enumerate(iterator):
            kept.append(x)
            # once per step: Euler-type schedulers look their sigma up by step index, not by t
            x_in = scheduler.scale_model_input(x, t)
            inputs.append(x_in)
            rows = None if gradient_rows is None else gradient_rows.rows(k, len(timesteps))
            if rows is None or not len(rows):
                out_u, out_c = self.predict_noise(torch.cat([x_in, x_in]), t, torch.cat([uncond, cond])).chunk(2)
            else:
                out_u, out_c = self._step_with_gradients(x_in, t, uncond, cond, rows,
                                                         partial(gradient_rows.backward, k))
            guided = out_u + guidance * (out_c - out_u)
            if guide is not None:
                guided = guide(x_in, t, guided)
            if keep_unguided:
                unguided.append(out_u)
            x = scheduler.step(guided, t, x, return_dict=False, **step_kwargs)[0]
        kept.append(x)
        # an identity scaling (DDPM, DDIM, DPM-Solver) returns its input: no second copy of the trajectory
        same = all(i is k for i, k in zip(inputs, kept))
        return Trajectory(list(prompts), torch.stack(kept), timesteps.detach().cpu(), self.decode, guidance,
                          inputs=None if same else torch.stack(inputs),
                          unguided=torch.stack(unguided) if keep_unguided else None)

    def noised_to_step(self, x0: torch.Tensor, steps: int, start_step: int, seed: int,
                       ids: Sequence[int] | None = None) -> torch.Tensor:
        """`x0` (final latents) noised to the timestep at which step `start_step` of a `steps`-step sampling
        begins: the state `sample(start=..., start_step=...)` takes. Image k's noise comes from (seed, ids[k])."""
        if start_step >= steps:
            return x0.clone()
        scheduler = self.new_scheduler(steps)
        t = scheduler.timesteps[start_step * scheduler.order]
        noise = self.initial_noise(len(x0), seed, ids) / self.scheduler.init_noise_sigma
        return scheduler.add_noise(x0.to(self.device, self.dtype), noise, t.reshape(1).expand(len(x0)))

    def _step_with_gradients(self, x_in, t, uncond, cond, rows: torch.Tensor, backward):
        """One guided step's two outputs, the conditional one of `rows` computed with gradients and given to
        `backward(rows, out_c, out_u)` first; the others in one pass without them."""
        n, rows = x_in.shape[0], rows.to(x_in.device)
        rest = torch.ones(n, dtype=torch.bool, device=x_in.device)
        rest[rows] = False
        out = self.predict_noise(torch.cat([x_in, x_in[rest]]), t, torch.cat([uncond, cond[rest]]))
        out_u = out[:n]
        with torch.enable_grad():  # the objective and its backward pass too
            out_rows = self.predict_noise(x_in[rows], t, cond[rows])
            backward(rows, out_rows, out_u[rows])
        out_c = torch.empty_like(out_u)
        out_c[rest] = out[n:]
        out_c[rows] = out_rows.detach()
        return out_u, out_c

    @property
    def default_guidance(self) -> float:
        return float(self.sampling_defaults().get("guidance", 7.5))

    @property
    def default_steps(self) -> int:
        return int(self.sampling_defaults().get("steps", 50))

    def sampling_defaults(self) -> dict:
        return {}

    def fingerprint(self) -> str:
        """A hash of every weight of the model (names, shapes, dtypes, values): the identity of a score table."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for prefix, module in sorted(self.weight_modules().items()):
                for name, tensor in sorted(module.state_dict().items()):
                    t = tensor.detach().cpu().contiguous()
                    h.update(f"{prefix}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
                    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

