"""What the judges built on a transformers checkpoint share (classifier, clip-score, fd-dinov2): finding their
weights folder, loading it with cad_ray.models' checks, the image settings it ships, and the image recipe.

This module imports torch; `cad_ray.judges` (the registry, which `cad-ray judges` reads) does not import it:
it gives these names on request, as before they moved here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cad_ray.errors import CadRayError
from cad_ray.models.components import load_component, quiet_libraries
from cad_ray.models.loading import fetch_s3_folder, is_s3


def weights_folder(path: str, judge: str) -> Path:
    """A judge's weights folder: local, or `s3://` copied once to the local cache (cad_ray.models' fetcher)."""
    if not path:
        raise CadRayError(f"judge {judge!r} needs its weights: option 'weights' (a folder or s3://bucket/prefix)")
    folder = fetch_s3_folder(str(path)) if is_s3(str(path)) else Path(path).expanduser()
    if not folder.is_dir():
        raise CadRayError(f"judge {judge!r}: weights folder {path} does not exist")
    return folder


def load_pretrained(cls, folder: Path):
    """`cls.from_pretrained` on a judge's weights folder (see `weights_folder`), on the CPU, in eval mode, with
    cad_ray.models' checks (safetensors, or pickles that load with weights_only) and one-line errors."""
    quiet_libraries()
    return load_component(cls, folder.parent, folder.name).eval()


def preprocessor_settings(folder: Path) -> dict:
    """The image settings a transformers checkpoint ships (`preprocessor_config.json`), or {}."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise CadRayError(f"malformed {file}: {e}") from None


def resize_and_crop(images, resize: int, crop: int, mean, std, mode: str = "bicubic"):
    """(N, H, W, 3) floats in [0, 1] -> normalised (N, 3, crop, crop) tensor: the shorter side resized to `resize`,
    then the centre `crop` (the torchvision/transformers recipe, done with torch alone)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    height, width = x.shape[-2:]
    scale = resize / min(height, width)
    size = (max(crop, round(height * scale)), max(crop, round(width * scale)))
    x = torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True).clamp(0, 1)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    x = x[:, :, top:top + crop, left:left + crop]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
