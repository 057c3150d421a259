"""The attribution's options: each objective's section, ConceptPrune's, and a concept's entry."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from cad_ray.options.base import ScoredName, Strict, no_duplicates


class EraseOptions(Strict):
    guidance: float | None = Field(None, description="guidance of the concept trajectories (default: model's)")
    steps: int | None = Field(None, ge=1, description="sampling steps T (default: model's, 50)")
    points_per_sample: int | None = Field(10, ge=1, description="x_t kept per trajectory (null: all T): fewer "
                                          "points cost less a trajectory and tell less (docs/benchmarks.md, "
                                          "speed at equal quality)")
    fused: bool = Field(False, description="compute the points' forward pass inside the sampler's guided step "
                        "instead of a second pass: faster where the UNet's arithmetic dominates its calls or where "
                        "every step is a point, slower for small models in small batches (docs/benchmarks.md). "
                        "Runs separate passes where it cannot fuse: a concept whose base prompt is not the empty "
                        "prompt (colours), a scope in the text encoder, a batch larger than chunk_size; the option "
                        "still counts in the config hash")


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
        return no_duplicates(v, "objectives")

    @field_validator("prompts")
    @classmethod
    def _non_empty(cls, v):
        if v is not None and len(v) == 0:
            raise ValueError("the prompt list is empty; give at least one prompt or leave it out")
        return v
