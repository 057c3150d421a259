"""Applying an edit to a model's weights (core, no Ray): zeroing masked components for good or for the duration of
a block, putting other values in some tensors (a closed-form or fine-tuned edit), and the fine-tuning itself.

- `finetune`: ESD-style gradient steps on every scoped weight that pull the concept's noise prediction to the
  base prompt's (frozen) prediction at points of the concept's trajectories: gradient descent on the erase
  objective J itself. With masks (`cad-finetune`), the same steps restricted to the components CAD-Erase selects.

Which components an edit takes is `cad_ray.method.editing`'s; an edit is only made with scores of the model it
edits (`check_fingerprint`).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from cad_ray.errors import CadRayError
from cad_ray.method.attribution import reencoded, resolve_chunk_size
from cad_ray.method.objectives import point_values
from cad_ray.method.scopes import reads_text_encoder, select_parameters
from cad_ray.seeds import numpy_rng


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
