"""The built-in digits model: a diffusers UNet2DConditionModel in pixel space (8x8 RGB) conditioned by a
small CLIP text encoder over the digits grammar, saved in diffusers folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cad_ray.digits import IMAGE_SIZE, VOCABULARY, DigitsTokenizer
from cad_ray.errors import CadRayError
from cad_ray.models.base import TextToImageModel
from cad_ray.models.components import load_component, load_scheduler

PIPELINE_CLASS = "CadRayDigitsPipeline"

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
    time_embedding_dim=128,
)

TEXT_ENCODER_CONFIG = dict(
    vocab_size=len(VOCABULARY),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=10,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
    timestep_spacing="trailing",
)

SAMPLING_DEFAULTS = {"guidance": 3.0, "steps": 50}


class DigitsModel(TextToImageModel):
    kind = "digits"

    def __init__(self, unet, text_encoder, tokenizer: DigitsTokenizer, scheduler, sampling: dict | None = None,
                 source: str = ""):
        super().__init__(unet, scheduler, source)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.sampling = dict(SAMPLING_DEFAULTS if sampling is None else sampling)

    @classmethod
    def build(cls, seed: int = 0) -> "DigitsModel":
        """A freshly initialised (untrained) digits model."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
        return cls(unet, text_encoder, DigitsTokenizer(), DDPMScheduler(**SCHEDULER_CONFIG))

    def sampling_defaults(self) -> dict:
        return self.sampling

    def weight_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.from_numpy(self.tokenizer(prompts)).to(self.device)
        return self.text_encoder(ids).last_hidden_state.to(self.dtype)

    def token_lengths(self, prompts: list[str]) -> list[int]:
        return [int(n) for n in (self.tokenizer(prompts) != self.tokenizer.ids["<pad>"]).sum(axis=1)]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return self.decode_tensor(latents.detach()).cpu().numpy()

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode` with gradients: (N, H, W, 3) in [0, 1] (classifier guidance differentiates a judge through it)."""
        return ((latents.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)

    @staticmethod
    def to_latents(images: np.ndarray) -> torch.Tensor:
        """Images (N, H, W, 3) in [0, 1] -> model space (N, 3, H, W) in [-1, 1]."""
        return torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.scheduler.save_pretrained(folder / "scheduler")
        index = {
            "_class_name": PIPELINE_CLASS,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["cad_ray", "DigitsTokenizer"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "sampling": self.sampling,
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, index: dict, source: str = "") -> "DigitsModel":
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel


        folder = Path(folder)
        unet = load_component(UNet2DConditionModel, folder, "unet")
        text_encoder = load_component(CLIPTextModel, folder, "text_encoder")
        tokenizer = DigitsTokenizer.from_pretrained(folder / "tokenizer")
        text = text_encoder.config  # a tokenizer the text encoder cannot read fails at the first prompt, not here
        if tokenizer.max_length > text.max_position_embeddings or len(tokenizer.vocabulary) > text.vocab_size:
            raise CadRayError(f"malformed digits tokenizer in {folder / 'tokenizer'}: max_length "
                              f"{tokenizer.max_length} and {len(tokenizer.vocabulary)} words, where the text encoder "
                              f"reads at most {text.max_position_embeddings} positions and {text.vocab_size} words")
        scheduler = load_scheduler(folder, index)
        sampling = index.get("sampling")
        if sampling is not None and not (isinstance(sampling, dict) and set(sampling) <= {"guidance", "steps"}
                                         and all(isinstance(v, (int, float)) for v in sampling.values())):
            raise CadRayError(f"malformed {folder / 'model_index.json'}: 'sampling' must be a mapping such as "
                              f'{{"guidance": 3.0, "steps": 50}}, got {sampling!r}')
        if sampling is not None and not (int(sampling.get("steps", 1)) == sampling.get("steps", 1) >= 1
                                         and np.isfinite(sampling.get("guidance", 0.0))):
            raise CadRayError(f"malformed {folder / 'model_index.json'}: 'sampling' needs steps a whole number >= 1 "
                              f"and a finite guidance, got {sampling!r}")
        return cls(unet, text_encoder, tokenizer, scheduler, sampling, source=source)
