"""Run configuration (YAML), validated with pydantic. Every field that changes results is in the config
hash; `workers`, `device` and `keep_shards` are not, since the tables do not depend on them."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cad_ray.errors import CadRayError
from cad_ray.method.edits import EDITS

ObjectiveName = Literal["erase", "amplify", "prior", "residual"]
# what a concept's scores are computed for: CAD's objectives, or a baseline method with tables of its own
ScoredName = Literal["erase", "amplify", "prior", "residual", "conceptprune"]
LATER_STAGES = ("validation", "evaluation")  # sections read by later stages; they do not change the score tables


DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")


def check_device(value: str | None) -> str | None:
    """A torch device a worker can compute on: cpu, cuda, cuda:<n>, mps, xpu (not 'meta', which holds no numbers)."""
    if value is not None and not DEVICE.fullmatch(str(value)):
        raise ValueError(f"unknown device {value!r}; use cpu, cuda, cuda:<n>, mps or xpu")
    return value


class Strict(BaseModel):
    # no NaN or infinity in any number of a config (a NaN guidance made NaN images, judged as digits)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EraseOptions(Strict):
    guidance: float | None = Field(None, description="guidance of the concept trajectories (default: model's)")
    steps: int | None = Field(None, ge=1, description="sampling steps T (default: model's, 50)")
    points_per_sample: int | None = Field(10, ge=1, description="x_t kept per trajectory (null: all T). 10 of 50 "
                                          "give the quality per trajectory of all 50 at about half the cost "
                                          "(docs/benchmarks.md, speed at equal quality)")
    fused: bool = Field(False, description="compute the points' forward pass inside the sampler's guided step "
                        "instead of a second pass: 1.35x faster where the UNet's arithmetic dominates (tiny SD at "
                        "32x32 latents, CPU) or where every step is a point (tiny SD at 8x8 with steps 15 and "
                        "points_per_sample null: 20% less time at equal quality), slower for small models in small "
                        "batches (the digits model: 1.7x); "
                        "docs/benchmarks.md. Runs separate passes where it cannot fuse: a concept whose base prompt "
                        "is not the empty prompt (colours), a scope in the text encoder, a batch larger than "
                        "chunk_size; the option still counts in the config hash")


class AmplifyOptions(Strict):
    points_per_sample: int = Field(50, ge=1, description="noised copies of each image")
    guidance: float | None = None
    steps: int | None = Field(None, ge=1)


class ResidualOptions(AmplifyOptions):
    after: str = Field("tokens/neuron/kind-mean", description="the first edit: the selection whose components are "
                       "zeroed before the residual is attributed (ranked by the run's own scores)")
    after_ratio: float = Field(0.07, gt=0, le=1, description="the first edit's ratio (0.07 of the digits model's "
                               "32-word table: the 2 words of a digit)")


class ConceptPruneOptions(Strict):
    """ConceptPrune's statistics (cad_ray.method.baselines.ConceptPrune), for concepts listing `conceptprune`."""

    timesteps: int = Field(10, ge=1, description="the first UNet calls whose skilled weights are united (the "
                                                 "published scripts: 10)")
    guidance: float | None = Field(None, description="guidance of the trajectories (default: the model's)")
    steps: int | None = Field(None, ge=1, description="sampling steps (default: the model's)")


NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _no_duplicates(values, what: str):
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"{what} lists {seen[0]!r} twice")
    return values


class ConceptSpec(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")
    prompts: list[str] | None = None
    base_prompt: str | list[str] | None = None
    objectives: list[ScoredName] = Field(default_factory=lambda: ["erase"], min_length=1,
                                         description="erase, amplify, prior, residual (CAD), conceptprune "
                                                     "(the baseline's Wanda scores, docs/editing.md)")

    @field_validator("name")
    @classmethod
    def _partition_value(cls, v):
        # the name is a hive partition value (scores/concept=<name>/): readers would type '1' or '01' as numbers
        # (and then '1' beside '01' as one), and read this one as null
        if NUMBER.fullmatch(v) or v == "__HIVE_DEFAULT_PARTITION__":
            raise ValueError(f"concept name {v!r} would be read back as a number or null from the tables' folder "
                             "names; give a name with a letter, e.g. 'digit-1'")
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives_once(cls, v):
        return _no_duplicates(v, "objectives")

    @field_validator("prompts")
    @classmethod
    def _non_empty(cls, v):
        if v is not None and len(v) == 0:
            raise ValueError("the prompt list is empty; give at least one prompt or leave it out")
        return v


class ValidationOptions(Strict):
    """Random-ablation validation (`cad-ray validate`); not part of the attribution's config hash."""

    fractions: list[float] = Field(default_factory=lambda: [0.001, 0.01, 0.05], min_length=1,
                                   description="ablation fractions rho, each in (0, 1)")
    ablations: int = Field(100, description="random subsets M per fraction")
    concepts: list[str] | None = Field(None, description="concepts to validate (default: all with the objective)")
    objective: ObjectiveName = "erase"
    eval_samples: int = Field(4, ge=1, description="samples whose points form the fixed evaluation batch")
    eval_points_per_sample: int | None = Field(10, ge=1, description="points per evaluation sample (null: all)")
    held_out: bool = Field(True, description="evaluate on samples the scores were not computed on")
    projections: int = Field(64, ge=1, description="random projections K of the second-order estimator")
    sketch_points_per_sample: int | None = Field(10, ge=1, description="points per attribution sample in "
                                                 "the second-order sketch (null: all)")
    coar_train_fraction: float = Field(0.5, gt=0, lt=1, description="share of the ablations COAR is fit on")
    block: int = Field(50, ge=1, description="ablations per shard")

    @field_validator("concepts")
    @classmethod
    def _concepts_once(cls, v):
        return v if v is None else _no_duplicates(v, "validation.concepts")

    @field_validator("fractions")
    @classmethod
    def _open_interval(cls, v):
        bad = [f for f in v if not 0 < f < 1]
        if bad:
            raise ValueError(f"ablation fractions must be in (0, 1), got {bad}")
        if len(set(v)) != len(v):
            raise ValueError("ablation fractions must be distinct")
        return sorted(v)

    @field_validator("ablations")
    @classmethod
    def _at_least_one(cls, v):
        if v < 1:
            raise ValueError(f"the number of ablations M must be at least 1, got {v}")
        return v

    @model_validator(mode="after")
    def _enough_to_fit_coar(self):
        # checked here, not when COAR is fit: a run would otherwise attribute first and fail minutes later
        train = max(1, int(round(self.coar_train_fraction * self.ablations)))
        if train < 3:
            need = next(m for m in range(self.ablations, 10_000) if int(round(self.coar_train_fraction * m)) >= 3)
            raise ValueError(f"COAR is fit on {train} of the {self.ablations} ablations per fraction and needs at "
                             f"least 3: raise 'ablations' to at least {need}")
        return self

    def options_hash(self) -> str:
        fields = self.model_dump(exclude={"block"}, mode="json")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class UnlearningOptions(Strict):
    """cad-finetune as adversarial unlearning (cad_ray.method.unlearning): rounds of an inversion attack, then
    Adam steps on the selected components against it, with a retain loss on the other concepts."""

    rounds: int = Field(3, ge=1, description="attack-then-unlearn rounds (the first without an attack)")
    steps: int = Field(100, ge=1, description="Adam steps per round")
    lr: float = Field(3e-3, gt=0)
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


class FinetuneOptions(Strict):
    steps: int = Field(100, ge=1, description="Adam steps of the finetune baselines")
    lr: float = Field(3e-3, gt=0)
    samples: int = Field(8, ge=1, description="trajectories whose points the fine-tuning fits")
    ratio: float = Field(0.01, gt=0, le=1, description="share of components cad-finetune may move")
    negative_guidance: float = Field(1.0, ge=0, description="ESD's eta: the target is base - eta*(concept - base)")
    selection: str | None = Field(None, description="the components cad-finetune moves (default: evaluation."
                                                    "selection)")
    unlearning: UnlearningOptions | None = Field(None, description="cad-finetune as adversarial unlearning "
                                                 "(null: ESD's steps on the selected components)")

    @field_validator("selection")
    @classmethod
    def _selection(cls, v):
        return v if v is None else _check_selection(v)

    def key(self) -> dict:
        """The fields an edit depends on; the new ones only where set, so that edits made before keep theirs."""
        key = self.model_dump(mode="json", exclude={k for k in ("selection", "unlearning") if getattr(self, k) is None})
        if self.unlearning is not None and self.unlearning.target != "images":
            del key["unlearning"]["images_from"]  # read by the images target only
        if self.unlearning is not None and self.unlearning.retain_weight == 1.0:
            del key["unlearning"]["retain_weight"]  # edits made before it keep their key
        if self.unlearning is not None and self.unlearning.match == "pixels":
            del key["unlearning"]["match"]  # edits made before it keep their key
        return key


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


def check_selection_prefixes(text: str) -> None:
    """Refuse a selection part with two objective prefixes or two method prefixes (`erase:amplify:ff/...`): the
    parser would silently keep one of them."""
    from cad_ray.method.objectives import OBJECTIVES  # torch: imported where a config is checked

    for part in str(text).split("|"):
        prefixes, rest = [], part
        while True:
            head, colon, tail = rest.partition(":")
            if not colon or "/" in head or tail.startswith("/") or head == "re":  # re:REGEX is the scope
                break
            prefixes.append(head)
            rest = tail
        for kind, names in (("objective", [p for p in prefixes if p in OBJECTIVES]),
                            ("method", [p for p in prefixes if p not in OBJECTIVES])):
            if len(names) > 1:
                raise CadRayError(f"selection {text!r}: more than one {kind} prefix ({', '.join(names)}); write "
                                  "[objective:][method:]scope/granularity/contrast")


def _check_selection(text: str) -> str:
    from cad_ray.method.editing import Selection  # torch: imported where a config is checked

    try:
        check_selection_prefixes(text)
        Selection.parse(text)
    except Exception as e:
        raise ValueError(str(e)) from None
    return text


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
        return [_check_selection(s) for s in v]

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
    batch_size: int = Field(50, ge=1, description="rows per Ray Data batch")
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
        return _check_selection(v)

    @field_validator("targets", "edits", "probes")
    @classmethod
    def _once(cls, v, info):
        return _no_duplicates(v, info.field_name)

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
        return sorted(_no_duplicates(v, info.field_name))

    def options_hash(self) -> str:
        unused = set() if "uce" in self.edits else {"uce"}  # evaluations made before UCE keep their hash
        if self.random_draws == 1 or not any(EDITS[e].draws for e in self.edits):  # and before random draws
            unused.add("random_draws")
        # the probes have their own hash (stages/probing.py): adding them re-makes no evaluation image
        fields = self.model_dump(exclude={"batch_size", "probes", "probe", "finetune", *unused}, mode="json")
        fields["finetune"] = self.finetune.key()
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class AttributionConfig(Strict):
    model: str | None = Field(None, description="model folder or s3:// URI; null = built-in digits model")
    seed: int = 0
    scope: str = "ff"
    samples: int = Field(8, ge=1, description="samples (trajectories or images) per concept and objective")
    block: int = Field(4, ge=1, description="samples per shard (a multiple of batch)")
    batch: int = Field(4, ge=1, description="samples whose trajectories are sampled and differentiated together")
    chunk_size: int | Literal["auto"] = Field(
        "auto", description="points per forward/backward pass (memory use; scores change only by float rounding): "
        "a whole number >= 1, or 'auto': on a CUDA device the attribution starts at 256 points and halves on "
        "out-of-memory until a chunk fits; on CPU, and in passes without that fallback (second-order sketch, "
        "fine-tuning, whose minibatch it sets), 'auto' is 64")
    erase: EraseOptions = Field(default_factory=EraseOptions)
    amplify: AmplifyOptions = Field(default_factory=AmplifyOptions)
    prior: AmplifyOptions = Field(default_factory=AmplifyOptions, description="the prior objective's: the "
                                  "concept's images denoised under its base prompt (concepts listing `prior`)")
    residual: ResidualOptions = Field(default_factory=ResidualOptions, description="the residual objective's: the "
                                      "amplify objective on the model with the `after` edit of the concept made "
                                      "(what still draws it once its words are gone)")
    conceptprune: ConceptPruneOptions = Field(default_factory=ConceptPruneOptions)
    concepts: list[ConceptSpec] = Field(min_length=1)
    workers: int | None = Field(None, ge=1, description="Ray actors (default: one per GPU, else per CPU)")
    device: str | None = Field(None, description="torch device of the workers (default: cuda if any, else cpu)")
    keep_shards: bool = Field(False, description="keep _shards/ (partial sums) after a (concept, objective)'s tables "
                              "are written; by default they are removed then")
    validation: ValidationOptions = Field(default_factory=ValidationOptions)
    evaluation: EvaluationOptions = Field(default_factory=EvaluationOptions)

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        return check_device(v)

    @field_validator("chunk_size", mode="before")
    @classmethod
    def _chunk_size(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"chunk_size must be a whole number >= 1 or 'auto', got {v!r}")

    @field_validator("concepts")
    @classmethod
    def _unique(cls, v):
        names = [c.name for c in v]
        if len(set(names)) != len(names):
            raise ValueError("concept names must be unique")
        return v

    @model_validator(mode="after")
    def _block_holds_whole_batches(self):
        if self.block % self.batch:
            raise ValueError(f"block ({self.block}) must be a multiple of batch ({self.batch}), so that a "
                             "sample's numbers do not depend on the shard it falls in")
        return self

    @model_validator(mode="after")
    def _residual_follows_its_first_edit(self):
        listing = [c.name for c in self.concepts if "residual" in c.objectives]
        if listing:
            from cad_ray.method.editing import Selection  # torch: imported where a config is checked

            try:
                after = Selection.parse(self.residual.after)
            except CadRayError as error:
                raise ValueError(f"residual.after: {error}") from None
            needed = after.objective or "erase"
            if after.also is not None or needed == "residual":
                raise ValueError("residual.after must be one selection of the run's other scores, not a union or "
                                 "the residual itself")
            lacking = [c.name for c in self.concepts if c.name in listing and needed not in c.objectives]
            if lacking:
                raise ValueError(f"the residual objective zeroes residual.after ({after}) first, which ranks the "
                                 f"{needed!r} scores: add {needed!r} to the objectives of {', '.join(lacking)}")
        return self

    def result_fields(self) -> dict:
        # conceptprune's and prior's options count only where a concept lists them (runs made before keep their hash)
        unused = {o for o in ("conceptprune", "prior", "residual") if not any(o in c.objectives for c in self.concepts)}
        exclude = {key: True for key in ("workers", "device", "keep_shards", *LATER_STAGES, *unused)}
        if not self.erase.fused:  # runs made before the option keep their hash
            exclude["erase"] = {"fused"}
        return self.model_dump(exclude=exclude, mode="json")

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.result_fields(), sort_keys=True).encode()).hexdigest()[:16]

    def pairs(self) -> list[tuple[ConceptSpec, str]]:
        return [(c, o) for c in self.concepts for o in c.objectives]


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_config(data, source: str = "config") -> AttributionConfig:
    if not isinstance(data, dict):
        raise CadRayError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return AttributionConfig.model_validate(data)
    except ValidationError as e:
        raise CadRayError(f"invalid {source}: {_one_line(e)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
            except TypeError:
                continue  # an unhashable key: the base constructor says what is wrong with it
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


CONFIG_LIMIT = 1 << 20  # 1 MiB: far above any config; /dev/zero or a data file is refused, not read to the end


def load_config(path: str | Path, overrides: dict | None = None) -> AttributionConfig:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(CONFIG_LIMIT + 1)
        if len(raw) > CONFIG_LIMIT:
            raise CadRayError(f"config {path} is larger than {CONFIG_LIMIT >> 20} MiB; it is no cad-ray config")
        data = yaml.load(raw.decode("utf-8"), Loader=_UniqueKeyLoader)
    except OSError as e:
        raise CadRayError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CadRayError(f"config {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise CadRayError(f"malformed YAML in {path}: {' '.join(str(e).split())}") from None
    data = dict(data or {}) if isinstance(data, dict) or data is None else data
    if isinstance(data, dict):
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_config(data, str(path))
