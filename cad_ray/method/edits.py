"""The edits, one typed record each (core, no Ray): what an edit ranks, under which objective and in which
direction, what it follows, whether a search picks its setting, and how it is applied. The config checks edit
names against `EDITS`, the evaluation plans, makes and judges its rows from the records, and `cad-ray edit`
makes any of them. Adding an edit is one record here plus, for an edit that is not a zeroing of ranked
components, its apply function (docs/editing.md, "Adding an edit").

How an edit is applied (`applied_by`):

    zeroing        zero the components a selection takes from the run's scores (cad_ray.method.editing);
                   `after` names an edit whose model it is applied on (its scores are then that model's)
    closed-form    new weights computed from the model and the concepts' prompts (uce: cad_ray.method.baselines)
    fine-tuning    gradient steps, saved as a model folder in the run root (cad_ray.method.editing.finetune)

Which settings its rows are made at (`settings`):

    ratios         each ratio of `evaluation.ratios` (or the search's pick), with its selection
    recovery       each ratio of `evaluation.recovery_ratios`, with `evaluation.selection`
    finetune       `evaluation.finetune`'s selection (default: `evaluation.selection`) and ratio
    single         one row set, its selection a label (`selection`) and ratio 0.0: no selection takes its components
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NONE = "none"  # the unedited model's rows


@dataclass(frozen=True)
class Edit:
    """One edit. `selection`: a fixed selection (a preset name) instead of `evaluation.selection`; for a
    `single` edit the label its rows carry. `method`/`contrast`: rank the selection's parts by another method's
    scores (`gradient`: |dJ/dw|, `magnitude`: |w|) and with another contrast (`none`: |w| is every concept's,
    there is nothing to contrast). `follows`: the edit whose (searched) setting its rows use, the same count,
    scope and unit. `searched`: the search picks its ratio (cad-erase: its selection too, among the search's
    selections). `needs`: the scores (objective partition) the run must hold for the target."""

    name: str
    applied_by: Literal["zeroing", "closed-form", "fine-tuning"]
    settings: Literal["ratios", "recovery", "finetune", "single"] = "ratios"
    ranks: Literal["scores", "random"] = "scores"  # random: a random draw of what the followed edit zeroes
    objective: str = "erase"  # the objective whose scores a zeroing edit ranks
    largest: bool = True  # the direction: True takes the largest positive scores, False the most negative
    selection: str | None = None
    method: str | None = None
    contrast: str | None = None
    follows: str | None = None
    searched: bool = False
    draws: bool = False  # made in `evaluation.random_draws` independent draws
    after: str | None = None  # applied on the model another edit made (recovery: on finetune's)
    needs: str | None = "erase"
    amplifies: bool = False  # brings the concept back (judged at its highest accuracy; nothing to probe)
    guidance: Literal["guidance", "amplify_guidance"] = "guidance"
    summary: str = ""

    @property
    def picked_by(self) -> str:
        """The edit whose searched setting this edit's rows use: its own, or the one it follows."""
        return self.follows or self.name

    @property
    def zeroes(self) -> bool:
        return self.applied_by == "zeroing"


_EDITS = (
    Edit("cad-erase", "zeroing", searched=True,
         summary="zero the largest erase scores, by evaluation.selection at each ratio (or the search's pick)"),
    Edit("cad-erase-published", "zeroing", selection="published", searched=True,
         summary="cad-erase by the published selection (ff/row/none/floor), the search picking its ratio"),
    Edit("random", "zeroing", ranks="random", follows="cad-erase", draws=True,
         summary="as many components as cad-erase in each unit, drawn at random per target"),
    Edit("cad-amplify", "zeroing", objective="amplify", largest=False, needs="amplify", amplifies=True,
         guidance="amplify_guidance", summary="zero the most negative amplify scores, judged at amplify_guidance"),
    Edit("finetune", "fine-tuning", settings="single", selection="", needs=None,
         summary="ESD-style gradient steps on every scoped weight"),
    Edit("cad-finetune", "fine-tuning", settings="finetune",
         summary="the finetune steps on the components evaluation.finetune's selection takes (or unlearning)"),
    Edit("finetune+cad-amplify", "zeroing", settings="recovery", objective="amplify", largest=False,
         contrast="none", after="finetune", amplifies=True,
         summary="CAD-Amplify on the finetune-erased model (its own amplify scores): recovery"),
    Edit("gradient", "zeroing", method="gradient", follows="cad-erase",
         summary="cad-erase's setting, ranked by |dJ/dw| instead of w * dJ/dw"),
    Edit("magnitude", "zeroing", method="magnitude", contrast="none", follows="cad-erase",
         summary="cad-erase's setting, ranked by |w| (every concept's: no contrast)"),
    Edit("conceptprune", "zeroing", selection="conceptprune", searched=True, needs="conceptprune",
         summary="ConceptPrune's rule (its Wanda statistics), the ratio being its skill ratio"),
    Edit("uce", "closed-form", settings="single", selection="uce", needs=None,
         summary="UCE's closed-form edit of the cross-attention keys and values"),
)
EDITS: dict[str, Edit] = {e.name: e for e in _EDITS}
RECOVERY = "finetune+cad-amplify"


def edit_help() -> str:
    """One line per edit: its name and what it does (the CLI's help)."""
    return "; ".join(f"{e.name}: {e.summary}" for e in _EDITS)


def picked_by(name: str) -> str:
    """The edit whose searched setting rows of `name` use (`none` and names outside the registry: their own)."""
    return EDITS[name].picked_by if name in EDITS else name


def amplifying(name: str) -> bool:
    """The edit brings its target back (its best setting is its highest target accuracy)."""
    return name in EDITS and EDITS[name].amplifies


def is_reference(name: str) -> bool:
    """The unedited model and random draws: what an edit is read beside, never an edit's best trade-off."""
    return name == NONE or (name in EDITS and EDITS[name].ranks == "random")


def erasing() -> list[str]:
    """The edits that take a concept away (the verdicts' edits), references last."""
    names = [e.name for e in _EDITS if not e.amplifies]
    return sorted(names, key=is_reference)


def one_setting(name: str) -> bool:
    """Rows of a single setting per target (no ratio sweep): the baselines, fine-tuning and random draws."""
    return name in EDITS and (EDITS[name].settings in ("single", "finetune") or EDITS[name].ranks == "random")
