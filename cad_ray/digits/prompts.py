"""The digits model's evaluation prompts: every digit's own (colour-free) wordings and coloured wordings it never
saw, in a test split and a smaller selection split (`digits_prompt_set`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cad_ray.digits.world import (COLOUR_NAMES, DIGIT_WORDS, TEMPLATES_WITH_COLOUR, TEMPLATES_WITHOUT_COLOUR,
                                  canonical_prompt, prompt_for)

SELECTION_SEED_OFFSET = 100_000  # selection-split seeds never meet test-split seeds


def digits_prompt_set(images_per_prompt: int, seed: int, panel: str = "wordings", split: str = "test") -> pd.DataFrame:
    """The digits model's prompts: (prompt, seed, label, colour, template, split).

    `wordings`: for every digit, the colour-free wordings a digit concept is attributed on (its own: 4 templates,
    word and numeral; `template` free-<i><w|n>) and coloured wordings it never saw (unseen: the 5 coloured
    templates in two colours each, rotating so that every colour appears with every digit; colour-<i><w|n>;
    colour-0w, "a red seven", is a colour concept's own wording). The selection split has half as many (4 own, 4
    unseen per digit). Every image has a seed of its own (the selection split's never meet the test split's).
    `canonical`: one colour-free prompt per digit (the earlier panel).
    """
    base = seed + (SELECTION_SEED_OFFSET if split == "selection" else 0)
    rows = []
    for d in range(10):
        if panel == "canonical":
            wordings = [(canonical_prompt(d), "", "free-0w")]
        else:
            own = [(i, n) for i in range(len(TEMPLATES_WITHOUT_COLOUR)) for n in (False, True)]
            coloured = [(i, (d + i + shift) % len(COLOUR_NAMES)) for i in range(len(TEMPLATES_WITH_COLOUR))
                        for shift in (0, 2)]
            if split == "selection":
                own = [(i, i % 2 == 1) for i in range(len(TEMPLATES_WITHOUT_COLOUR))]
                coloured = [(i, (d + i) % len(COLOUR_NAMES)) for i in range(4)]
            wordings = [(prompt_for(d, None, TEMPLATES_WITHOUT_COLOUR[i], n), "", f"free-{i}{'n' if n else 'w'}")
                        for i, n in own]
            wordings += [(prompt_for(d, COLOUR_NAMES[c], TEMPLATES_WITH_COLOUR[i], i % 2 == 1), COLOUR_NAMES[c],
                          f"colour-{i}{'n' if i % 2 else 'w'}") for i, c in coloured]
        rows += [{"prompt": prompt, "label": DIGIT_WORDS[d], "colour": colour, "template": template, "split": split}
                 for prompt, colour, template in wordings for _ in range(images_per_prompt)]
    table = pd.DataFrame(rows)
    # every image its own seed: within one seed the wordings of a digit give nearly the same image, so shared
    # seeds would make a panel's many images few independent draws
    table.insert(1, "seed", base + np.arange(len(table), dtype=np.int64))
    return table
