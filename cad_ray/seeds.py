"""Seeds derived from names, so that every random draw depends on what it is for and not on who draws it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from (run seed, concept, sample index, ...), stable across processes and platforms."""
    digest = hashlib.blake2b(json.dumps([str(p) if not isinstance(p, int) else p for p in parts]).encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def torch_generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def numpy_rng(*parts) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))
