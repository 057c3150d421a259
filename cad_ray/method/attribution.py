"""CAD attribution: score a_i = w_i * dJ/dw_i for every parameter in a scope.

One trajectory per sample: the objective makes each sample's points once (every kept x_t of one guided
trajectory), then batched forward/backward passes over those points, in chunks that fit memory, accumulate
dJ/dw in float64. Partial sums over blocks of samples (`GradientSum`) add up in a fixed order, so a
sharded run gives the same scores as an in-process one. With an erase objective that asks for it (`fused`), the
points' forward pass is the sampler's own guided step instead (`EraseObjective.fused_backward`): one forward
pass fewer per point, which pays where the UNet's arithmetic dominates its calls (docs/benchmarks.md).

The chunk size that fits: `chunk_size="auto"` starts at `AUTO_CHUNK_START` points on a CUDA device
(`DEFAULT_CHUNK` elsewhere), and a CUDA out-of-memory in a chunk halves the chunk and carries on from that
chunk, instead of failing the shard; the estimator keeps the size that fitted for its later groups and shards.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import torch

from cad_ray.errors import CadRayError
from cad_ray.method.grouped_gradients import GroupedLinearGradients, NotGroupable, linear_modules
from cad_ray.method.objectives import Concept, Points, point_values
from cad_ray.method.scopes import reads_text_encoder, select_parameters

log = logging.getLogger("cad_ray")

DEFAULT_CHUNK = 64  # points per pass for chunk_size "auto" on CPU, and in passes without the out-of-memory fallback
AUTO_CHUNK_START = 256  # where chunk_size "auto" starts on a CUDA device, halved on out-of-memory until a chunk fits
# torch.OutOfMemoryError (torch >= 2.5) is torch.cuda.OutOfMemoryError under another name
OUT_OF_MEMORY = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


def resolve_chunk_size(value: int | str, device=None) -> int:
    """The chunk size to start from, for a config value (a whole number >= 1, or "auto").

    "auto" is `AUTO_CHUNK_START` on a CUDA `device`, where the CAD estimator halves it on out-of-memory until a
    chunk fits, and `DEFAULT_CHUNK` otherwise: on CPU (no device memory to probe), and for the passes that have
    no such fallback (they call this without a device), where the size must not depend on the machine."""
    if value == "auto":
        return AUTO_CHUNK_START if device is not None and torch.device(device).type == "cuda" else DEFAULT_CHUNK
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CadRayError(f"chunk_size must be a whole number >= 1 or 'auto', got {value!r}")
    return value


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

    `chunk_size` is the number of points per forward/backward pass (or "auto", see `resolve_chunk_size`); it
    changes memory use, and results only by float rounding. A CUDA out-of-memory in a pass halves
    `self.chunk_size` (one warning per halving) and redoes that chunk's points in smaller chunks: a failed pass
    adds nothing to the sums, so nothing is counted twice, and the halved size stays for later groups and shards.
    """

    def __init__(self, model, objective, scope: str = "ff", chunk_size: int | str = 256, seed: int = 0,
                 batch: int = 4):
        self.model, self.objective, self.scope = model, objective, scope
        self.chunk_size = resolve_chunk_size(chunk_size, getattr(model, "device", None))
        self.seed, self.batch = seed, batch
        self.parameters = select_parameters(model.named_parameters(), scope)
        self.reads_text = reads_text_encoder(n for n, _ in self.parameters)
        self.fuse = getattr(objective, "fused", False)  # turned off for good by an out-of-memory in a fused pass
        self.stack = True  # turned off for good by a stacked pass that failed: the next one would fail the same way

    @property
    def tensor_names(self) -> list[str]:
        return [n for n, _ in self.parameters]

    def gradient_sum(self, concept: Concept, samples: list[int]) -> GradientSum:
        """Sum over the given samples of dJ_s/dw, each sample's J_s being the mean over its points.

        Samples are processed in batches aligned on the global grid of `batch` sample indices (sample s is
        in batch s // batch): trajectories of a batch are sampled together and its points go through the
        forward/backward passes together. So a sample's numbers are the same in whatever block or shard
        it is computed; only the float64 additions of whole batches depend on the grouping (and, by float
        rounding, the chunk size, should an out-of-memory have halved it).
        """
        return self.gradient_sums([(concept, samples)])[0]

    def gradient_sums(self, parts: list[tuple[Concept, list[int]]]) -> list[GradientSum]:
        """`gradient_sum` of each (concept, samples), several concepts' batches stacked in one sampler call where
        they can be (`_stacks`: fused erase points, the same samples, Linear weights): each concept's gradient is
        then split from one backward pass (cad_ray.method.grouped_gradients). Otherwise each part on its own. A
        concept's numbers depend on the parts it is stacked with only by float rounding; callers stack the same
        parts whatever the number of workers."""
        params = [p for _, p in self.parameters]
        # the sums stay on the model's device until the end: at SD scale (149M components) moving every chunk's
        # gradients to the host would cost more than the chunk's own backward pass
        sums = [{n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in self.parameters}
                for _ in parts]
        objective_sums = [0.0] * len(parts)
        stacked = self._stacked_layers(parts)

        def add_gradients(i: int):
            for name, p in self.parameters:
                if p.grad is not None:  # None: the tensor does not influence J
                    sums[i][name].add_(p.grad)  # float64 += float32, exact promotion, no temporary
                    p.grad = None

        with gradients_for(params):
            if stacked is not None:
                for group in self._batches(parts[0][1]):
                    values = self._fused_stacked([(c, group) for c, _ in parts], stacked, sums)
                    if values is None:
                        break
                    objective_sums = [a + b for a, b in zip(objective_sums, values)]
                else:
                    return self._finished(parts, sums, objective_sums)
                # a stacked pass failed: every part again on its own, from zero
                sums = [{n: torch.zeros_like(v) for n, v in part.items()} for part in sums]
                objective_sums = [0.0] * len(parts)
            for i, (concept, samples) in enumerate(parts):
                for group in self._batches(samples):
                    if self._fuses(concept, group):
                        value = self._fused(concept, group)
                        if value is not None:
                            objective_sums[i] += value
                            add_gradients(i)
                            continue
                    points = self._fitting(partial(self.objective.points, self.model, concept, group, self.seed))
                    weight = points.weights()
                    start = 0
                    while start < len(points):
                        # a pass that ran out of memory added nothing to the sums: its points are redone in smaller
                        # chunks
                        done, value = self._fitting(partial(self._backward, concept, points, weight, start))
                        start += done
                        objective_sums[i] += value
                        add_gradients(i)
        return self._finished(parts, sums, objective_sums)

    def _batches(self, samples: list[int]) -> list[list[int]]:
        """The samples by batch of the global grid (sample s is in batch s // batch), in order."""
        batches: dict[int, list[int]] = {}
        for sample in samples:
            batches.setdefault(sample // self.batch, []).append(sample)
        return list(batches.values())

    def _finished(self, parts, sums, objective_sums) -> list[GradientSum]:
        for (concept, samples), part in zip(parts, sums):
            for name, total in part.items():
                # one check at the end suffices: a NaN or inf in any chunk's gradient leaves the sum non-finite
                if not torch.isfinite(total).all():
                    raise CadRayError(f"non-finite gradient (NaN or inf) in tensor {name} for concept "
                                      f"{concept.name!r}; check the model weights and the objective")
        return [GradientSum({n: v.cpu() for n, v in part.items()}, len(samples), value)
                for (_, samples), part, value in zip(parts, sums, objective_sums)]

    def _stacked_layers(self, parts: list[tuple[Concept, list[int]]]) -> dict[str, torch.nn.Linear] | None:
        """The scoped Linear layers, if `parts` go through the sampler together (else None): more than one, the
        same samples, each batch fused (`_fuses`) with all parts' rows in one chunk, and every scoped tensor a
        Linear layer's weight."""
        if not self.stack or len(parts) < 2 or any(list(samples) != list(parts[0][1]) for _, samples in parts):
            return None
        if not all(self._fuses(c, b) and len(parts) * len(b) <= self.chunk_size for c, _ in parts
                   for b in self._batches(parts[0][1])):
            return None
        try:
            return linear_modules(self.model.unet, self.parameters)
        except NotGroupable as why:
            log.info("concepts attributed one at a time: %s", why)
            return None

    def _fused_stacked(self, parts: list[tuple[Concept, list[int]]], layers: dict[str, torch.nn.Linear],
                       sums) -> list[float] | None:
        """`_fused` of several concepts' batches in one sampler call, each concept's dJ/dW added to its own
        `sums`; their weighted sums of J, or None after a CUDA out-of-memory or where a layer cannot be split
        (the sums are then part-filled: the caller starts again, one concept at a time)."""
        totals, waiting = [0.0] * len(parts), []

        def flush() -> None:
            if waiting:
                with torch.enable_grad():
                    weighted = torch.cat([v.double() * w.to(v.device) for v, w, _ in waiting])
                    weighted.sum().backward()
                labels = torch.cat([labels for _, _, labels in waiting]).to(weighted.device)
                for i, value in enumerate(torch.zeros(len(parts), dtype=torch.float64, device=weighted.device)
                                          .index_add_(0, labels, weighted.detach()).tolist()):
                    totals[i] += value
                waiting.clear()

        def backward(values: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor) -> None:
            if sum(len(v) for v, _, _ in waiting) + len(values) > self.chunk_size:
                flush()
            waiting.append((values, weights, labels))

        grouped = GroupedLinearGradients(layers, sums)
        failed = None
        try:
            with grouped:
                self.objective.fused_backward_stacked(self.model, parts, self.seed, backward,
                                                      lambda labels: setattr(grouped, "labels", labels))
                flush()
        except OUT_OF_MEMORY:
            failed = "out of device memory in a stacked pass"
        except NotGroupable as why:
            failed = str(why)
        if failed is None and any(p.grad is not None for _, p in self.parameters):
            failed = "a scoped weight got its gradient outside the split"
        if failed is None:
            return totals
        waiting.clear()
        for _, p in self.parameters:
            p.grad = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.stack = False
        log.warning("%s; attributing the concepts one at a time from now on", failed)
        return None

    def _fuses(self, concept: Concept, group: list[int]) -> bool:
        """Whether the group's points take their forward pass from the sampler (`EraseObjective.fused_backward`):
        an objective that asks for it (`fused`), a base prompt that is the sampler's negative prompt, no
        text-encoder components (their gradient flows through an encoding the sampler made without one), and at
        most a chunk of rows per pass."""
        return (self.fuse and self.objective.fusable(concept, group) and not self.reads_text
                and len(group) <= self.chunk_size)

    def _fused(self, concept: Concept, group: list[int]) -> float | None:
        """The group's weighted sum of J, its gradients accumulated in p.grad across the sampler's steps; None
        after a CUDA out-of-memory, with nothing left in p.grad (the caller then runs the separate passes, and
        so do later groups). The steps' points wait for one backward pass until a chunk is full: one pass per
        step would pay the autograd engine's fixed cost once per step."""
        total, waiting = 0.0, []

        def flush() -> None:
            nonlocal total
            if waiting:
                with torch.enable_grad():  # the last flush comes after the sampler's no_grad
                    weighted = torch.cat([v.double() * w.to(v.device) for v, w in waiting]).sum()
                    weighted.backward()
                total += float(weighted.detach())
                waiting.clear()

        def backward(values: torch.Tensor, weights: torch.Tensor) -> None:
            if sum(len(v) for v, _ in waiting) + len(values) > self.chunk_size:
                flush()
            waiting.append((values, weights))

        try:
            self.objective.fused_backward(self.model, concept, group, self.seed, backward)
            flush()
            return total
        except OUT_OF_MEMORY:
            waiting.clear()  # outside the except clause, the failed pass's frames (and tensors) are released
        for _, p in self.parameters:
            p.grad = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("out of device memory in the sampler's fused passes; using separate passes")
        self.fuse = False
        return None

    def _backward(self, concept: Concept, points: Points, weight: torch.Tensor, start: int,
                  size: int) -> tuple[int, float]:
        """Forward and backward pass over points[start:start + size], the gradients left in p.grad: returns the
        number of points it covered and their weighted sum of J."""
        chunk = points.chunk(start, start + size)
        values = point_values(self.model, reencoded(self.model, concept, chunk) if self.reads_text else chunk)
        total = (values.double() * weight[start:start + size].to(values.device)).sum()
        total.backward()
        return len(chunk), float(total.detach())

    def _fitting(self, step):
        """step(self.chunk_size); on a CUDA out-of-memory, free what the failed pass held, halve the chunk
        size and call step again, until it fits or a single point does not."""
        while True:
            try:
                return step(self.chunk_size)
            except OUT_OF_MEMORY:
                pass  # outside the except clause, the failed pass's frames (and tensors) are released
            for _, p in self.parameters:
                p.grad = None  # a partial backward may have left gradients: they must not reach the sums
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if self.chunk_size <= 1:
                raise CadRayError("out of device memory even with one point per pass (chunk_size 1); choose a "
                                  "smaller scope or batch, free the device of other work, or use a device with "
                                  "more memory")
            log.warning("out of device memory with %d points per pass; halving the chunk to %d points and retrying",
                        self.chunk_size, self.chunk_size // 2)
            self.chunk_size //= 2

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

    # what the attribution stage asks of every scoring method (the baselines' ConceptPrune has the same)
    def partial_sum(self, concept: Concept, samples: list[int]) -> GradientSum:
        return self.gradient_sum(concept, samples)

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """The shapes of the partial sums, per tensor: the scoped tensors' own."""
        return [(n, tuple(p.shape)) for n, p in self.parameters]
