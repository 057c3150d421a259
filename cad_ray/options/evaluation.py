"""The evaluation's options (`cad-ray evaluate`): the edits, their fine-tuning, UCE, the search and the probes."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from cad_ray.method.edits import EDITS
from cad_ray.options.base import Strict, check_selection, no_duplicates, one_line


class UnlearningOptions(Strict):
    """cad-finetune as adversarial unlearning (cad_ray.method.unlearning): rounds of an inversion attack, then
    Adam steps on the selected components against it, with a retain loss on the other concepts."""

    rounds: int = Field(3, ge=1, description="attack-then-unlearn rounds (the first without an attack)")
    steps: int = Field(100, ge=1, description="Adam steps per round")
    lr: float = Field(3e-3, gt=0)
    batch: int = Field(32, ge=1, description="images of the target each step noises, and at most as many of the "
                                             "other concept it keeps (the cost of a step)")
    images: int = Field(64, ge=1, description="the unedited model's images of the target the steps noise")
    retain_images: int = Field(32, ge=1, description="images of each other concept kept")
    retain_weight: float = Field(1.0, gt=0, description="weight of the retain loss (the other concepts kept) "
                                                        "against the unlearning loss")
    eta: float = Field(1.0, ge=0, description="how far the prediction is pushed beyond the target")
    target: Literal["esd", "images", "nearest"] = Field(
        "images", description="esd: the empty prompt's prediction pushed from the concept's (leaves the completion "
                           "of a noised image alone); images: from images_from of the timesteps up, the noise "
                           "that makes x_t an image of the nearest other concept; nearest: the nearest other "
                           "concept's prediction (erases little: docs/editing.md)")
    images_from: float = Field(0.1, ge=0, le=1, description="images: the share of the training timesteps from "
                                                            "which the target is another concept's image")
    match: Literal["pixels", "shape"] = Field(
        "pixels", description="images: how the nearest other concept's image is found: pixels, or shape (the "
                              "channels' maximum: a colour's nearest other image draws the same thing in another "
                              "colour, where pixels of disjoint channels would match any shape)")
    attack_steps: int = Field(100, ge=1, description="Adam steps of each round's inversion attack")
    timestep_power: float = Field(1.0, ge=1, description="the target's noise levels t = T * u ** power: 1 uniform, "
                                                         "above 1 more low-noise steps (where a lightly noised "
                                                         "image of the target is finished)")


class FinetuneOptions(Strict):
    steps: int = Field(100, ge=1, description="Adam steps of the finetune baselines")
    lr: float = Field(3e-3, gt=0)
    samples: int = Field(8, ge=1, description="trajectories whose points the fine-tuning fits")
    ratio: float = Field(0.01, gt=0, le=1, description="share of components cad-finetune may move")
    negative_guidance: float = Field(1.0, ge=0, description="ESD's eta: the target is base - eta*(concept - base)")
    selection: str | None = Field(None, description="the components cad-finetune moves (default: evaluation."
                                                    "selection)")
    scope: str | None = Field(None, description="the weights the ESD-style finetune baseline moves, all of them "
                              "(default: the run's scope), e.g. ff+attn2+tokens where the run attributes `all` "
                              "for cad-finetune's selections")
    unlearning: UnlearningOptions | None = Field(None, description="cad-finetune as adversarial unlearning "
                                                 "(null: ESD's steps on the selected components)")
    kinds: dict[str, dict] = Field(default_factory=dict, description="per kind of target (digits world: digit, "
                                   "colour), fields of this section that replace its own for that kind's targets, "
                                   "e.g. {colour: {ratio: 0.1, unlearning: {match: shape}}}")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v):
        for kind, fields in v.items():
            if "kinds" in fields:
                raise ValueError(f"finetune.kinds.{kind} cannot hold kinds of its own")
        return v

    @model_validator(mode="after")
    def _kinds_are_settings(self):
        for kind in self.kinds:  # a field this section does not have is refused here, not in a worker
            try:
                self.for_kind(kind)
            except ValidationError as e:
                raise ValueError(one_line(e, f"kinds.{kind}")) from None
        return self

    def for_kind(self, kind: str | None) -> "FinetuneOptions":
        """The settings of a target of `kind` (`cad_ray.digits.concepts.concept_kind`): this section with the
        fields `kinds[kind]` names replaced (`unlearning`'s field by field); without an entry, this section."""
        if kind not in self.kinds:
            return self.model_copy(update={"kinds": {}})
        fields = self.model_dump(mode="json", exclude={"kinds"})
        override = dict(self.kinds[kind])
        if isinstance(override.get("unlearning"), dict):
            override["unlearning"] = {**(fields.get("unlearning") or {}), **override["unlearning"]}
        return FinetuneOptions.model_validate({**fields, **override})

    @field_validator("selection")
    @classmethod
    def _selection(cls, v):
        return v if v is None else check_selection(v)

    def key(self) -> dict:
        """The fields an edit depends on; the new ones only where set, so that edits made before keep theirs."""
        key = self.model_dump(mode="json", exclude={k for k in ("selection", "unlearning", "scope")
                                                    if getattr(self, k) is None}
                              | ({"kinds"} if not self.kinds else set()))
        if self.unlearning is not None and self.unlearning.target != "images":
            del key["unlearning"]["images_from"]  # read by the images target only
        if self.unlearning is not None:  # edits made before a field keep their key
            key["unlearning"] = without_later_defaults(key["unlearning"], LATER_EDIT_KEY_DEFAULTS)
        return key

    def named(self) -> dict:
        """The options as image blocks are named by them: `kinds` and the unlearning fields added later only where
        set, so that images made before them keep their blocks."""
        dump = self.model_dump(mode="json", exclude={"kinds"} if not self.kinds else None)
        if dump.get("unlearning"):
            dump["unlearning"] = without_later_defaults(dump["unlearning"])
        return dump


# unlearning fields added after image blocks were named, and after edits were keyed (a longer list: the blocks'
# names held retain_weight and match from the start)
LATER_UNLEARNING_DEFAULTS = {"batch": 32, "timestep_power": 1.0}
LATER_EDIT_KEY_DEFAULTS = {**LATER_UNLEARNING_DEFAULTS, "retain_weight": 1.0, "match": "pixels"}


def without_later_defaults(unlearning: dict, defaults: dict = LATER_UNLEARNING_DEFAULTS) -> dict:
    """An unlearning dump without the later fields at their defaults: what was made before them keeps its name."""
    return {k: v for k, v in unlearning.items() if k not in defaults or v != defaults[k]}


class ProbeOptions(Strict):
    """How the completeness probes attack an edited model (`cad_ray.method.probes`, docs/editing.md)."""

    steps: int = Field(200, ge=1, description="Adam steps of a learned embedding (inversion, soft-prompt)")
    lr: float = Field(0.02, gt=0, description="Adam's learning rate of the learned embedding")
    batch: int = Field(32, ge=1, description="images per Adam step")
    images: int = Field(128, ge=1, description="the unedited model's images of the target the attacks learn from")
    samples: int = Field(64, ge=1, description="images judged per probe setting, on seeds the attacks never saw")
    strengths: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75],
                                   description="completion: the shares of the sampling steps re-run from the "
                                               "noised image (0: the image itself, 1: pure noise)")
    guidance_scales: list[float] = Field(default_factory=lambda: [0.1, 0.4],
                                         description="guidance: how hard the judge's gradient steers each step "
                                                     "(0: plain sampling); the judge that steers also judges, "
                                                     "so read it beside the never-learned level")
    references: dict[str, str] = Field(default_factory=dict,
                                       description="target -> folder of a model trained without it (jobs/"
                                                   "train_digits.py --exclude): the never-learned level")
    margin: float = Field(0.1, ge=0, le=1, description="clean under the probes: recovery at most the never-learned "
                                                       "level plus this")

    @field_validator("strengths")
    @classmethod
    def _strengths(cls, v):
        bad = [s for s in v if not 0 <= s <= 1]
        if bad:
            raise ValueError(f"a completion strength is a share of the sampling steps from 0 to 1, got {bad[0]}")
        return sorted(set(v))

    @field_validator("guidance_scales")
    @classmethod
    def _scales(cls, v):
        bad = [s for s in v if not s > 0]
        if bad or not v:
            raise ValueError(f"a guidance scale is a number > 0 (scale 0 is the plain sampling every edit is "
                             f"judged by already), got {bad[0] if bad else 'none'}")
        return sorted(set(v))


class UceOptions(Strict):
    """UCE's closed-form edit (cad_ray.method.baselines.uce_weights); defaults as the paper's code."""

    preserve: Literal["kind", "others", "none"] = Field(
        "kind", description="prompts kept: the other concepts of the target's kind (as CAD's `kind` contrast), every "
                            "other concept, or none (the empty prompt only, the published default for objects)")
    guide: str = Field(" ", description="what the target's embeddings are mapped to (' ': unconditional)")
    lamb: float = Field(0.5, ge=0, description="weight of the old projection (ridge term)")
    erase_scale: float = Field(1.0, gt=0)
    preserve_scale: float | None = Field(None, gt=0, description="default: max(0.1, 1 / number of kept prompts)")


DEFAULT_SEARCH_RATIOS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2]


class SearchOptions(Strict):
    """Choose each target's CAD-Erase selection and ratio by images: on a selection split of prompts and seeds
    only; the verdicts are then reported on the test split (see docs/editing.md)."""

    selections: list[str] = Field(default_factory=lambda: ["attn2/global/kind-mean"], min_length=1,
                                  description="candidate selections, [objective:]scope/granularity/contrast[/floor], "
                                              "parts joined by | (docs/editing.md)")
    ratios: list[float] = Field(default_factory=lambda: list(DEFAULT_SEARCH_RATIOS), min_length=1)
    images_per_prompt: int = Field(2, ge=1, description="seeds per prompt of the selection split")
    margin: int = Field(1, ge=0, description="a setting is checked and picked this many grid steps above the "
                                             "smallest clean ratio followed by as many clean ones: near the "
                                             "threshold a verdict depends on seeds")
    target_max: float = Field(0.2, ge=0, le=1, description="clean: the target's accuracy at most this, on own "
                                                          "and on unseen wordings")
    others_min: float = Field(0.9, ge=0, le=1, description="kept: every other label keeps this share of its "
                                                          "unedited accuracy")
    brightness_min: float = Field(0.8, ge=0, le=1, description="kept: the images of everything else keep this "
                                                               "share of their unedited brightness (mean per "
                                                               "colour asked, the worst)")

    @field_validator("selections")
    @classmethod
    def _selections(cls, v):
        return [check_selection(s) for s in v]

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v):
        bad = [r for r in v if not 0 < r <= 1]
        if bad:
            raise ValueError(f"edit ratios must be in (0, 1], got {bad}")
        return sorted(set(v))


class EvaluationOptions(Strict):
    """Edits judged by images (`cad-ray evaluate`); not part of the attribution's config hash."""

    targets: list[str] = Field(default_factory=lambda: ["seven"], min_length=1, description="concepts to edit")
    edits: list[str] = Field(default_factory=lambda: ["cad-erase", "random", "cad-amplify"], min_length=1,
                             description="edits by name (cad_ray.method.edits.EDITS): " + ", ".join(EDITS))
    ratios: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.1], min_length=1,
                                description="shares of components zeroed, each in (0, 1]")
    recovery_ratios: list[float] = Field(default_factory=lambda: [0.01, 0.03])
    selection: str = Field("all/global/none", description="how zeroing edits pick components: "
                           "scope/granularity/contrast[/floor] or 'published' (ff/row/none/floor)")
    search: SearchOptions | None = Field(None, description="choose cad-erase's selection and ratio per target on "
                                         "a selection split (cad-erase-published: its ratio); null: every ratio")
    prompt_panel: Literal["canonical", "wordings"] = Field(
        "wordings", description="digits model: 'wordings' = every digit's own (colour-free) wordings and unseen "
                                "coloured ones; 'canonical' = one prompt per digit")
    images_per_prompt: int = Field(10, ge=1)
    prompts: str | None = Field(None, description="prompt CSV (benchmark format); null: the digits prompts")
    seed: int = Field(1000, description="seed of the evaluation images (with each row's seed)")
    random_draws: int = Field(1, ge=1, description="independent draws of the random edit, each target its own: "
                              "the target's images are made under every draw (its accuracy is their mean), "
                              "everything else's under the first")
    guidance: float | None = Field(None, description="guidance of the images (default: the model's)")
    amplify_guidance: float = Field(1.0, description="guidance at which CAD-Amplify is judged (weak conditioning)")
    steps: int | None = Field(None, ge=1, description="sampling steps (default: the model's)")
    batch_size: int = Field(50, ge=1, description="rows per block: a unit of image work, written as it finishes")
    judge: dict | None = Field(None, description="judge: {name: <registered judge>, **options}; default: the "
                               "digits judges for the digits model (see docs/editing.md)")
    finetune: FinetuneOptions = Field(default_factory=FinetuneOptions)
    uce: UceOptions = Field(default_factory=UceOptions)
    probes: list[Literal["inversion", "completion", "soft-prompt", "guidance"]] = Field(
        default_factory=list, description="completeness probes of every erasing edit (docs/editing.md): is the "
                                          "concept gone from the model, or only from its words")
    probe: ProbeOptions = Field(default_factory=ProbeOptions)

    @field_validator("judge")
    @classmethod
    def _no_code(cls, v):
        if v and "factory" in v:
            raise ValueError("a config names a registered judge ({name: classifier, ...}), never code to import; "
                             "'factory' is not allowed")
        if v:  # refused at parse time, before any work; the registry lists names without importing judges' code
            from cad_ray.judges import JUDGE_ENTRY_POINTS, registered_judges

            name, known = v.get("name", "classifier"), registered_judges()
            if name not in known:
                raise ValueError(f"unknown judge {name!r}; registered judges: {', '.join(sorted(known))} (plugins "
                                 f"register under the {JUDGE_ENTRY_POINTS!r} entry-point group; 'cad-ray judges' "
                                 "lists them)")
        return v

    @field_validator("selection")
    @classmethod
    def _selection(cls, v):
        return check_selection(v)

    @field_validator("targets", "edits", "probes")
    @classmethod
    def _once(cls, v, info):
        return no_duplicates(v, info.field_name)

    @field_validator("edits")
    @classmethod
    def _known_edits(cls, v):
        bad = [e for e in v if e not in EDITS]
        if bad:
            raise ValueError(f"unknown edit {bad[0]!r}; choose from {', '.join(EDITS)}")
        return v

    @field_validator("ratios", "recovery_ratios")
    @classmethod
    def _ratio_range(cls, v, info):
        bad = [r for r in v if not 0 < r <= 1]
        if bad:
            raise ValueError(f"edit ratios must be in (0, 1], got {bad}")
        return sorted(no_duplicates(v, info.field_name))

    def options_hash(self, lists: bool = True) -> str:
        """A hash of what the evaluation's results depend on; `lists=False`: without the lists of edits and
        targets, i.e. what every edit's images and probes depend on besides their own edit and target (another
        edit or target added to an evaluation leaves the others' images and probes as they are)."""
        unused = set() if "uce" in self.edits else {"uce"}  # evaluations made before UCE keep their hash
        if self.random_draws == 1 or not any(EDITS[e].draws for e in self.edits):  # and before random draws
            unused.add("random_draws")
        if not lists:  # UCE's options are in its own images' and probes' names (stages.edit_workers.setting_meta)
            unused |= {"edits", "targets", "uce", "random_draws"}
        # the probes have their own hash (stages/probing.py): adding them re-makes no evaluation image
        fields = self.model_dump(exclude={"batch_size", "probes", "probe", "finetune", *unused}, mode="json")
        fields["finetune"] = self.finetune.key()
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
