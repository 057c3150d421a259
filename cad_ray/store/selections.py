"""What a run's scores say an edit takes: the components most specific to a concept, the masks of a selection,
and the parts an edit zeroes (`ScoreStore`'s, through `SelectionQueries`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cad_ray.digits.concepts import concept_kind
from cad_ray.errors import CadRayError

# cad_ray.method.editing is imported inside the methods that use it, for start-up speed only: it imports torch,
# which the plain queries ('cad-ray top', 'layers', 'overlap') never need


def scored_partition(objective: str, method: str) -> str:
    """The `objective=` partition holding a method's scores: CAD's and the ones derived from them under the
    objective, a baseline with statistics of its own (`conceptprune`) under its name."""
    return "conceptprune" if method == "conceptprune" else objective


class SelectionQueries:
    """The edit-side queries of a `ScoreStore`, which gives `run`, `config`, `concepts` and `tensor_scores`."""

    def specific(self, concept: str, against: list[str] | None = None, objective: str = "erase", k: int = 20,
                 aggregate: str = "mean", negative: bool = False) -> pd.DataFrame:
        """The k components most specific to `concept`: ranked by what it needs and the concepts `against` do not
        (`cad_ray.method.editing.specific_scores`: scores normalised per concept, the others' mean or max
        subtracted). `against` defaults to every other concept with scores of this objective in the run."""
        from cad_ray.method.editing import specific_scores

        if k < 1:
            raise CadRayError(f"k must be at least 1, got {k}")
        have = [c for c, o in self.concepts().itertuples(index=False) if o == objective]
        against = [c for c in have if c != concept] if against is None else list(against)
        missing = [c for c in [concept, *against] if c not in have]
        if missing:
            raise CadRayError(f"no {objective} scores for {', '.join(missing)} in {self.run.uri}; a specific ranking "
                              f"needs scores of the same objective, model and scope; the run has {', '.join(have)}")
        if not against or against == [concept]:
            raise CadRayError(f"a specific ranking of {concept!r} needs other concepts' {objective} scores in the "
                              f"run; it has only {', '.join(have)}")
        target = self.tensor_scores(concept, objective)
        ranked = specific_scores(target, [self.tensor_scores(c, objective) for c in against if c != concept],
                                 aggregate, largest=not negative)
        names = list(ranked)
        flat = np.concatenate([ranked[n].reshape(-1) for n in names])
        sizes = np.cumsum([0] + [ranked[n].size for n in names])
        key = flat if negative else -flat
        pick = np.argsort(key, kind="stable")[:k]
        pick = pick[(flat[pick] < 0) if negative else (flat[pick] > 0)]
        tensor_of = np.searchsorted(sizes, pick, side="right") - 1
        rows = pd.DataFrame({"tensor": [names[i] for i in tensor_of], "index": pick - sizes[tensor_of],
                             "score": [target[names[i]].reshape(-1)[j] for i, j in zip(tensor_of, pick - sizes[tensor_of])],
                             "specific": flat[pick]})
        rows.insert(0, "rank", np.arange(1, len(rows) + 1))
        return rows

    def masks(self, target: str, selection, ratio: float, objective: str = "erase", largest: bool = True,
              scores_of=None, protected: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The components a zeroing edit of `target` takes by `selection` (a `Selection` or its text): its scores,
        and for a contrast those of the other concepts of the objective in this run; for a union, each part's
        (of its own objective, `objective` where it names none), joined. `scores_of(concept, objective,
        method)` may supply cached tensor scores; `protected` (`scopes.never_selected(model)`) is never taken."""
        from cad_ray.method.editing import contrast_concepts, selection_masks, union_masks

        scores_of = scores_of or self.tensor_scores
        pairs = list(self.concepts().itertuples(index=False))
        picked = []
        for part, ratio in self.edit_parts(selection, ratio):
            own = part.objective or objective
            stored = scored_partition(own, part.method)
            concepts = [c for c, o in pairs if o == stored]
            others = contrast_concepts(target, concepts, part.contrast, concept_kind)
            picked.append(selection_masks(lambda c: scores_of(c, own, part.method), target, others, part, ratio,
                                          largest, protected))
        return union_masks(picked)

    def edit_parts(self, selection, ratio: float) -> list:
        """The (part, ratio) pairs an edit by `selection` zeroes: each part of a union at the edit's ratio, and
        before a part that ranks `residual` scores, the first edit those scores were computed after (the run's
        `residual.after` at `residual.after_ratio`): the residual's components draw the concept only on the
        model that edit leaves."""
        from cad_ray.method.editing import Selection

        chosen = selection if isinstance(selection, Selection) else Selection.parse(selection)
        out = []
        for part in chosen.parts:
            if part.objective == "residual":
                first = self.config.residual
                out.append((Selection.parse(first.after), float(first.after_ratio)))
            out.append((part, ratio))
        return out
