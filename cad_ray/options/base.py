"""What every option section of a run config shares: the strict base model, the device and selection checks."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from cad_ray.errors import CadRayError

ObjectiveName = Literal["erase", "amplify", "prior", "residual"]
# what a concept's scores are computed for: CAD's objectives, or a baseline method with tables of its own
ScoredName = Literal["erase", "amplify", "prior", "residual", "conceptprune"]


DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")


def check_device(value: str | None) -> str | None:
    """A torch device a worker can compute on: cpu, cuda, cuda:<n>, mps, xpu (not 'meta', which holds no numbers)."""
    if value is not None and not DEVICE.fullmatch(str(value)):
        raise ValueError(f"unknown device {value!r}; use cpu, cuda, cuda:<n>, mps or xpu")
    return value


def one_line(e: ValidationError, where: str = "") -> str:
    """A validation error's messages on one line, each at its place in the config (under `where`)."""
    return "; ".join(f"{'.'.join([where, *map(str, err['loc'])]).strip('.') or 'config'}: {err['msg']}"
                     for err in e.errors())


class Strict(BaseModel):
    # no NaN or infinity in any number of a config (a NaN guidance made NaN images, judged as digits)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def no_duplicates(values, what: str):
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"{what} lists {seen[0]!r} twice")
    return values


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


def check_selection(text: str) -> str:
    from cad_ray.method.editing import Selection  # torch: imported where a config is checked

    try:
        check_selection_prefixes(text)
        Selection.parse(text)
    except Exception as e:
        raise ValueError(str(e)) from None
    return text
