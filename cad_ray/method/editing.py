"""Edits of a model's scoped components (core, no Ray): selection from a score table, zeroing, and the
fine-tuning baselines.

- `cad-erase`: zero the top positive scores of the erase objective; `cad-amplify`: zero the most negative
  scores of the amplify objective. Selected by ratio (of the components in each unit) or count, with the unit
  `global`, `tensor` or `row` (the published code ranks within each output row); or whole output rows at once,
  `neuron` (for a token-embedding table, one row is one word).
- `random`: the same number of components in each unit, chosen at random: the baseline of every zeroing edit.
- `finetune`: ESD-style gradient steps on every scoped weight that pull the concept's noise prediction to the
  base prompt's (frozen) prediction at points of the concept's trajectories: gradient descent on the erase
  objective J itself. `cad-finetune`: the same steps restricted to the components CAD-Erase selects.

A selection is only made from a score table whose model fingerprint is the model's own.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from cad_ray.errors import CadRayError
from cad_ray.method.attribution import reencoded, resolve_chunk_size
from cad_ray.method.baselines import check_method, conceptprune_masks
from cad_ray.method.objectives import OBJECTIVES, point_values
from cad_ray.method.ranking import first_k
from cad_ray.method.scopes import reads_text_encoder, scope_matcher, select_parameters
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


def check_fingerprint(model, table_fingerprint: str, what: str = "the score table") -> None:
    if model.fingerprint() != table_fingerprint:
        raise CadRayError(f"{what} was computed on another model (fingerprint {table_fingerprint}, this model "
                          f"{model.fingerprint()}); an edit is only made with scores of the model it edits")


def _forget_fingerprint(model) -> None:
    model._fingerprint = None  # the weights changed: the next fingerprint() hashes them again


@torch.no_grad()
def set_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Give some tensors new values in place, for good (a closed-form edit such as UCE's)."""
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].copy_(value)
    _forget_fingerprint(model)


def _mask_tensors(model, masks: dict[str, np.ndarray]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, its mask as a boolean tensor on the parameter's device) for each mask; a mask naming a tensor
    the model lacks, or of another shape than its tensor, is refused."""
    params = dict(model.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise CadRayError(f"the edit names tensors this model does not have: {', '.join(unknown[:3])}")
    pairs = []
    for name, mask in masks.items():
        p = params[name]
        if tuple(mask.shape) != tuple(p.shape):
            raise CadRayError(f"mask of {name} has shape {mask.shape}, the tensor {tuple(p.shape)}")
        pairs.append((p, torch.from_numpy(mask).to(p.device)))
    return pairs


@torch.no_grad()
def zero_components(model, masks: dict[str, np.ndarray]) -> int:
    """Zero the masked components in place; returns how many were zeroed."""
    zeroed = 0
    for p, mask in _mask_tensors(model, masks):
        p[mask] = 0
        zeroed += int(mask.sum())
    _forget_fingerprint(model)
    return zeroed


@contextmanager
def _restored(model, names):
    """Save the named tensors, and put them back exactly when the block ends."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names if n in params}
    try:
        yield params
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        _forget_fingerprint(model)


@contextmanager
def edited(model, masks: dict[str, np.ndarray]):
    """Zero the masked components for the duration of the block, then restore the weights exactly."""
    # only the entries the edit zeroes are saved, not their tensors: a zeroing edit takes a few percent of a
    # scope, and a copy of the whole tensors of SD 1.4's `ff` scope is 0.6 GB in every image actor
    with torch.no_grad():
        saved = [(p, mask, p[mask].clone()) for p, mask in _mask_tensors(model, masks)]
    try:
        zero_components(model, masks)
        yield model
    finally:
        with torch.no_grad():
            for p, mask, values in saved:
                p[mask] = values
        _forget_fingerprint(model)


@contextmanager
def weights_replaced(model, weights: dict[str, torch.Tensor]):
    """Use other values for some tensors (a fine-tuned scope) for the duration of the block."""
    with _restored(model, weights) as params:
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        _forget_fingerprint(model)
        yield model


def finetune(model, concept, objective, scope: str, samples: list[int], seed: int, steps: int, lr: float,
             masks: dict[str, np.ndarray] | None = None, chunk_size: int | str = 256,
             negative_guidance: float = 0.0) -> dict[str, torch.Tensor]:
    """Gradient descent (Adam) on the erase objective: the concept's prediction is pulled to the base prompt's
    prediction made by the original weights, or with `negative_guidance` eta beyond it, to
    base - eta * (concept - base) as ESD does. With `masks`, only the masked components move. Returns the new
    values of the scoped tensors; the model itself is left as it was."""
    if steps < 1:
        raise CadRayError(f"fine-tuning needs at least one step, got {steps}")
    chunk_size = resolve_chunk_size(chunk_size)  # "auto": 64 on any device, since it sets the minibatch below
    parameters = select_parameters(model.named_parameters(), scope)
    original = {n: p.detach().clone() for n, p in parameters}
    points = objective.points(model, concept, samples, seed, chunk_size)  # targets: the original weights
    if negative_guidance:
        with torch.no_grad():
            own = torch.cat([model.predict_noise(points.x[i:i + chunk_size], points.t[i:i + chunk_size],
                                                 points.cond[i:i + chunk_size]) for i in range(0, len(points), chunk_size)])
        points.target = points.target - negative_guidance * (own - points.target)
    weights = points.weights()
    reads_text = reads_text_encoder(n for n, _ in parameters)  # text-encoder weights move the conditioning too
    grad_masks = {n: torch.from_numpy(masks[n]).to(p.device, p.dtype) for n, p in parameters
                  if masks is not None and n in masks}
    params = [p for _, p in parameters]
    optimizer = torch.optim.Adam(params, lr=lr)
    order = numpy_rng(seed, concept.name, "finetune")
    batch = min(len(points), chunk_size)
    try:
        for p in params:
            p.requires_grad_(True)
        for _ in range(steps):
            pick = torch.from_numpy(order.choice(len(points), batch, replace=False))
            part = points.chunk(0, len(points))
            part.x, part.t, part.cond, part.target = part.x[pick], part.t[pick], part.cond[pick], part.target[pick]
            part.sample = part.sample[pick]
            if reads_text:
                part = reencoded(model, concept, part)
            loss = (point_values(model, part).double() * weights[pick].to(part.x.device)).sum() / weights[pick].sum()
            optimizer.zero_grad()
            loss.backward()
            if masks is not None:
                for name, p in parameters:
                    p.grad *= grad_masks[name] if name in grad_masks else 0
            optimizer.step()
        return {n: p.detach().clone() for n, p in parameters}
    finally:
        with torch.no_grad():
            for name, p in parameters:
                p.requires_grad_(False)
                p.grad = None
                p.copy_(original[name])
        _forget_fingerprint(model)
