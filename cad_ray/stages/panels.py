"""The evaluation's prompt panels: a benchmark prompt CSV or the digits panel (`cad_ray.digits.prompts`), split
into a test split (what the summary reports) and, with a search, a selection split (what picks the settings);
and the rules that read a row: which rows ask for a target, which are worded as its concept was attributed.

One row per image: (prompt, seed, label, colour, template, split). `label` is what the prompt asks for (a digit,
a class); `colour` the colour it asks for ("" for none); `template` its wording (`free-...`: colour-free)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from cad_ray.config import EvaluationOptions
from cad_ray.digits import DIGIT_WORDS
from cad_ray.digits.concepts import concept_kind
from cad_ray.digits.prompts import SELECTION_SEED_OFFSET, digits_prompt_set  # noqa: F401 (re-exported)
from cad_ray.errors import CadRayError
from cad_ray.labels import label_key  # noqa: F401 (re-exported: its old home)
from cad_ray.store import ScoreStore

LABEL_COLUMNS = ("class", "artist", "categories", "label")


PROMPT_SET_LIMIT = 256 << 20  # 256 MiB: COCO-30k's prompts are 3 MB


def read_prompt_set(path: str) -> pd.DataFrame:
    """A benchmark prompt CSV read as it is: `prompt`, `evaluation_seed` and a label column (`class`, `artist`
    or `categories`, else empty) become (prompt, seed, label); other columns are kept."""
    if "://" not in str(path) and os.path.exists(path) and not os.path.isdir(path):
        # a device or a pipe (/dev/zero) would be read until memory runs out; a data dump is no prompt set
        if not os.path.isfile(path):
            raise CadRayError(f"prompt set {path} is not a file")
        if os.path.getsize(path) > PROMPT_SET_LIMIT:
            raise CadRayError(f"prompt set {path} is larger than {PROMPT_SET_LIMIT >> 20} MiB; it is no prompt "
                              "CSV (prompt, evaluation_seed, label)")
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise CadRayError(f"cannot read prompt set {path}: {e}") from None
    missing = [c for c in ("prompt", "evaluation_seed") if c not in table.columns]
    if missing:
        raise CadRayError(f"prompt set {path} lacks column(s) {', '.join(missing)}; it has "
                          f"{', '.join(map(str, table.columns))}")
    if table.empty:
        raise CadRayError(f"prompt set {path} has a header but no prompts")
    table = table.drop(columns=[c for c in table.columns if str(c).startswith("Unnamed")])
    if "seed" in table.columns:
        raise CadRayError(f"prompt set {path} has a column 'seed' beside evaluation_seed; rename or remove it")
    seeds = pd.to_numeric(table["evaluation_seed"], errors="coerce")
    bad = seeds.isna() | (seeds != np.floor(seeds)) | (seeds.abs() >= 2 ** 63)
    if bad.any():
        value = table["evaluation_seed"].iloc[int(np.flatnonzero(bad)[0])]
        raise CadRayError(f"prompt set {path}, line {int(np.flatnonzero(bad)[0]) + 2}: evaluation_seed "
                          f"{'(empty)' if pd.isna(value) else repr(str(value))} is not a whole number (64-bit)")
    empty = table["prompt"].isna() | (table["prompt"].astype(str).str.strip() == "")
    if empty.any():
        raise CadRayError(f"prompt set {path}, line {int(np.flatnonzero(empty)[0]) + 2}: the prompt is empty")
    label = next((c for c in LABEL_COLUMNS if c in table.columns), None)
    out = table.rename(columns={"evaluation_seed": "seed"})
    out["label"] = table[label].astype(str) if label else ""
    out["seed"] = seeds.astype(np.int64) if seeds.dtype != np.int64 else out["seed"].astype(np.int64)
    return out


def prompt_panels(options: EvaluationOptions) -> pd.DataFrame:
    """The prompts of both splits: the test split (what the summary reports) and, with a search, the selection
    split (what picks the settings). A CSV prompt set is split by row: even rows select, odd rows test."""
    if options.prompts:
        table = read_prompt_set(options.prompts)
        table["colour"], table["template"] = "", "free-0w"
        table["split"] = np.where(np.arange(len(table)) % 2 == 0, "selection", "test") if options.search \
            else "test"
        return table
    panels = [digits_prompt_set(options.images_per_prompt, options.seed, options.prompt_panel, "test")]
    if options.search:
        panels.append(digits_prompt_set(options.search.images_per_prompt, options.seed, options.prompt_panel,
                                        "selection"))
    return pd.concat(panels, ignore_index=True)


def target_kind(target: str) -> str:
    """What a target's verdict reads: the colour judge for a digits-world colour, else the label (digit, class)."""
    return "colour" if concept_kind(target) == "colour" else "label"


def target_rows(prompts: pd.DataFrame, target: str) -> pd.Series:
    """The rows that ask for the target (a colour: asked in that colour; else: its label)."""
    return prompts["colour"] == target if target_kind(target) == "colour" else names_label(prompts["label"], target)


def check_prompt_labels(prompts: pd.DataFrame, options: EvaluationOptions, store: ScoreStore) -> None:
    """A prompt CSV has rows of other labels than the targets' (what an edit must keep), and one judged by the
    built-in digits judges labels its rows with digits (case and spaces aside, `label_key`): any other label would
    be judged wrong on every image, with no word."""
    if not options.prompts:
        return
    if np.logical_or.reduce([target_rows(prompts, t).to_numpy() for t in options.targets]).all():
        raise CadRayError(f"prompt set {options.prompts}: every row asks for a target ({', '.join(options.targets)});"
                          " an edit is judged on what must stay as well: add rows of other labels")
    if options.judge or store.config.model is not None:
        return
    known = {label_key(w) for w in DIGIT_WORDS}
    bad = sorted({str(l) for l in prompts["label"] if l != "" and label_key(l) not in known})
    if bad:
        raise CadRayError(f"prompt set {options.prompts}: label {bad[0]!r} is no digit; the digits judges judge "
                          f"{', '.join(DIGIT_WORDS)}")


def names_label(labels: pd.Series, concept: str) -> pd.Series:
    """Which labels a concept name stands for (`label_key`)."""
    return labels.map(label_key) == label_key(concept)


def own_wording(prompts: pd.DataFrame, target: str) -> pd.Series:
    """Rows worded as the target's concept was attributed (digit: colour-free; colour: "a <colour> <digit>")."""
    if target_kind(target) == "colour":
        return prompts["template"] == "colour-0w"
    return prompts["template"].str.startswith("free")


def edit_rows(edit: str, target: str, selection: str, ratio: float, guidance, prompts: pd.DataFrame,
              draw: int = 0) -> pd.DataFrame:
    """`prompts` as the rows of one edit setting: (edit, target, selection, ratio, draw, guidance) beside each."""
    rows = prompts.assign(edit=edit, target=target, selection=selection, ratio=float(ratio), draw=int(draw))
    rows["guidance"] = np.nan if guidance is None else float(guidance)
    return rows
