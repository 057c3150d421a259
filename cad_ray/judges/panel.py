"""Several judges on the same images, e.g. the nudity verdict with the CLIP score and FD-DINOv2 features."""

from __future__ import annotations

import numpy as np

from cad_ray.errors import CadRayError
from cad_ray.judges import judge_batch, load_judge


class PanelJudge:
    """`judges`: a list of judge specs ({name: ..., **options}), each a registered judge. The first gives the
    verdict (`predicted`, `correct`); every judge adds its other columns, and two judges giving the same column
    is an error, except `features` (the Frechet distance's input): they come from the judge with reference images
    (fd-dinov2) when the panel has one, else from the first judge that gives them (a classifier's logits)."""

    def __init__(self, judges: list[dict]):
        if not judges or not all(isinstance(j, dict) and j.get("name") for j in judges):
            raise CadRayError("judge 'panel' needs 'judges': a list of judge specs, each {name: <registered judge>, "
                              "...options}")
        if any(j["name"] == "panel" for j in judges):
            raise CadRayError("judge 'panel' cannot hold another panel")
        self.names = [j["name"] for j in judges]
        self.judges = [load_judge(j, "") for j in judges]
        with_reference = [i for i, j in enumerate(self.judges) if hasattr(j, "reference_features")]
        self.features_from = with_reference[0] if with_reference else None

    def judge(self, images: np.ndarray, labels: list[str], prompts: list[str] | None = None) -> dict:
        out = {}
        for position, (name, judge) in enumerate(zip(self.names, self.judges)):
            columns = judge_batch(judge, images, labels, prompts)
            for column, values in columns.items():
                if column in ("predicted", "correct") and position > 0:
                    continue  # the first judge's verdict is the panel's
                if column == "features" and (self.features_from not in (None, position) or column in out):
                    continue  # the reference judge's features, else the first judge's
                if column in out:
                    raise CadRayError(f"judge 'panel': {name!r} and an earlier judge both give column {column!r}")
                out[column] = values
        return out

    def reference_features(self) -> np.ndarray:
        if self.features_from is not None:
            return self.judges[self.features_from].reference_features()
        raise CadRayError("judge 'panel' has no judge with reference images (e.g. fd-dinov2 with 'reference')")
