"""Weight gradients split by part from one backward pass: several concepts' points in one batch, each concept's
dJ/dW summed apart.

Rows of a batch do not interact in the UNet (its norms and attentions are per image), so one backward pass of
the sum of every concept's J gives each row its own output gradient dY. For a Linear layer Y = X W^T the weight
gradient is a sum over rows, dW = sum_r dY_r^T X_r, so each concept's share is the same sum over its rows only:
one matmul per concept, the FLOPs of the single dW (as per-sample gradients are computed in Opacus). While a
`GroupedLinearGradients` is open, the scoped Linear layers run through `_GroupedLinear`, whose backward adds
each concept's dW to its float64 sum and gives autograd none (their `.grad` stays empty).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class NotGroupable(Exception):
    """A scoped weight that this split cannot serve: not a Linear layer's weight, or a layer whose batch rows are
    not the UNet's (images folded into other rows). The caller then attributes each part on its own."""


def linear_modules(root: torch.nn.Module, parameters) -> dict[str, torch.nn.Linear]:
    """The Linear layer whose weight each scoped parameter is; NotGroupable where one is not a Linear's weight."""
    owners = {}
    for module in root.modules():
        if isinstance(module, torch.nn.Linear):
            if id(module.weight) in owners:  # one weight in two layers: each call would need the split
                raise NotGroupable("a weight shared by two Linear layers")
            owners[id(module.weight)] = module
    modules = {}
    for name, p in parameters:
        if id(p) not in owners:
            raise NotGroupable(f"{name} is not a Linear layer's weight")
        layer = owners[id(p)]
        # a subclass's or a library's own forward (adapters, offloading) may do more than x W^T + b
        if "forward" in vars(layer) or type(layer).forward is not torch.nn.Linear.forward:
            raise NotGroupable(f"the layer of {name} has a forward of its own")
        modules[name] = owners[id(p)]
    return modules


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sink, name, labels):
        if x.shape[0] != len(labels):
            raise NotGroupable(f"{name} sees {x.shape[0]} rows in a pass of {len(labels)} images")
        ctx.save_for_backward(x.detach(), weight)
        ctx.sink, ctx.name, ctx.labels = sink, name, labels
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        ctx.sink.add(ctx.name, x, dy, ctx.labels)
        dx = dy @ weight.to(dy.dtype) if ctx.needs_input_grad[0] else None
        dbias = dy.flatten(0, -2).sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, dbias, None, None, None


class GroupedLinearGradients:
    """A context in which `modules` ({parameter name: Linear}) add dJ/dW of each part's rows to `sums[part][name]`
    (float64) in the backward pass, instead of one dW into `.grad`. `labels` (set before each forward pass with
    gradients) is the part index of each row of that pass, in non-decreasing order."""

    def __init__(self, modules: dict[str, torch.nn.Linear], sums: list[dict[str, torch.Tensor]]):
        self.modules, self.sums = modules, sums
        self.labels: torch.Tensor | None = None

    def __enter__(self) -> "GroupedLinearGradients":
        for name, module in self.modules.items():
            # an instance attribute shadows the class's forward for this module only, until __exit__
            module.forward = lambda x, name=name, module=module: self._forward(name, module, x)
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules.values():
            del module.forward

    def _forward(self, name: str, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.labels is None or not torch.is_grad_enabled():  # a pass without gradients: the layer as it is
            return F.linear(x, module.weight, module.bias)
        return _GroupedLinear.apply(x, module.weight, module.bias, self, name, self.labels)

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor, labels: torch.Tensor) -> None:
        parts, counts = torch.unique_consecutive(labels, return_counts=True)
        start = 0
        for part, count in zip(parts.tolist(), counts.tolist()):
            rows = slice(start, start + count)
            start += count
            grad = dy[rows].flatten(0, -2).t().matmul(x[rows].flatten(0, -2).to(dy.dtype))
            self.sums[part][name].add_(grad)  # float64 += the part's float32 dW, as the single path adds .grad
