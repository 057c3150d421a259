"""The validation's options (`cad-ray validate`)."""

from __future__ import annotations

import hashlib
import json

from pydantic import Field, field_validator, model_validator

from cad_ray.options.base import ObjectiveName, Strict, no_duplicates


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
        return v if v is None else no_duplicates(v, "validation.concepts")

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
