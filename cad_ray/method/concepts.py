"""Concepts from a config: explicit prompts for any model, or names of the digits world (a digit word such
as "seven", or a colour such as "red", see `cad_ray.digits.concepts`) for the built-in model."""

from __future__ import annotations

import torch

from cad_ray.digits.concepts import digits_concept
from cad_ray.errors import CadRayError
from cad_ray.method.objectives import Concept
from cad_ray.models.base import NEGATIVE_PROMPT


def build_concept(spec, model) -> Concept:
    """The Concept for a config entry (a `cad_ray.config.ConceptSpec`: name, prompts, base_prompt); prompts are
    checked against the model's tokenizer here, before any work."""
    images = None
    if spec.prompts is not None:
        prompts = list(spec.prompts)
        bases = [spec.base_prompt] if isinstance(spec.base_prompt, str) else list(spec.base_prompt or [])
    elif model.kind == "digits":
        prompts, bases, real = digits_concept(spec.name)
        images = model.to_latents(real)
    else:
        raise CadRayError(f"concept {spec.name!r} needs 'prompts:' in the config")
    if set(prompts) <= set(bases or [NEGATIVE_PROMPT]):
        raise CadRayError(f"concept {spec.name!r}: its prompts equal its base prompt, so every score would be zero; "
                          "give a base_prompt that lacks the concept (default: the empty prompt)")
    concept = Concept(spec.name, tuple(prompts), tuple(bases), images)
    with torch.no_grad():
        model.encode(list(concept.prompts) + list(concept.base_prompts))
    return concept
