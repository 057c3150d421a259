"""A model folder's components, each loaded on its own as diffusers lays them out (`<folder>/<name>/`), with the
safety checks every load makes: safetensors, or a pickle that loads weights-only; one-line errors."""

from __future__ import annotations

from pathlib import Path

from cad_ray.errors import CadRayError
from cad_ray.models.base import check_scheduler

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_pickle(path: Path) -> None:
    """Refuse a pickle checkpoint unless it loads with `torch.load(weights_only=True)`."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CadRayError(f"refusing pickle checkpoint {path}: it does not load with torch.load(weights_only=True) "
                          f"({reason[:200]}); convert it to safetensors") from None


def component_uses_safetensors(folder: Path) -> bool:
    """True if the component folder has safetensors weights; otherwise every pickle in it must be weights-only."""
    if not folder.is_dir():
        raise CadRayError(f"model component folder {folder} is missing")
    if any(folder.glob("*.safetensors")):
        return True
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not pickles:
        raise CadRayError(f"no weights in {folder}: expected a .safetensors file")
    for p in pickles:
        check_pickle(p)
    return False


def load_component(cls, folder: Path, name: str, **kwargs):
    """`cls.from_pretrained(folder/name)` with the safety checks above and one-line errors."""
    sub = folder / name
    use_safetensors = component_uses_safetensors(sub)
    try:
        return cls.from_pretrained(sub, use_safetensors=use_safetensors, **kwargs)
    except CadRayError:
        raise
    except Exception as e:
        message = " ".join(str(e).split())[:300] or type(e).__name__
        raise CadRayError(f"cannot load {name} from {sub}: {type(e).__name__}: {message}") from None


def load_scheduler(folder: Path, index: dict):
    import diffusers

    entry = index.get("scheduler")
    class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else "DDIMScheduler"
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise CadRayError(f"unknown scheduler class {class_name!r} in {folder / 'model_index.json'}")
    try:
        scheduler = cls.from_pretrained(folder / "scheduler")
    except Exception as e:
        raise CadRayError(f"cannot load the scheduler from {folder / 'scheduler'}: {e}") from None
    try:
        check_scheduler(scheduler)  # an unsupported sampler or prediction type fails here, not mid-run
    except CadRayError as e:
        raise CadRayError(f"{folder / 'scheduler'}: {e}") from None
    return scheduler


def quiet_libraries() -> None:
    """diffusers and transformers warn and draw progress bars on every load; cad-ray reports for itself."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
