"""The digits world: real handwritten digits (scikit-learn's `load_digits`) in colour, and their prompts.

Digits play the role of objects and colours the role of styles. Images are 8x8 RGB in [0, 1]: the digit's
ink intensity times the colour, on black.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cad_ray.errors import CadRayError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {
    "white": (1.0, 1.0, 1.0),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
}
COLOUR_NAMES = tuple(COLOURS)

# `{d}` is the digit (word or numeral), `{c}` a colour. Templates without `{c}` leave the colour free.
TEMPLATES_WITH_COLOUR = ("a {c} {d}", "{c} {d}", "the digit {d} in {c}", "a {d} in {c}", "the {c} number {d}")
TEMPLATES_WITHOUT_COLOUR = ("{d}", "a {d}", "the digit {d}", "the number {d}")

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
VOCABULARY = SPECIAL_TOKENS + DIGIT_WORDS + tuple(str(i) for i in range(10)) + COLOUR_NAMES + (
    "a", "the", "digit", "number", "in")

IMAGE_SIZE = 8


@lru_cache(maxsize=1)
def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 real 8x8 digits as intensities in [0, 1] (shape (N, 8, 8)) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def render(intensity: np.ndarray, colour: str | np.ndarray) -> np.ndarray:
    """Colour one or more intensity images: (..., 8, 8) -> (..., 8, 8, 3), values in [0, 1]."""
    rgb = np.asarray(COLOURS[colour] if isinstance(colour, str) else colour, dtype=np.float32)
    return intensity[..., None] * rgb


def split_indices(n: int, held_out: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train / held-out split of the real digits (stratification is unnecessary at 1,797 rows)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - held_out)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def prompt_for(digit: int, colour: str | None, template: str, numeral: bool = False) -> str:
    d = str(digit) if numeral else DIGIT_WORDS[digit]
    return template.format(d=d, c=colour or "")


def all_prompts(digit: int, colour: str | None) -> list[str]:
    """Every prompt of the grammar for a digit and optional colour."""
    templates = TEMPLATES_WITH_COLOUR if colour else TEMPLATES_WITHOUT_COLOUR
    return [prompt_for(digit, colour, t, numeral) for t in templates for numeral in (False, True)]


def canonical_prompt(digit: int, colour: str | None = None) -> str:
    """The prompt the docs and tests use for a (digit, colour) concept: "a red seven" or "seven"."""
    return f"a {colour} {DIGIT_WORDS[digit]}" if colour else DIGIT_WORDS[digit]


class ParsedPrompt(NamedTuple):
    digit: int | None
    colour: str | None


def parse_prompt(prompt: str) -> ParsedPrompt:
    """What a prompt asks for: its digit and colour (either may be absent)."""
    digit = colour = None
    for word in DigitsTokenizer.words(prompt):
        if word in DIGIT_WORDS:
            digit = DIGIT_WORDS.index(word)
        elif word.isdigit():
            digit = int(word)
        elif word in COLOURS:
            colour = word
    return ParsedPrompt(digit, colour)


class DigitsTokenizer:
    """A word-level tokenizer over the digits grammar, padded to a fixed length like CLIP's.

    Every prompt becomes `<bos> words... <eos> <pad>...`; the empty prompt is `<bos> <eos>`, the
    unconditional prompt for classifier-free guidance.
    """

    def __init__(self, vocabulary: tuple[str, ...] = VOCABULARY, max_length: int = 10):
        self.vocabulary = tuple(vocabulary)
        self.max_length = max_length
        self.ids = {w: i for i, w in enumerate(self.vocabulary)}

    @staticmethod
    def words(prompt: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", prompt.lower())

    def __call__(self, prompts: list[str]) -> np.ndarray:
        out = np.full((len(prompts), self.max_length), self.ids["<pad>"], dtype=np.int64)
        known = [w for w in self.vocabulary if w not in SPECIAL_TOKENS]
        for row, prompt in enumerate(prompts):
            words = self.words(prompt)
            dropped = sorted(set(re.sub(r"[a-z0-9\s]", "", prompt.lower())))
            if dropped:  # the words are what the model sees: anything else would vanish without a word
                raise CadRayError(f"prompt {prompt!r} has character(s) the digits model cannot read: "
                                  f"{' '.join(map(repr, dropped))}; use letters, digits and spaces")
            unknown = [w for w in words if w not in self.ids or w in SPECIAL_TOKENS]
            if unknown:
                raise CadRayError(
                    f"the digits model does not know the word(s) {', '.join(map(repr, unknown))} in prompt "
                    f"{prompt!r}; its vocabulary is: {' '.join(known)}")
            if len(words) + 2 > self.max_length:
                raise CadRayError(f"prompt {prompt!r} is longer than {self.max_length - 2} words")
            tokens = ["<bos>", *words, "<eos>"]
            out[row, : len(tokens)] = [self.ids[t] for t in tokens]
        return out

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "DigitsTokenizer", "max_length": self.max_length}, indent=2))
        (folder / "vocab.json").write_text(json.dumps(list(self.vocabulary), indent=1))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "DigitsTokenizer":
        folder = Path(folder)
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
            vocabulary = tuple(json.loads((folder / "vocab.json").read_text()))
        except (OSError, ValueError) as e:
            raise CadRayError(f"cannot read the digits tokenizer in {folder}: {e}") from None
        length = config.get("max_length") if isinstance(config, dict) else None
        missing = [t for t in SPECIAL_TOKENS if t not in vocabulary]
        if not isinstance(length, int) or isinstance(length, bool) or length < 3 or missing \
                or not all(isinstance(w, str) for w in vocabulary):
            raise CadRayError(f"malformed digits tokenizer in {folder}: tokenizer_config.json needs max_length, a "
                              "whole number of at least 3 (<bos>, one word, <eos>), and vocab.json a list of words "
                              f"with {', '.join(SPECIAL_TOKENS)}")
        return cls(vocabulary, length)


def training_batch(rng: np.random.Generator, batch_size: int, indices: np.ndarray,
                   p_uncond: float = 0.1, p_no_colour: float = 0.2,
                   colours: tuple[str, ...] = COLOUR_NAMES) -> tuple[np.ndarray, list[str]]:
    """Random (image, prompt) pairs for training: RGB images in [0, 1] and prompts of the grammar.

    With probability `p_uncond` the prompt is empty (prompt dropout, so that classifier-free guidance
    works); with probability `p_no_colour` it names the digit only and the image has any of `colours`
    (a never-learned reference leaves a colour out of them: no image is drawn in it).
    """
    images, labels = real_digits()
    pick = rng.choice(indices, size=batch_size)
    if colours == COLOUR_NAMES:  # the shipped model's draw, kept so that its seed reproduces it
        drawn = rng.integers(0, len(COLOUR_NAMES), size=batch_size)
    else:
        drawn = np.array([COLOUR_NAMES.index(c) for c in colours])[rng.integers(0, len(colours), size=batch_size)]
    out = np.empty((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    prompts = []
    for k, (i, c) in enumerate(zip(pick, drawn)):
        colour = COLOUR_NAMES[c]
        out[k] = render(images[i], colour)
        u = rng.random()
        if u < p_uncond:
            prompts.append("")
        elif u < p_uncond + p_no_colour:
            t = TEMPLATES_WITHOUT_COLOUR[rng.integers(len(TEMPLATES_WITHOUT_COLOUR))]
            prompts.append(prompt_for(int(labels[i]), None, t, bool(rng.integers(2))))
        else:
            t = TEMPLATES_WITH_COLOUR[rng.integers(len(TEMPLATES_WITH_COLOUR))]
            prompts.append(prompt_for(int(labels[i]), colour, t, bool(rng.integers(2))))
    return out, prompts
