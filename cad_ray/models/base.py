"""The one model interface: a text-conditioned denoiser with a diffusers UNet and scheduler.

Subclasses say how prompts become conditioning (`encode`), how latents become images (`decode`) and what
shape a latent has; sampling with classifier-free guidance, noise prediction and parameter listing are
shared, so every model is attributed and edited the same way.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from cad_ray.seeds import derive_seed


@dataclass
class Trajectory:
    """A guided sampling run that kept every intermediate point.

    `latents[k]` is the point `x_t` fed to the UNet at `timesteps[k]` (k < steps); `latents[-1]` is the
    final sample. `images` are the decoded final samples, (N, H, W, 3) in [0, 1].
    """

    prompts: list[str]
    latents: torch.Tensor  # (steps + 1, N, C, H, W)
    timesteps: torch.Tensor  # (steps,)
    images: np.ndarray
    guidance: float


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
        for module in self.weight_modules().values():
            module.to(device)
        return self

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The denoiser's parameters, named as in the UNet's state dict (`down_blocks.0...ff.net.0.proj.weight`)."""
        return self.unet.named_parameters()

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction eps(x_t, cond, t)."""
        if not torch.is_tensor(t):
            t = torch.tensor(t)
        t = t.to(x_t.device).expand(x_t.shape[0]) if t.dim() == 0 else t.to(x_t.device)
        return self.unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]

    def new_scheduler(self, steps: int):
        """A fresh copy of the sampling scheduler set to `steps` (schedulers carry state while sampling)."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def initial_noise(self, n: int, seed: int, ids: Sequence[int] | None = None) -> torch.Tensor:
        """x_T for n samples; sample k's noise depends on (seed, ids[k]) alone (ids default to 0..n-1),
        so a run gives the same starting points however it is batched."""
        ids = range(n) if ids is None else ids
        if len(ids) != n:
            raise ValueError(f"{n} samples but {len(ids)} ids")
        shape = self.latent_shape
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, int(k)))) for k in ids]
        return torch.stack(noise).to(self.device, self.dtype) * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0, guidance: float | None = None, steps: int | None = None,
               negative_prompt: str = "", ids: Sequence[int] | None = None, progress: bool = False) -> Trajectory:
        """Sample one image per prompt with classifier-free guidance, keeping every x_t on the way.

        Image k's starting noise, and the step noise of a stochastic sampler, come from (seed, ids[k])
        alone, so an image is the same whatever else is in the batch."""
        guidance = self.default_guidance if guidance is None else guidance
        steps = self.default_steps if steps is None else steps
        scheduler = self.new_scheduler(steps)
        cond = self.encode(list(prompts))
        uncond = self.encode([negative_prompt] * len(prompts))
        x = self.initial_noise(len(prompts), seed, ids)
        # stochastic samplers draw their step noise from one generator per image, seeded by (seed, id)
        ids = range(len(prompts)) if ids is None else ids
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = [torch.Generator().manual_seed(derive_seed(seed, int(k), "steps")) for k in ids]
        kept = []
        timesteps = scheduler.timesteps
        iterator = timesteps
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(timesteps, desc="sampling", unit="step", leave=False)
        for t in iterator:
            kept.append(x)
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = self.predict_noise(x_in, t, torch.cat([uncond, cond])).chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            x = scheduler.step(eps, t, x, return_dict=False, **step_kwargs)[0]
        kept.append(x)
        return Trajectory(list(prompts), torch.stack(kept), timesteps.detach().cpu(), self.decode(x), guidance)

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

