"""Tiny randomly initialised judge networks of the real classes (CLIP, DINOv2, ResNet), saved in transformers'
folder layout by the tests themselves (there is no model hub here)."""

from __future__ import annotations

from pathlib import Path

import torch

IMAGENETTE_LIKE = {0: "tench, Tinca tinca", 1: "chain saw, chainsaw", 2: "church, church building"}


def build_tiny_resnet(folder: str | Path, winner: int = 1, seed: int = 0) -> Path:
    """A ResNetForImageClassification with three ImageNet-named classes whose head always picks `winner` (the
    head's weights zeroed, its bias favouring that class), so the verdict is known."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=3, id2label=IMAGENETTE_LIKE, label2id={v: k for k, v in IMAGENETTE_LIKE.items()})
    model = ResNetForImageClassification(config).eval()
    head = model.classifier[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.0]).index_fill_(0, torch.tensor([winner]), 1.0))
    model.save_pretrained(folder)
    return Path(folder)


def build_tiny_dinov2(folder: str | Path, seed: int = 0) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          patch_size=8, image_size=32)
    Dinov2Model(config).eval().save_pretrained(folder)
    return Path(folder)


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A CLIPModel (16-wide towers, 32x32 images) and its byte-level CLIPTokenizer, in one folder as the
    openai/clip-vit-base-patch32 checkpoint is laid out."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from tiny_sd import _byte_level_vocab

    torch.manual_seed(seed)
    vocab = _byte_level_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval().save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32).save_pretrained(folder)
    return Path(folder)
