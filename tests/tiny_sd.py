"""A tiny randomly initialised Stable Diffusion pipeline, built and saved by the tests themselves
(there is no model hub here). Same components and folder layout as SD 1.x, a few thousand times smaller."""

from __future__ import annotations

from pathlib import Path

import torch


def _byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet, each symbol alone and as a word end, plus the special tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def build_tiny_sd(folder: str | Path, seed: int = 0, scheduler_class: str = "DDIMScheduler",
                  channels: tuple[int, int] = (16, 32), **scheduler_options) -> Path:
    """The tiny pipeline in `folder`; its weights depend on `seed` alone. The scheduler is SD 1.x's DDIM config,
    carried over to `scheduler_class` (any diffusers scheduler name) the way diffusers swaps schedulers, with
    `scheduler_options` (e.g. prediction_type="v_prediction", timestep_spacing="leading") on top. `channels`: the
    UNet's block widths (twice as wide: four times the feed-forward components)."""
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cad_ray.models.stable_diffusion import StableDiffusionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=tuple(channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    vocab = _byte_level_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if scheduler_class != "DDIMScheduler" or scheduler_options:
        scheduler = getattr(diffusers, scheduler_class).from_config(scheduler.config, **scheduler_options)
    StableDiffusionModel(unet, text_encoder, tokenizer, vae, scheduler).save_pretrained(folder)
    return folder
