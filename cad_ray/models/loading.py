"""Loading models from a folder or an `s3://` URI, safely.

A model is a diffusers folder: `model_index.json` plus one subfolder per component. Weights load from
safetensors. A pickle checkpoint (`.bin`, `.pt`, `.pth`, `.ckpt`) is loaded only if it passes
`torch.load(weights_only=True)`, which cannot run code; any other pickle is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cad_ray.errors import CadRayError, described
from cad_ray.models.components import (PICKLE_SUFFIXES, check_pickle, component_uses_safetensors,  # noqa: F401
                                       load_component, load_scheduler, quiet_libraries)
from cad_ray.models.digits import PIPELINE_CLASS, DigitsModel
from cad_ray.models.stable_diffusion import StableDiffusionModel
from cad_ray.s3 import connected_s3_filesystem, s3_filesystem  # noqa: F401 (s3_filesystem re-exported: its old home)

BUILTIN_DIGITS = Path(__file__).resolve().parent.parent / "assets" / "digits-model"


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def cache_dir() -> Path:
    folder = Path(os.environ.get("CAD_RAY_CACHE", Path.home() / ".cache" / "cad-ray"))
    if folder.exists() and not folder.is_dir():
        raise CadRayError(f"CAD_RAY_CACHE={folder} is a file; point it at a folder (or unset it for ~/.cache/cad-ray)")
    return folder


def _cache_error(folder: Path, error: OSError) -> CadRayError:
    named = "CAD_RAY_CACHE=" if "CAD_RAY_CACHE" in os.environ else "the model cache "
    return CadRayError(f"{named}{folder} cannot be written ({error.strerror or error}); point "
                       f"{'it' if named.startswith('CAD') else 'CAD_RAY_CACHE'} at a writable folder")


def made_cache_dir() -> Path:
    """`cache_dir()`, made where it is not (before any request: a cache that cannot be made is one line, not a
    traceback after the listing). Whether it can be written is found where a model is to be copied into it: a
    read-only cache that already holds the model serves it."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cache_error(folder, e) from None
    return folder


def fetch_s3_folder(uri: str) -> Path:
    """Copy an `s3://` model folder to the local cache (once per content version) and return its path."""
    key = uri.rstrip("/")
    if any(part in ("..", ".") for part in key.removeprefix("s3://").split("/")):
        raise CadRayError(f"{uri}: an s3:// model key with '.' or '..' parts names no folder of a bucket; "
                          "write the key in full")
    cache = made_cache_dir()  # before any request
    fs = connected_s3_filesystem(uri)
    try:
        listing = fs.find(key, detail=True)
    except Exception as e:  # botocore/aiobotocore raise many types; all mean "cannot read this URI"
        raise CadRayError(f"cannot read {uri}: {type(e).__name__}: {e}") from None
    if not listing:
        raise CadRayError(f"cannot read {uri}: no such model folder (nothing under that prefix)")
    version = hashlib.sha256(json.dumps(
        sorted((k, str(v.get("ETag", v.get("size")))) for k, v in listing.items())).encode()).hexdigest()[:16]
    local = cache / "s3" / key.removeprefix("s3://").replace("/", "_") / version
    if not (local / ".complete").exists():
        try:
            local.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _cache_error(cache, e) from None
        try:
            fs.get(key.removeprefix("s3://").rstrip("/") + "/", str(local) + "/", recursive=True)
            (local / ".complete").write_text(uri)
        except Exception as e:  # a full disk, a lost connection: the folder stays incomplete, fetched again next time
            raise CadRayError(f"cannot copy {uri} into {local}: {described(e)}") from None
    return local


def resolve_model_folder(path_or_uri: str | os.PathLike | None) -> tuple[Path, str]:
    """(local folder, source string) for a model argument; `None` is the built-in digits model."""
    if path_or_uri is None or str(path_or_uri) in ("", "digits", "builtin:digits"):
        return BUILTIN_DIGITS, "builtin:digits"
    source = str(path_or_uri)
    folder = fetch_s3_folder(source) if is_s3(source) else Path(source).expanduser()
    if folder.is_file():
        if folder.suffix in PICKLE_SUFFIXES:
            check_pickle(folder)
        raise CadRayError(f"{source} is a single file; cad-ray loads diffusers model folders "
                          "(model_index.json plus unet/, text_encoder/, ...)")
    if not folder.is_dir():
        raise CadRayError(f"model folder {source} does not exist")
    if not (folder / "model_index.json").is_file():
        raise CadRayError(f"{source} is not a diffusers model folder: it has no model_index.json")
    return folder, source


def read_model_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise CadRayError(f"malformed {folder / 'model_index.json'}: {e}") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise CadRayError(f"malformed {folder / 'model_index.json'}: no _class_name")
    return index


def load_model(path_or_uri: str | os.PathLike | None = None, device: str | None = None, dtype=None):
    """Load a text-to-image model: the built-in digits model (default), or an SD pipeline folder / `s3://` URI."""
    quiet_libraries()
    folder, source = resolve_model_folder(path_or_uri)
    index = read_model_index(folder)
    if index["_class_name"] == PIPELINE_CLASS:
        model = DigitsModel.from_pretrained(folder, index, source=source)
    elif all(k in index for k in ("unet", "text_encoder", "tokenizer", "vae", "scheduler")):
        model = StableDiffusionModel.from_pretrained(folder, index, source=source)
    else:
        raise CadRayError(f"{source}: unsupported pipeline {index['_class_name']!r}; expected a Stable Diffusion "
                          "folder (unet, text_encoder, tokenizer, vae, scheduler) or the digits model")
    if dtype is not None:
        for module in model.weight_modules().values():
            module.to(dtype=dtype)
    if device is not None:
        model.to(device)
    return model
