"""Stable Diffusion 1.x/2.x pipelines in diffusers folder layout (UNet + CLIP text encoder + tokenizer + VAE +
scheduler), loaded component by component so that no hub access and no pickle is ever needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cad_ray.errors import CadRayError
from cad_ray.models.base import TextToImageModel
from cad_ray.models.components import load_component, load_scheduler


class StableDiffusionModel(TextToImageModel):
    kind = "stable-diffusion"

    def __init__(self, unet, text_encoder, tokenizer, vae, scheduler, source: str = ""):
        super().__init__(unet, scheduler, source)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vae = vae.eval().requires_grad_(False)

    def weight_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}

    def sampling_defaults(self) -> dict:
        return {"guidance": 7.5, "steps": 50}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def token_lengths(self, prompts: list[str]) -> list[int]:
        mask = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").attention_mask
        return [int(n) for n in mask.sum(dim=1)]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.decode_tensor(latents).cpu().numpy()

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode` with gradients: (N, H, W, 3) in [0, 1] (classifier guidance differentiates a judge through it)."""
        # the VAE's device too: a trajectory's images are decoded when first asked for, maybe after a move
        latents = latents.to(self.vae.device, self.vae.dtype)
        images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, module in self.weight_modules().items():
            module.save_pretrained(folder / name, safe_serialization=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.scheduler.save_pretrained(folder / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, index: dict, source: str = "") -> "StableDiffusionModel":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        unet = load_component(UNet2DConditionModel, folder, "unet")
        text_encoder = load_component(CLIPTextModel, folder, "text_encoder")
        vae = load_component(AutoencoderKL, folder, "vae")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        except Exception as e:
            raise CadRayError(f"cannot load the tokenizer from {folder / 'tokenizer'}: {e}") from None
        # a tokenizer config without model_max_length gets transformers' "very large" placeholder
        if not 0 < tokenizer.model_max_length <= 1 << 16:
            positions = text_encoder.config.max_position_embeddings
            raise CadRayError(f"{folder / 'tokenizer' / 'tokenizer_config.json'} has no model_max_length; add "
                              f'"model_max_length": {positions} (the text encoder\'s max_position_embeddings)')
        return cls(unet, text_encoder, tokenizer, vae, load_scheduler(folder, index), source=source)
