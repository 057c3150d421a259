"""The model a stage worker computes on (no Ray): loaded by each worker, or, on a worker kept across commands
(`--keep-workers`), loaded once and shared by every stage worker it builds."""

from __future__ import annotations

from cad_ray.config import AttributionConfig
from cad_ray.models import load_model
from cad_ray.models.loading import resolve_model_folder


class KeptModels:
    """A kept worker's loaded model (`keep_models`): the latest one per device, by the files it was loaded from."""

    def __init__(self):
        self.models, self.loads = {}, 0

    def get(self, model, device: str):
        key = (model_files(model), device)
        if key not in self.models:
            self.models = {k: m for k, m in self.models.items() if k[1] != device}  # one model a device
            self.models[key] = load_model(model, device=device)
            self.loads += 1
        return self.models[key]


_KEPT_MODELS: KeptModels | None = None  # None: each stage worker loads its own model


def keep_models() -> KeptModels:
    """From now on `model_for` loads a model once in this process and hands every stage worker the same one (they
    leave it as they found it: edits are undone on exit), until other files are asked for."""
    global _KEPT_MODELS
    if _KEPT_MODELS is None:
        _KEPT_MODELS = KeptModels()
    return _KEPT_MODELS


def model_files(model) -> tuple:
    """What a loaded model is the model of: its folder and each file's size and modification time (a folder
    rewritten in place, or the same folder by another path, is told apart)."""
    folder, _ = resolve_model_folder(model)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return (str(folder.resolve()), tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                                         for p in files))


def model_for(config: AttributionConfig, device: str | None = None):
    """The config's model on `device`, else on the config's device, else on a GPU where there is one."""
    import torch

    device = device or config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(config.model, device=device) if _KEPT_MODELS is None else _KEPT_MODELS.get(config.model, device)
