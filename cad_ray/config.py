"""Run configuration (YAML), validated with pydantic. Every field that changes results is in the config
hash; `workers`, `device` and `keep_shards` are not, since the tables do not depend on them. The option sections
live in `cad_ray.options` and are importable from here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cad_ray.errors import CadRayError
from cad_ray.options.attribution import (AmplifyOptions, ConceptPruneOptions, ConceptSpec, EraseOptions,
                                         ResidualOptions)
from cad_ray.options.base import (ObjectiveName, ScoredName, Strict, check_device, check_selection,
                                  check_selection_prefixes, one_line)
from cad_ray.options.evaluation import (DEFAULT_SEARCH_RATIOS, EvaluationOptions, FinetuneOptions, ProbeOptions,
                                        SearchOptions, UceOptions, UnlearningOptions)
from cad_ray.options.validation import ValidationOptions

__all__ = ["AmplifyOptions", "AttributionConfig", "CONFIG_LIMIT", "ConceptPruneOptions", "ConceptSpec",
           "DEFAULT_SEARCH_RATIOS", "EraseOptions", "EvaluationOptions", "FinetuneOptions", "LATER_STAGES",
           "ObjectiveName", "ProbeOptions", "ResidualOptions", "ScoredName", "SearchOptions", "Strict",
           "UceOptions", "UnlearningOptions", "ValidationOptions", "check_device", "check_selection",
           "check_selection_prefixes", "load_config", "parse_config"]

LATER_STAGES = ("validation", "evaluation")  # sections read by later stages; they do not change the score tables


class AttributionConfig(Strict):
    model: str | None = Field(None, description="model folder or s3:// URI; null = built-in digits model")
    seed: int = 0
    scope: str = "ff"
    samples: int = Field(8, ge=1, description="samples (trajectories or images) per concept and objective")
    block: int = Field(4, ge=1, description="samples per shard (a multiple of batch)")
    batch: int = Field(4, ge=1, description="samples whose trajectories are sampled and differentiated together")
    concept_batch: int = Field(1, ge=1, description="concepts whose erase trajectories are sampled and "
                               "differentiated together, each concept's gradient split from one backward pass "
                               "(fused erase only, where concept_batch x batch <= chunk_size; scores change only by "
                               "float rounding): fewer, larger UNet calls, which pays where a call's fixed cost "
                               "dominates (docs/benchmarks.md). The groups follow the config's concept order")
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
    def _concept_batch_can_stack(self):
        if self.concept_batch > 1:
            if not self.erase.fused:
                raise ValueError(f"concept_batch {self.concept_batch} stacks fused erase trajectories only: set "
                                 "erase.fused: true, or concept_batch: 1")
            if isinstance(self.chunk_size, int) and self.concept_batch * self.batch > self.chunk_size:
                raise ValueError(f"concept_batch x batch ({self.concept_batch} x {self.batch}) rows must fit one "
                                 f"chunk (chunk_size {self.chunk_size}): lower one of them or raise chunk_size")
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
        if self.concept_batch == 1:  # likewise
            exclude["concept_batch"] = True
        return self.model_dump(exclude=exclude, mode="json")

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.result_fields(), sort_keys=True).encode()).hexdigest()[:16]

    def pairs(self) -> list[tuple[ConceptSpec, str]]:
        return [(c, o) for c in self.concepts for o in c.objectives]


def parse_config(data, source: str = "config") -> AttributionConfig:
    if not isinstance(data, dict):
        raise CadRayError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return AttributionConfig.model_validate(data)
    except ValidationError as e:
        raise CadRayError(f"invalid {source}: {one_line(e)}") from None


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
