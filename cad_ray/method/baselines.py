"""The field's baselines beside CAD (core, no Ray), on the same score tables and the same judges.

Attribution methods (a `method` of the score tables; `cad` is w * dJ/dw itself):
- `gradient`: |dJ/dw|, the gradient without the weight (saliency), derived from CAD's table: |score / weight|;
- `magnitude`: |w|, the weight without the gradient (the same for every concept), from the run's weights table;
- `conceptprune` (Chavhan et al. 2024): Wanda importance |W_ij| * ||X_j||_2 of the inputs X of each transformer
  block's `ff.net.2` along the concept's guided trajectories. Its own partial sums (`ConceptPrune`), stored as
  the (concept, `conceptprune`) partition of the score tables.

Edit:
- `uce` (Gandikota et al. 2024): the closed-form edit of the cross-attention key and value projections that maps
  the target's text embeddings to a guide's outputs while preserving other prompts' (`uce_weights`).

How the published code does each, and where ours differs, is in docs/editing.md ("Baselines").
"""

from __future__ import annotations

import re

import numpy as np
import torch

from cad_ray.errors import CadRayError
from cad_ray.method.attribution import Attribution, GradientSum
from cad_ray.method.objectives import Concept
from cad_ray.models.base import NEGATIVE_PROMPT
from cad_ray.seeds import derive_seed

METHODS = ("cad", "gradient", "magnitude", "conceptprune")
DERIVED = ("gradient", "magnitude")  # computed from CAD's scores and the run's weights when read
FF_OUT = re.compile(r"(^|\.)ff\.net\.2\.weight$")
UCE_MODULES = re.compile(r"(^|\.)attn2\.to_[kv]\.weight$")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise CadRayError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def derived_scores(method: str, scores: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The simplest attributions, from CAD's scores and the weights: `gradient` |score / w| (0 where w = 0: the
    gradient is not recoverable there, and zeroing a zero weight changes nothing), `magnitude` |w|."""
    if method == "magnitude":
        return {n: np.abs(weights[n]).astype(np.float32) for n in scores}
    if method == "gradient":
        out = {}
        for n, s in scores.items():
            w = weights[n].astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[n] = np.where(w != 0, np.abs(s.astype(np.float64) / w), 0.0).astype(np.float32)
        return out
    raise CadRayError(f"method {method!r} is not derived from CAD's scores")


class ConceptPrune:
    """ConceptPrune's statistics and scores: `partial_sum(concept, samples)` -> GradientSum of squared activation
    norms, `finish(concept, total)` -> Attribution whose scores rank each `ff.net.2` weight.

    As the published code: the input of `ff.net.2` (the GEGLU output) at every UNet call of a guided trajectory,
    both guidance halves, each token's vector scaled to unit L2 norm, squared and summed per input column over
    tokens and samples; once for the concept's prompts and once for its base prompts from the same noise.
    At call t (t = 0 the noisiest), weight W_ij is skilled when column j is among the `int(k * in)` largest of
    row i by |W_ij| * A_t[j] and A_t[j] > A_base,t[j]; ConceptPrune prunes the union over the first `timesteps`
    calls. The stored score is 1 - m / in, with m the best (smallest) rank of W_ij over the calls where its
    column passes, and 0 where it never passes: so the published mask at skill ratio k is exactly the weights
    with m < int(k * in) (`conceptprune_masks`), and a top-k query ranks the earliest-skilled weights first.
    """

    name = "conceptprune"
    scope = "*ff.net.2.weight"

    def __init__(self, model, timesteps: int = 10, guidance: float | None = None, steps: int | None = None,
                 seed: int = 0, batch: int = 4):
        self.model, self.timesteps, self.guidance, self.steps = model, timesteps, guidance, steps
        self.seed, self.batch = seed, batch
        self.parameters = [(n, p) for n, p in model.named_parameters() if FF_OUT.search(n) and p.dim() == 2]
        if not self.parameters:
            raise CadRayError("ConceptPrune scores the feed-forward output layers (ff.net.2) of the transformer "
                              "blocks, and this model has none")
        calls = model.default_steps if steps is None else steps
        if timesteps > calls:
            raise CadRayError(f"conceptprune.timesteps ({timesteps}) exceeds the {calls} sampling steps")

    @property
    def tensor_names(self) -> list[str]:
        return [n for n, _ in self.parameters]

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """The shapes of the partial sums: (concept / base, call, input column) per tensor."""
        return [(n, (2, self.timesteps, p.shape[1])) for n, p in self.parameters]

    @torch.no_grad()
    def partial_sum(self, concept: Concept, samples: list[int]) -> GradientSum:
        sums = {n: torch.zeros(shape, dtype=torch.float64) for n, shape in self.layout()}
        side, calls = [0], {}

        def hook_for(name):
            def hook(module, inputs):
                call = calls.get(name, 0)
                calls[name] = call + 1
                if call < self.timesteps:
                    x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
                    x = torch.nn.functional.normalize(x, p=2, dim=1)
                    sums[name][side[0], call] += (x * x).sum(0).double().cpu()
            return hook

        modules = dict(self.model.unet.named_modules())
        handles = [modules[n[:-len(".weight")]].register_forward_pre_hook(hook_for(n)) for n in self.tensor_names]
        try:
            groups: dict[int, list[int]] = {}
            for s in samples:
                groups.setdefault(s // self.batch, []).append(s)
            for group in groups.values():
                prompts, bases = map(list, zip(*(concept.prompt(s) for s in group)))
                for which, texts in enumerate((prompts, bases)):
                    side[0] = which
                    calls.clear()
                    # the same starting noise for the concept and its base, as the published pairs (one seed)
                    self.model.sample(texts, seed=derive_seed(self.seed, concept.name, "trajectory"),
                                      guidance=self.guidance, steps=self.steps, ids=group)
        finally:
            for h in handles:
                h.remove()
        return GradientSum(sums, len(samples), 0.0)

    def finish(self, concept: Concept, total: GradientSum) -> Attribution:
        weights = {n: p.detach().float().cpu().clone() for n, p in self.parameters}
        grads = {}
        for name, w in weights.items():
            score = conceptprune_scores(w.double().numpy(), total.grads[name].numpy())
            w64 = w.double().numpy()
            # stored as score = weight * grad, so the tables' shape (and grad = score / weight) holds
            grads[name] = torch.from_numpy(np.where(w64 != 0, score / np.where(w64 != 0, w64, 1.0), 0.0))
        return Attribution(concept.name, self.name, weights, grads, None, total.samples)  # no objective J


def conceptprune_scores(weight: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """1 - m / in per weight (`ConceptPrune`), from the summed squares (2, calls, in) of one tensor's inputs."""
    target, base = np.sqrt(squares[0]), np.sqrt(squares[1])
    n_in = weight.shape[1]
    best = np.full(weight.shape, n_in, dtype=np.int64)
    magnitude = np.abs(weight)
    columns = np.arange(n_in)
    for t in range(target.shape[0]):
        importance = magnitude * target[t][None, :]
        order = np.argsort(-importance, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, columns[None, :].repeat(weight.shape[0], 0), axis=1)
        passes = (target[t] > base[t])[None, :] & (weight != 0)
        best = np.where(passes, np.minimum(best, rank), best)
    return np.where(best < n_in, 1.0 - best / n_in, 0.0)


def conceptprune_masks(scores: dict[str, np.ndarray], skill_ratio: float) -> dict[str, np.ndarray]:
    """The published ConceptPrune mask at `skill_ratio` k from stored scores: the weights skilled at some call,
    ranked among the `int(k * in)` first of their row there (m < int(k * in), with m = in * (1 - score))."""
    masks = {}
    for name, s in scores.items():
        n_in = s.shape[1]
        best = np.rint(n_in * (1.0 - s.astype(np.float64)))
        masks[name] = (s > 0) & (best < int(skill_ratio * n_in))
    return masks


def uce_weights(model, erase: list[str], preserve: list[str], guide: str = " ", lamb: float = 0.5,
                erase_scale: float = 1.0, preserve_scale: float | None = None) -> dict[str, torch.Tensor]:
    """UCE's closed-form edit (the paper's code), per cross-attention key and value projection W:

        W' = [lamb W + es sum_i (W c*_i) c_i^T + ps sum_j (W c_j) c_j^T] [lamb I + es sum_i c_i c_i^T
             + ps sum_j c_j c_j^T]^-1

    c_i: each erase prompt's token embeddings from its last word to the end of the sequence, paired with the
    guide's from its own last token (c*_i); c_j: every token of the empty prompt and of each `preserve` prompt,
    kept where W sent them. `preserve_scale` defaults to max(0.1, 1 / (1 + len(preserve))) as published.
    Returns the new weights by parameter name (float32, on the model's device)."""
    if not erase:
        raise CadRayError("UCE needs at least one prompt to erase")
    retain = [NEGATIVE_PROMPT] + [p for p in preserve if p not in erase]
    ps = max(0.1, 1.0 / len(retain)) if preserve_scale is None else preserve_scale
    with torch.no_grad():
        pairs = [erase_pair(model, p, guide) for p in erase]
        old = torch.cat([a for a, _ in pairs]).double()
        new = torch.cat([b for _, b in pairs]).double()
        kept = model.encode(retain).reshape(-1, old.shape[-1]).double()
        out = {}
        for name, p in model.named_parameters():
            if not (UCE_MODULES.search(name) and p.dim() == 2):
                continue
            w = p.detach().double()
            eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
            left = lamb * w + erase_scale * (w @ new.T) @ old + ps * (w @ kept.T) @ kept
            right = lamb * eye + erase_scale * old.T @ old + ps * kept.T @ kept
            out[name] = torch.linalg.solve(right.T, left.T).T.to(p.dtype)
    if not out:
        raise CadRayError("UCE edits the cross-attention key and value projections (attn2.to_k, attn2.to_v), and "
                          "this model has none")
    return out


def erase_pair(model, prompt: str, guide: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(erase tokens, guide tokens), aligned as the published code: from each prompt's last word (index
    length - 2, before the end token) to the end of the sequence, both slices cut to the same length."""
    emb = model.encode([prompt, guide])
    length = emb.shape[1]
    last = [n - 2 for n in model.token_lengths([prompt, guide])]
    farthest = max(last)
    old = emb[0, last[0]:length - max(0, farthest - last[0])]
    new = emb[1, last[1]:length - max(0, farthest - last[1])]
    return old, new
