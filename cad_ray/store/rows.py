"""Rows of a (tensor, index, value) Parquet file looked up by row number, reading only the row groups that hold
them (`ScoreStore.top`: the best scores' tensor and index, and their weights)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def row_group_starts(table: pq.ParquetFile) -> np.ndarray:
    """The first row number of each row group of a Parquet file, and its row count last."""
    return np.cumsum([0] + [table.metadata.row_group(g).num_rows for g in range(table.num_row_groups)])


def rows_at(table: pq.ParquetFile, starts: np.ndarray, position: np.ndarray, column: str | None = None) -> dict:
    """{"tensor": names, "index": numpy, column: numpy} of the rows at `position` (row numbers) of a (tensor, index,
    value) Parquet file, reading only the row groups that hold them. A row group whose statistics say it holds
    one tensor and as many consecutive indices as rows (what `score_parts` and `weight_parts` write: a tensor's
    indices in order, a row group a slice of them) gives tensor and index without a read; others are read."""
    names = table.schema_arrow.names
    group = np.searchsorted(starts, position, side="right") - 1
    found = {"tensor": [None] * len(position), "index": np.empty(len(position), dtype=np.int64)}
    if column is not None:
        found[column] = np.empty(len(position), dtype=np.float64)
    for g in map(int, np.unique(group)):
        at = np.flatnonzero(group == g)
        offset = position[at] - starts[g]
        meta = table.metadata.row_group(g)
        tensor, index = (meta.column(names.index(c)).statistics for c in ("tensor", "index"))
        known = (tensor is not None and index is not None and tensor.has_min_max and index.has_min_max
                 and tensor.min == tensor.max and index.max - index.min + 1 == meta.num_rows)
        read = ([] if column is None else [column]) + ([] if known else ["tensor", "index"])
        rows = table.read_row_group(g, columns=read).take(pa.array(offset)) if read else None
        for i, name in zip(at, [tensor.min] * len(at) if known else rows.column("tensor").to_pylist()):
            found["tensor"][i] = name
        found["index"][at] = index.min + offset if known else rows.column("index").to_numpy()
        if column is not None:
            found[column][at] = rows.column(column).to_numpy()
    return found
