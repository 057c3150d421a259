"""Which components an edit of a model's scoped components takes (core, no Ray): selection from a score table,
the `Selection` text and its presets, contrasts against other concepts, and the random baseline's masks.

- `cad-erase`: zero the top positive scores of the erase objective; `cad-amplify`: zero the most negative
  scores of the amplify objective. Selected by ratio (of the components in each unit) or count, with the unit
  `global`, `tensor` or `row` (the published code ranks within each output row); or whole output rows at once,
  `neuron` (for a token-embedding table, one row is one word).
- `random`: the same number of components in each unit, chosen at random: the baseline of every zeroing edit.
- `finetune`, `cad-finetune`: gradient steps (`cad_ray.method.applying.finetune`, the latter on the components
  CAD-Erase selects).

Applying an edit (zeroing, replaced weights, fine-tuning) is `cad_ray.method.applying`'s, re-exported here. A
selection is only made from a score table whose model fingerprint is the model's own (`check_fingerprint`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from cad_ray.errors import CadRayError
# applying an edit (zeroing, replaced weights, fine-tuning) is cad_ray.method.applying's; re-exported here, where
# its callers have always imported it from
from cad_ray.method.applying import (check_fingerprint, edited, finetune, set_weights,  # noqa: F401
                                     weights_replaced, zero_components)
from cad_ray.method.baselines import check_method, conceptprune_masks
from cad_ray.method.objectives import OBJECTIVES
from cad_ray.method.ranking import first_k
from cad_ray.method.scopes import scope_matcher
from cad_ray.seeds import numpy_rng

GRANULARITIES = ("global", "tensor", "row", "neuron")
ROUNDINGS = ("round", "floor")
AGGREGATES = ("mean", "max")
CONTRASTS = ("none", "others", "kind")


def check_ratio(ratio: float) -> float:
    if not 0 < ratio <= 1:
        raise CadRayError(f"edit ratio must be in (0, 1], got {ratio}")
    return float(ratio)


def _units(score: np.ndarray, granularity: str) -> np.ndarray:
    """The tensor's scores as (units, components per unit) for ranking within units."""
    if granularity == "row":
        return score.reshape(score.shape[0], -1) if score.ndim > 1 else score.reshape(1, -1)
    return score.reshape(1, -1)


def select(scores: dict[str, np.ndarray], ratio: float | None = None, count: int | None = None,
           granularity: str = "row", largest: bool = True, rounding: str = "round") -> dict[str, np.ndarray]:
    """Boolean masks (per tensor, tensor-shaped) of the components to zero.

    `largest=True` takes the largest positive scores (CAD-Erase), `False` the most negative (CAD-Amplify);
    only components of that sign are eligible. `ratio` is the share of each unit's components (a unit is the
    whole scope, a tensor, or an output row); `count` is a number of components per unit. `rounding` turns a
    ratio into a count: `round` (ours: max(1, round(ratio * n)), every unit loses at least one) or `floor` (the
    published `ablate_model`: int(ratio * n), so a unit with ratio * n < 1 loses nothing).
    """
    if granularity not in GRANULARITIES:
        raise CadRayError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    if rounding not in ROUNDINGS:
        raise CadRayError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    if (ratio is None) == (count is None):
        raise CadRayError("give an edit ratio or a count, not both")
    if ratio is not None:
        check_ratio(ratio)
    elif count < 1:
        raise CadRayError(f"edit count must be at least 1, got {count}")

    def how_many(n: int) -> int:
        if count is not None:
            return min(count, n)
        return min(int(ratio * n) if rounding == "floor" else max(1, int(round(ratio * n))), n)

    if granularity == "global":
        # one copy of the scores in their own dtype (float32 stays float32: negation and order are exact in it);
        # the how_many first of a stable ascending sort of -score (largest) or score, found by partition
        flat = np.concatenate([s.reshape(-1) for s in scores.values()])
        if not np.issubdtype(flat.dtype, np.floating):
            flat = flat.astype(np.float64)
        if largest:
            np.negative(flat, out=flat)
        pick = first_k(flat, how_many(flat.size))
        chosen = np.zeros(flat.size, dtype=bool)
        chosen[pick[flat[pick] < 0]] = True
        masks, offset = {}, 0
        for name, s in scores.items():
            masks[name] = chosen[offset:offset + s.size].reshape(s.shape)
            offset += s.size
        return masks
    key = {name: (s if largest else -s).astype(np.float64) for name, s in scores.items()}
    if granularity == "neuron":
        return _select_neurons(key, how_many)
    masks = {}
    for name, s in key.items():
        units = _units(s, granularity)
        k = how_many(units.shape[1])
        order = np.argsort(-units, axis=1, kind="stable")[:, :k]
        chosen = np.zeros(units.shape, dtype=bool)
        np.put_along_axis(chosen, order, True, axis=1)
        masks[name] = (chosen & (units > 0)).reshape(s.shape)
    return masks


def _rows(key: np.ndarray) -> np.ndarray:
    """A tensor as (output rows, components per row); a 1-D tensor's entries are rows of one."""
    return key.reshape(key.shape[0], -1) if key.ndim > 1 else key.reshape(-1, 1)


def _select_neurons(key: dict[str, np.ndarray], how_many) -> dict[str, np.ndarray]:
    """Whole output rows, ranked across the tensors by the sum of their scores (only rows whose sum has the
    edit's sign): the unit is a neuron, as in structured pruning, so a row is zeroed entirely or not at all.
    `how_many` counts rows."""
    sums = np.concatenate([_rows(k).sum(axis=1) for k in key.values()])
    order = np.argsort(-sums, kind="stable")[:how_many(sums.size)]
    chosen = np.zeros(sums.size, dtype=bool)
    chosen[order[sums[order] > 0]] = True
    return _row_masks(chosen, key)


def _row_masks(chosen: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tensor-shaped masks from one flag per row of `like`'s tensors, in order (`_rows`)."""
    masks, offset = {}, 0
    for name, k in like.items():
        rows = _rows(k)
        masks[name] = np.repeat(chosen[offset:offset + rows.shape[0], None], rows.shape[1], axis=1).reshape(k.shape)
        offset += rows.shape[0]
    return masks


def normalised(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores divided by their mean absolute value over the scope, so that concepts whose objective is larger
    do not dominate a contrast."""
    scale = np.mean(np.concatenate([np.abs(s).reshape(-1) for s in scores.values()]).astype(np.float64))
    return {name: s.astype(np.float64) / (scale if scale > 0 else 1.0) for name, s in scores.items()}


def specific_scores(target: dict[str, np.ndarray], others: list[dict[str, np.ndarray]], aggregate: str = "mean",
                    largest: bool = True) -> dict[str, np.ndarray]:
    """What the target needs and the other concepts do not: n_target - agg(n_other) with n = scores / mean|scores|
    (`normalised`). `aggregate` is `mean` over the others or `max`, which protects the single most similar
    concept (for `largest=False`, CAD-Amplify, the mirror: `min`). Only components whose own score has the
    edit's sign keep a value; the rest get 0, so `select` never zeroes a component the target does not use."""
    if aggregate not in AGGREGATES:
        raise CadRayError(f"unknown contrast aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
    if not others:
        raise CadRayError("a specific ranking needs the scores of at least one other concept")
    own, rest = normalised(target), [normalised(o) for o in others]
    out = {}
    for name, value in own.items():
        stacked = np.stack([o[name] for o in rest])
        if aggregate == "mean":
            against = stacked.mean(axis=0)
        else:
            against = stacked.max(axis=0) if largest else stacked.min(axis=0)
        contrast = value - against
        eligible = target[name] > 0 if largest else target[name] < 0
        out[name] = np.where(eligible, contrast, 0.0)
    return out


@dataclass(frozen=True)
class Selection:
    """How a zeroing edit picks its components: the sub-scope of the run's scope (scores do not depend on the
    scope they were computed in, so one run over a union serves each part), the unit, the contrast against
    other concepts and how a ratio becomes a count; the scores ranked, CAD's by default or a baseline's
    (`cad_ray.method.baselines.METHODS`), of the edit's own objective or another one (`objective`). Written as
    a string: `attn2/global/others-mean`, `ff/row/none/floor`, `gradient:attn2/global/none`,
    `prior:ff/global/kind-max`. Parts joined by `|` are a union, each part taking the edit's ratio of its own
    scope: `tokens+attn2/neuron/kind-mean|prior:ff/global/kind-max` (`parts`). `rule`: how a part takes its
    components, `rank` (the top of each unit at the edit's ratio) or `skill` (ConceptPrune's threshold rule,
    the ratio its skill ratio: `conceptprune_masks`; written `/skill`, the `conceptprune` preset)."""

    scope: str = "all"
    granularity: str = "global"
    contrast: str = "none"  # none | others (every other concept) | kind (the others of the target's kind)
    aggregate: str = "mean"
    rounding: str = "round"
    method: str = "cad"
    objective: str = ""  # "": the edit's own (erase for cad-erase)
    also: "Selection | None" = None  # the next part of a union
    rule: str = "rank"  # rank | skill

    def __str__(self) -> str:
        contrast = self.contrast if self.contrast == "none" else f"{self.contrast}-{self.aggregate}"
        text = "/".join([self.scope, self.granularity, contrast] + (["floor"] if self.rounding == "floor" else [])
                        + (["skill"] if self.rule == "skill" else []))
        text = text if self.method == "cad" else f"{self.method}:{text}"
        text = f"{self.objective}:{text}" if self.objective else text
        return text if self.also is None else f"{text}|{self.also}"

    @property
    def parts(self) -> list["Selection"]:
        """The parts of a union, each on its own (one part for a plain selection)."""
        return [replace(self, also=None)] + (self.also.parts if self.also is not None else [])

    def with_method(self, method: str, contrast: str | None = None) -> "Selection":
        """The same parts ranked by another method's scores (and optionally another contrast): the followers'
        selections (`gradient`, `magnitude`)."""
        return replace(self, method=method, contrast=self.contrast if contrast is None else contrast,
                       also=None if self.also is None else self.also.with_method(method, contrast))

    @classmethod
    def parse(cls, text: str) -> "Selection":
        """`[objective:][method:]scope/granularity/contrast[-aggregate][/floor][/skill]`, parts joined by `|`, or
        a preset name (`published`, `conceptprune`)."""
        if text in PRESETS:
            return PRESETS[text]
        head, bar, tail = str(text).partition("|")
        if bar:
            return replace(cls.parse(head), also=cls.parse(tail))
        method, colon, rest = str(text).partition(":")
        if colon and not rest.startswith("/") and "/" not in method and method != "re":  # re:REGEX: a scope
            if method in OBJECTIVES:
                return replace(cls.parse(rest), objective=method)
            return replace(cls.parse(rest), method=check_method(method))
        skill = str(text).endswith("/skill")
        plain = str(text).removesuffix("/skill")
        floor = plain.endswith("/floor")
        parts = plain.removesuffix("/floor").rsplit("/", 2)  # from the right: a re: scope may hold '/'
        if len(parts) != 3 or not parts[0]:
            raise CadRayError(f"selection {text!r}: write scope/granularity/contrast[/floor], e.g. "
                              "attn2/global/others-mean, or a preset: " + ", ".join(PRESETS))
        scope, granularity, contrast = parts
        aggregate = "mean"
        if contrast != "none":
            head, _, tail = contrast.rpartition("-")
            if tail in AGGREGATES and head:
                contrast, aggregate = head, tail
        if granularity not in GRANULARITIES:
            raise CadRayError(f"selection {text!r}: unknown granularity {granularity!r}; choose one of "
                              f"{', '.join(GRANULARITIES)}")
        if contrast not in CONTRASTS:
            raise CadRayError(f"selection {text!r}: unknown contrast {contrast!r}; choose one of {', '.join(CONTRASTS)}")
        return cls(scope, granularity, contrast, aggregate, "floor" if floor else "round",
                   rule="skill" if skill else "rank")


PRESETS = {"published": Selection(scope="ff", granularity="row", contrast="none", rounding="floor"),
           # ConceptPrune's own rule at skill ratio = the edit's ratio (`conceptprune_masks`)
           "conceptprune": Selection(scope="ff", granularity="row", contrast="none", rounding="floor",
                                     method="conceptprune", rule="skill")}


def contrast_concepts(target: str, concepts: list[str], contrast: str, kind_of) -> list[str]:
    """The concepts a contrast ranks the target against: every other one (`others`), or those of its own kind
    (`kind`: `kind_of(name)`, e.g. the digits world's `concept_kind`: the other digits of a digit and the other
    colours of a colour; every other concept where `kind_of` gives None)."""
    others = [c for c in concepts if c != target]
    if contrast == "kind" and kind_of(target) is not None:
        others = [c for c in others if kind_of(c) == kind_of(target)]
    return others if contrast != "none" else []


def selection_masks(scores_of, target: str, others: list[str], selection: Selection, ratio: float,
                    largest: bool = True, protected: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The masks of one zeroing edit: `scores_of(concept)` gives a concept's tensor scores over the run's scope;
    `others` are the concepts a contrast ranks against (`contrast_concepts`; ignored without contrast). One part
    of a selection: a union's parts may rank other objectives' scores, which `ScoreStore.masks` reads.
    `protected` (`scopes.never_selected`): components that are never taken, whatever their score; the
    ratio's count goes to the next ones."""
    if selection.also is not None:
        raise CadRayError(f"selection {selection}: a union of parts is made by ScoreStore.masks, part by part")
    inside = scope_matcher(selection.scope)
    target_scores = scores_of(target)
    own = {n: s for n, s in target_scores.items() if inside(n, torch.empty(s.shape, device="meta"))}
    if not own:
        raise CadRayError(f"selection scope {selection.scope!r} holds none of the run's scored tensors")
    protected = protected or {}
    if selection.rule == "skill":
        masks = conceptprune_masks(own, ratio)
        return {n: masks.get(n, np.zeros(s.shape, dtype=bool)) & ~protected.get(n, False)
                for n, s in target_scores.items()}
    ranked = own
    if selection.contrast != "none":
        if not others:
            raise CadRayError(f"a specific selection of {target!r} needs other concepts' scores of the same objective "
                              "in the run; it has none")
        # each other concept's table read once, not once per tensor
        ranked = specific_scores(own, [{n: table[n] for n in own} for table in map(scores_of, others)],
                                 selection.aggregate, largest)
    ranked = unselectable(ranked, protected)
    masks = select(ranked, ratio=ratio, granularity=selection.granularity, largest=largest,
                   rounding=selection.rounding)
    return {n: masks.get(n, np.zeros(s.shape, dtype=bool)) for n, s in target_scores.items()}


def unselectable(scores: dict[str, np.ndarray], protected: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """`scores` with the protected components' set to 0: no sign, so neither an erase nor an amplify takes
    them (`select` takes only scores of the edit's sign)."""
    if not protected:
        return scores
    out = dict(scores)
    for name, rows in protected.items():
        if name in out:
            out[name] = np.where(rows, 0, out[name]).astype(out[name].dtype, copy=False)
    return out


def union_masks(masks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The components any of the masks takes (the parts of a union selection)."""
    return {n: np.logical_or.reduce([m[n] for m in masks]) for n in masks[0]}


def random_like(masks: dict[str, np.ndarray], granularity: str, seed: int,
                scope: str | None = None) -> dict[str, np.ndarray]:
    """Random masks with the same number of components in each unit as `masks` (`neuron`: as many whole rows).
    With `scope` (the selection's), drawn among that scope's tensors only, as the selection was: a run over
    `ff+attn2+tokens` must not answer a choice of words with random feed-forward rows."""
    if scope is not None:
        inside = scope_matcher(scope)
        pool = {n: m for n, m in masks.items() if inside(n, torch.empty(m.shape, device="meta"))}
        drawn = random_like(pool, granularity, seed)
        return {n: drawn[n] if n in drawn else np.zeros(m.shape, dtype=bool) for n, m in masks.items()}
    rng = numpy_rng(seed, "random-edit", granularity)
    if granularity == "neuron":  # as many whole rows, anywhere in the masks' tensors
        rows = [_rows(m) for m in masks.values()]
        chosen = np.zeros(sum(r.shape[0] for r in rows), dtype=bool)
        chosen[rng.choice(chosen.size, int(sum(r.all(axis=1).sum() for r in rows)), replace=False)] = True
        return _row_masks(chosen, masks)
    if granularity == "global":
        sizes = [m.size for m in masks.values()]
        chosen = np.zeros(sum(sizes), dtype=bool)
        chosen[rng.choice(sum(sizes), int(sum(m.sum() for m in masks.values())), replace=False)] = True
        out, offset = {}, 0
        for (name, m), size in zip(masks.items(), sizes):
            out[name] = chosen[offset:offset + size].reshape(m.shape)
            offset += size
        return out
    out = {}
    for name, m in masks.items():
        units = _units(m, granularity)
        chosen = np.zeros(units.shape, dtype=bool)
        for u, n in enumerate(units.sum(axis=1)):
            chosen[u, rng.choice(units.shape[1], int(n), replace=False)] = True
        out[name] = chosen.reshape(m.shape)
    return out
