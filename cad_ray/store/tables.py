"""The tables' shapes: the score schema, partitions, table metadata, and the score/neuron/layer tables of one
(concept, objective)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from cad_ray import __version__
from cad_ray.method.ranking import first_k  # noqa: F401 (re-exported: its old home)

SCORE_SCHEMA = pa.schema([
    ("tensor", pa.dictionary(pa.int32(), pa.string())),
    ("index", pa.int64()),
    ("score", pa.float32()),
])
# the scoped weights, once per run (they are the same for every concept): readers derive grad = score / weight
WEIGHT_SCHEMA = pa.schema([
    ("tensor", pa.dictionary(pa.int32(), pa.string())),
    ("index", pa.int64()),
    ("weight", pa.float32()),
])


def partition(concept: str, objective: str) -> str:
    return f"concept={concept}/objective={objective}"


def table_metadata(manifest: dict, concept: str, objective: str, extra: dict | None = None) -> dict:
    return {"concept": concept, "objective": objective, "fingerprint": manifest["fingerprint"],
            "config_hash": manifest["config_hash"], "config": manifest["config"], "code_version": __version__,
            "model": manifest.get("model"), **(extra or {})}


def _as_numpy(values) -> np.ndarray:
    return values.double().numpy() if hasattr(values, "numpy") else np.asarray(values, dtype=np.float64)


def _tensor_parts(tensor_names: list[str], column: str, values_of, schema: pa.Schema) -> Iterator[pa.Table]:
    dictionary = pa.array(tensor_names, pa.string())
    for code, name in enumerate(tensor_names):
        values = values_of(name)
        n = values.size
        yield pa.table({
            "tensor": pa.DictionaryArray.from_arrays(pa.array(np.full(n, code, np.int32)), dictionary),
            "index": pa.array(np.arange(n, dtype=np.int64)),
            column: pa.array(values.astype(np.float32)),
        }, schema=schema)


def score_parts(tensor_names: list[str], weights: dict, grads: dict) -> Iterator[pa.Table]:
    """The score table of one concept and objective, one tensor at a time (so it streams at SD scale).

    Scores are computed in float64 (w * mean grad) and stored as float32; weight and gradient are not stored
    beside them (`weight_parts` holds the weights once per run), which keeps a table near 4 bytes a component.
    """
    return _tensor_parts(tensor_names, "score", lambda n: (_as_numpy(weights[n]) * _as_numpy(grads[n])).reshape(-1),
                         SCORE_SCHEMA)


def weight_parts(tensor_names: list[str], weights: dict) -> Iterator[pa.Table]:
    """The weights table of a run (`weights/part-0.parquet`): the scoped weights as float32."""
    return _tensor_parts(tensor_names, "weight", lambda n: _as_numpy(weights[n]).reshape(-1), WEIGHT_SCHEMA)


def aggregate_tables(tensor_names: list[str], weights: dict, grads: dict) -> tuple[pa.Table, pa.Table]:
    """(neurons, layers): float64 sums of the scores per output row and per tensor."""
    neuron_rows, layer_rows = [], []
    for name in tensor_names:
        w, g = _as_numpy(weights[name]), _as_numpy(grads[name])
        s = (w * g).reshape(-1)
        rows = s.reshape(w.shape[0], -1) if w.ndim > 1 else s.reshape(-1, 1)
        neuron_rows.append(pd.DataFrame({
            "tensor": name, "row": np.arange(rows.shape[0], dtype=np.int64), "sum": rows.sum(1),
            "sum_positive": np.where(rows > 0, rows, 0).sum(1), "sum_negative": np.where(rows < 0, rows, 0).sum(1),
            "count": np.full(rows.shape[0], rows.shape[1], dtype=np.int64)}))
        layer_rows.append({"tensor": name, "shape": "x".join(map(str, w.shape)), "sum": s.sum(),
                           "sum_positive": s[s > 0].sum(), "sum_negative": s[s < 0].sum(),
                           "sum_abs": np.abs(s).sum(), "count": s.size})
    neurons = pa.Table.from_pandas(pd.concat(neuron_rows, ignore_index=True), preserve_index=False)
    layers = pa.Table.from_pandas(pd.DataFrame(layer_rows), preserve_index=False)
    return neurons, layers
