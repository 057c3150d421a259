"""Model adapters: one interface (`TextToImageModel`) over the digits model and Stable Diffusion folders."""

from cad_ray.models.base import NEGATIVE_PROMPT, TextToImageModel, Trajectory
from cad_ray.models.loading import BUILTIN_DIGITS, load_model

__all__ = ["BUILTIN_DIGITS", "TextToImageModel", "Trajectory", "load_model"]
