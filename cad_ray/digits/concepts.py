"""The digits world's concepts: a digit word ("seven") or a colour ("red"), with prompts, base prompts and
real images."""

from __future__ import annotations

import numpy as np

from cad_ray.digits.world import (COLOUR_NAMES, DIGIT_WORDS, TEMPLATES_WITHOUT_COLOUR, all_prompts, canonical_prompt,
                                  prompt_for, real_digits, render)
from cad_ray.errors import CadRayError


def digits_concept(name: str) -> tuple[list[str], list[str], np.ndarray]:
    """(prompts, base prompts, real images (N, 8, 8, 3)) of a digits-world concept.

    A digit's prompts are the grammar's colour-free prompts for it, against the default base prompt (none given:
    `Concept`'s default, the sampler's empty negative prompt); its images are its real digits in every colour. A
    colour's prompts are "a <colour> <digit>" for every digit, each against the same prompt without the colour,
    so that J measures the colour alone; its images are all real digits in that colour.
    """
    images, labels = real_digits()
    if name in DIGIT_WORDS:
        d = DIGIT_WORDS.index(name)
        own = images[labels == d]
        coloured = np.concatenate([render(own, c) for c in COLOUR_NAMES])
        return all_prompts(d, None), [], coloured
    if name in COLOUR_NAMES:
        prompts = [canonical_prompt(d, name) for d in range(10)]
        bases = [prompt_for(d, None, TEMPLATES_WITHOUT_COLOUR[1]) for d in range(10)]
        return prompts, bases, render(images, name)
    raise CadRayError(f"concept {name!r} has no prompts; the digits model knows the concepts "
                      f"{', '.join(DIGIT_WORDS + COLOUR_NAMES)}; give 'prompts:' for any other")


def concept_kind(name: str) -> str | None:
    """`digit` or `colour` for a digits-world concept, else None."""
    return "digit" if name in DIGIT_WORDS else "colour" if name in COLOUR_NAMES else None
