"""CAD attribution: score a_i = w_i * dJ/dw_i for every parameter in a scope.

One trajectory per sample: the objective makes each sample's points once (every kept x_t of one guided
trajectory), then batched forward/backward passes over those points, in chunks that fit memory, accumulate
dJ/dw in float64. Partial sums over blocks of samples (`GradientSum`) add up in a fixed order, so a
sharded run gives the same scores as an in-process one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from cad_ray.errors import CadRayError
from cad_ray.method.objectives import Concept, Points, point_values
from cad_ray.method.scopes import reads_text_encoder, select_parameters


@dataclass
class GradientSum:
    """Sum over samples of dJ_s/dw (float64, per scoped tensor) and of J_s, for `samples` samples."""

    grads: dict[str, torch.Tensor]
    samples: int
    objective_sum: float

    def __add__(self, other: "GradientSum") -> "GradientSum":
        if list(self.grads) != list(other.grads):
            raise ValueError("cannot add gradient sums over different scopes")
        return GradientSum({k: self.grads[k] + other.grads[k] for k in self.grads},
                           self.samples + other.samples, self.objective_sum + other.objective_sum)

    @staticmethod
    def reduce(parts: list["GradientSum"]) -> "GradientSum":
        """Add partial sums in the given order (callers pass them sorted by shard id)."""
        if not parts:
            raise ValueError("nothing to reduce")
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def mean(self) -> dict[str, torch.Tensor]:
        return {k: v / self.samples for k, v in self.grads.items()}


@dataclass
class Attribution:
    """Per-tensor weights, mean gradients and scores of one concept under one objective."""

    concept: str
    objective: str
    weights: dict[str, torch.Tensor]  # float32, CPU
    grads: dict[str, torch.Tensor]  # float64 means, CPU
    objective_value: float
    samples: int

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """w * dJ/dw in float64: positive induces the concept, negative inhibits it."""
        return {k: self.weights[k].double() * self.grads[k] for k in self.weights}

    def predicted_change(self, masks: dict[str, torch.Tensor]) -> float:
        """First-order prediction of J(ablated) - J for zeroing the components where `masks` is True."""
        return -sum(float(self.scores[k][m].sum()) for k, m in masks.items())


def reencoded(model, concept: Concept, points: Points) -> Points:
    """The points with their conditioning encoded again from each sample's prompts, under the model's current
    text-encoder weights (and differentiably, outside no_grad). The points store the encoding made when they
    were drawn; with text-encoder weights among the components, their gradient flows through the encoding and
    an ablation changes it. The erase objective's target stays what it was: the base term is frozen."""
    samples = [int(s) for s in points.sample]
    pairs = {s: concept.prompt(s) for s in dict.fromkeys(samples)}
    prompts = list(dict.fromkeys(p for pair in pairs.values() for p in pair))
    encoded = model.encode(prompts)
    row = {p: k for k, p in enumerate(prompts)}
    pick = lambda k: torch.tensor([row[pairs[s][k]] for s in samples], device=encoded.device)  # noqa: E731
    return replace(points, cond=encoded[pick(0)],
                   base_cond=None if points.base_cond is None else encoded[pick(1)])


@contextmanager
def gradients_for(parameters):
    """Temporarily let gradients flow to `parameters` only (the model's weights are frozen otherwise)."""
    previous = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(True)
        p.grad = None
    try:
        yield
    finally:
        for p, flag in zip(parameters, previous):
            p.requires_grad_(flag)
            p.grad = None


class CAD:
    """The CAD estimator (first order): `attribute(concept, samples)` -> Attribution.

    `chunk_size` is the number of points per forward/backward pass; it changes memory use, and results only
    by float rounding.
    """

    def __init__(self, model, objective, scope: str = "ff", chunk_size: int = 256, seed: int = 0, batch: int = 4):
        self.model, self.objective, self.scope = model, objective, scope
        self.chunk_size, self.seed, self.batch = chunk_size, seed, batch
        self.parameters = select_parameters(model.named_parameters(), scope)
        self.reads_text = reads_text_encoder(n for n, _ in self.parameters)

    @property
    def tensor_names(self) -> list[str]:
        return [n for n, _ in self.parameters]

    def gradient_sum(self, concept: Concept, samples: list[int]) -> GradientSum:
        """Sum over the given samples of dJ_s/dw, each sample's J_s being the mean over its points.

        Samples are processed in batches aligned on the global grid of `batch` sample indices (sample s is
        in batch s // batch): trajectories of a batch are sampled together and its points go through the
        forward/backward passes together. So a sample's numbers are the same in whatever block or shard
        it is computed; only the float64 additions of whole batches depend on the grouping.
        """
        params = [p for _, p in self.parameters]
        # the sums stay on the model's device until the end: at SD scale (149M components) moving every chunk's
        # gradients to the host would cost more than the chunk's own backward pass
        sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in self.parameters}
        objective_sum = 0.0
        groups: dict[int, list[int]] = {}
        for sample in samples:
            groups.setdefault(sample // self.batch, []).append(sample)
        with gradients_for(params):
            for group in groups.values():
                points = self.objective.points(self.model, concept, group, self.seed, self.chunk_size)
                weight = points.weights()
                for start in range(0, len(points), self.chunk_size):
                    chunk = points.chunk(start, start + self.chunk_size)
                    values = point_values(self.model, reencoded(self.model, concept, chunk) if self.reads_text
                                          else chunk)
                    total = (values.double() * weight[start:start + self.chunk_size].to(values.device)).sum()
                    total.backward()
                    objective_sum += float(total.detach())
                    for name, p in self.parameters:
                        if p.grad is not None:  # None: the tensor does not influence J
                            sums[name].add_(p.grad)  # float64 += float32, exact promotion, no temporary
                            p.grad = None
        for name, total in sums.items():
            # one check at the end suffices: a NaN or inf in any chunk's gradient leaves the sum non-finite
            if not torch.isfinite(total).all():
                raise CadRayError(f"non-finite gradient (NaN or inf) in tensor {name} for concept "
                                  f"{concept.name!r}; check the model weights and the objective")
        return GradientSum({n: v.cpu() for n, v in sums.items()}, len(samples), objective_sum)

    def finish(self, concept: Concept, total: GradientSum) -> Attribution:
        weights = {n: p.detach().float().cpu().clone() for n, p in self.parameters}
        return Attribution(concept.name, self.objective.name, weights, total.mean(),
                           total.objective_sum / total.samples, total.samples)

    def attribute(self, concept: Concept, samples: int | list[int], block: int | None = None) -> Attribution:
        """Scores of `concept` over `samples` (a count or explicit indices), in blocks of `block` samples."""
        ids = list(range(samples)) if isinstance(samples, int) else list(samples)
        if not ids:
            raise CadRayError("attribution needs at least one sample")
        block = block or len(ids)
        parts = [self.gradient_sum(concept, ids[i:i + block]) for i in range(0, len(ids), block)]
        return self.finish(concept, GradientSum.reduce(parts))
