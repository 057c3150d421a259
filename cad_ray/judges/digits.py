"""The digits world's judges as an evaluation judge (the default for the built-in digits model)."""

from __future__ import annotations

import numpy as np
import torch

from cad_ray.digits import COLOUR_NAMES, DIGIT_WORDS
from cad_ray.digits.judges import builtin_judges, intensity
from cad_ray.errors import CadRayError
from cad_ray.labels import label_key


class DigitsJudge:
    """The digits world's judges: the digit (the verdict), the colour, and digit-judge features for the Frechet
    distance to real digits."""

    def __init__(self):
        self.judges = builtin_judges()

    def judge(self, images: np.ndarray, labels: list[str]) -> dict:
        predicted = self.judges.digit_words(images)  # "none" for an image that is no digit at all (noise)
        # label_key: a prompt set's "Seven" is the digit seven
        return {"predicted": predicted, "correct": [p == label_key(l) for p, l in zip(predicted, labels)],
                "predicted_colour": [COLOUR_NAMES[c] for c in self.judges.colours(images)],
                "features": list(self.judges.features(images).astype(np.float32))}

    def log_probability(self, images, label: str):
        """log p(label | image) per image, with gradients ((N, H, W, 3) tensor in [0, 1]): the digit judge for a
        digit, the colour judge for a colour (the guidance probe steers sampling with it)."""
        key = label_key(label)
        if key in DIGIT_WORDS:
            logits, index = self.judges.digit_net(intensity(images)), DIGIT_WORDS.index(key)
        elif key in COLOUR_NAMES:
            logits, index = self.judges.colour_net(images), COLOUR_NAMES.index(key)
        else:
            raise CadRayError(f"the digits judges know no digit or colour {label!r}")
        return torch.log_softmax(logits, dim=-1)[:, index]
