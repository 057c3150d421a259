"""Concepts from a config: explicit prompts for any model, or names of the digits world (a digit word such
as "seven", or a colour such as "red") for the built-in model."""

from __future__ import annotations

import numpy as np
import torch

from .config import ConceptSpec
from .digits import (COLOUR_NAMES, DIGIT_WORDS, TEMPLATES_WITHOUT_COLOUR, all_prompts, canonical_prompt, prompt_for,
                     real_digits, render)
from .errors import CadRayError
from .objectives import Concept


def digits_concept(name: str) -> tuple[list[str], list[str], np.ndarray]:
    """(prompts, base prompts, real images (N, 8, 8, 3)) of a digits-world concept.

    A digit's prompts are the grammar's colour-free prompts for it, against the empty base prompt; its
    images are its real digits in every colour. A colour's prompts are "a <colour> <digit>" for every digit,
    each against the same prompt without the colour, so that J measures the colour alone; its images are
    all real digits in that colour.
    """
    images, labels = real_digits()
    if name in DIGIT_WORDS:
        d = DIGIT_WORDS.index(name)
        own = images[labels == d]
        coloured = np.concatenate([render(own, c) for c in COLOUR_NAMES])
        return all_prompts(d, None), [""], coloured
    if name in COLOUR_NAMES:
        prompts = [canonical_prompt(d, name) for d in range(10)]
        bases = [prompt_for(d, None, TEMPLATES_WITHOUT_COLOUR[1]) for d in range(10)]
        return prompts, bases, render(images, name)
    raise CadRayError(f"concept {name!r} has no prompts; the digits model knows the concepts "
                      f"{', '.join(DIGIT_WORDS + COLOUR_NAMES)}; give 'prompts:' for any other")


def build_concept(spec: ConceptSpec, model) -> Concept:
    """The Concept for a config entry; prompts are checked against the model's tokenizer here, before any work."""
    images = None
    if spec.prompts is not None:
        prompts = list(spec.prompts)
        bases = [spec.base_prompt] if isinstance(spec.base_prompt, str) else list(spec.base_prompt or [])
    elif model.kind == "digits":
        prompts, bases, real = digits_concept(spec.name)
        images = model.to_latents(real)
    else:
        raise CadRayError(f"concept {spec.name!r} needs 'prompts:' in the config")
    concept = Concept(spec.name, tuple(prompts), tuple(bases), images)
    with torch.no_grad():
        model.encode(list(concept.prompts) + list(concept.base_prompts))
    return concept
