"""Scopes: which parameters of the model are the components being attributed.

Denoiser (UNet) scopes: `ff` (default, as the published method): the 2-D weights of the feed-forward layers in
the transformer blocks (`...ff.net.0.proj.weight`, `...ff.net.2.weight`). `attn2`: cross-attention
projections. `attn`: self- and cross-attention projections. `linear`: every 2-D weight of the denoiser.
Text-encoder scopes (names prefixed `text_encoder.`): `text`: every text-encoder parameter; `tokens`: its
token-embedding table, one row per word of the vocabulary (zeroing rows there erases words, not pictures: a
prompt that avoids those words is not affected). `all`: every parameter of both. Anything else is a pattern: a
glob over parameter names (`*attn2.to_k.weight`) or, prefixed with `re:`, a regular expression.
"""

from __future__ import annotations

import fnmatch
import re

import numpy as np
import torch

from cad_ray.errors import CadRayError
from cad_ray.models.base import TEXT_ENCODER_PREFIX

def _denoiser(name: str) -> bool:
    return not name.startswith(TEXT_ENCODER_PREFIX)


NAMED_SCOPES = {
    "ff": lambda name, p: p.dim() == 2 and re.search(r"\.ff\.net\.\d+(\.proj)?\.weight$", name) is not None,
    "attn2": lambda name, p: p.dim() == 2 and ".attn2." in name,
    "attn": lambda name, p: p.dim() == 2 and (".attn1." in name or ".attn2." in name),
    "linear": lambda name, p: p.dim() == 2 and _denoiser(name),
    "text": lambda name, p: not _denoiser(name),
    "tokens": lambda name, p: not _denoiser(name) and name.endswith("embeddings.token_embedding.weight"),
    "all": lambda name, p: True,
}


def scope_matcher(scope: str):
    """A predicate over (name, parameter). `a+b` is the union of scopes a and b (one attribution run then serves
    edits in either part)."""
    if "+" in scope and not scope.startswith("re:"):
        parts = [scope_matcher(part) for part in scope.split("+")]
        return lambda name, p: any(match(name, p) for match in parts)
    if scope in NAMED_SCOPES:
        return NAMED_SCOPES[scope]
    if scope.startswith("re:"):
        try:
            pattern = re.compile(scope[3:])
        except re.error as e:
            raise CadRayError(f"scope {scope!r} is not a valid regular expression: {e}") from None
        return lambda name, p: pattern.search(name) is not None
    return lambda name, p: fnmatch.fnmatchcase(name, scope)


def select_parameters(named_parameters, scope: str = "ff") -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs in `scope`, in the model's order. A scope that matches nothing is an error."""
    named = list(named_parameters)
    match = scope_matcher(scope)
    selected = [(n, p) for n, p in named if match(n, p)]
    if not selected:
        examples = ", ".join(n for n, _ in named[:3])
        raise CadRayError(f"scope {scope!r} matches no parameter of the model; use one of "
                          f"{', '.join(NAMED_SCOPES)}, a glob or re:REGEX over names such as {examples}")
    return selected


SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|startoftext|>", "<|endoftext|>")


def special_token_ids(model) -> list[int]:
    """Ids of the tokens that frame every prompt (start, end, padding): no concept's word."""
    tokenizer = model.tokenizer
    vocabulary = tokenizer.ids if hasattr(tokenizer, "ids") else tokenizer.get_vocab()
    ids = {int(vocabulary[t]) for t in SPECIAL_TOKENS if t in vocabulary}
    ids |= {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    return sorted(ids)


def never_selected(model) -> dict[str, np.ndarray]:
    """Components no selection may take, as boolean masks by tensor name: the token table's rows of the special
    tokens. They are in every prompt, the empty one used for guidance included, so zeroing them changes every
    image, not a concept's."""
    ids = special_token_ids(model)
    protected = {}
    for name, p in model.named_parameters():
        if NAMED_SCOPES["tokens"](name, p) and ids:
            rows = np.zeros(p.shape, dtype=bool)
            rows[[i for i in ids if i < p.shape[0]]] = True
            protected[name] = rows
    return protected


def reads_text_encoder(names) -> bool:
    """Whether a scope's tensors include text-encoder weights: then the conditioning must be recomputed from the
    prompts wherever those weights change or are differentiated."""
    return any(not _denoiser(name) for name in names)
