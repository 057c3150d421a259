"""The run root and its Parquet tables: the only interface between stages.

    <root>/_manifest.json                                  config, fingerprint, code version, completion
    <root>/_shards/concept=<c>/objective=<o>/shard-NNNNN.parquet   partial gradient sums (float64), for resume
    <root>/scores/concept=<c>/objective=<o>/part-0.parquet  one row per component
    <root>/neurons/concept=<c>/objective=<o>/part-0.parquet one row per output row of each tensor
    <root>/layers/concept=<c>/objective=<o>/part-0.parquet  one row per tensor

A root is a local path or `s3://bucket/prefix`. Every file is written under a temporary name and then
renamed (local) or put in one request (S3), so a crash never leaves a half-written table that looks whole.
Plain `pandas.read_parquet(root + "/scores", filters=[("concept", "==", "seven")])` works on every table.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from typing import Iterable, Iterator
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from . import __version__
from .errors import CadRayError

ROW_GROUP_SIZE = 1 << 22  # 4M rows: few row groups even at SD scale (148.7M components), bounded memory
METADATA_KEY = b"cad_ray"

SCORE_SCHEMA = pa.schema([
    ("tensor", pa.dictionary(pa.int32(), pa.string())),
    ("index", pa.int64()),
    ("weight", pa.float32()),
    ("grad", pa.float32()),
    ("score", pa.float32()),
])


def filesystem(root: str):
    """(fsspec filesystem, path without protocol) for a local path or an s3:// URI."""
    if str(root).startswith("s3://"):
        from .models.loading import s3_filesystem

        return s3_filesystem(), str(root)[len("s3://"):].rstrip("/")
    import fsspec

    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(str(root)))


def hidden_temporary(target: str) -> str:
    """A temporary name beside `target` that starts with a dot, so that Parquet dataset readers (which skip
    names starting with '.' or '_') never pick up a file left half-written by a crash."""
    path = PurePosixPath(target)
    return str(path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}"))


class RunRoot:
    """Reading and writing the files of one run root."""

    def __init__(self, root: str):
        self.uri = str(root).rstrip("/")
        self.fs, self.path = filesystem(self.uri)
        self.is_s3 = self.uri.startswith("s3://")

    def join(self, *parts: str) -> str:
        """A path under the root, for this root's filesystem (`self.fs`)."""
        return str(PurePosixPath(self.path, *parts))

    def uri_under(self, *parts: str) -> str:
        """A path under the root as a URI (s3:// kept): a root or a model location in its own right."""
        return "/".join([self.uri, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.join(*parts))

    def check_writable(self) -> None:
        """Fail early, before any compute, if the root cannot be written."""
        probe = self.join(f"._write_probe-{uuid.uuid4().hex}")
        try:
            if self.is_s3:
                bucket = self.path.split("/")[0]
                if not self.fs.exists(bucket):
                    raise CadRayError(f"cannot write to {self.uri}: bucket {bucket!r} does not exist")
            else:
                self.fs.makedirs(self.path, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except CadRayError:
            raise
        except Exception as e:
            raise CadRayError(f"cannot write to {self.uri}: {type(e).__name__}: {e}") from None

    def write_bytes(self, data: bytes, *parts: str) -> None:
        target = self.join(*parts)
        if self.is_s3:
            self.fs.pipe_file(target, data)  # a single PUT: the object appears whole or not at all
            return
        self.fs.makedirs(str(PurePosixPath(target).parent), exist_ok=True)
        tmp = hidden_temporary(target)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.join(*parts))

    def write_table(self, table: pa.Table, *parts: str, metadata: dict | None = None) -> None:
        self.write_parts(table.schema, [table], *parts, metadata=metadata)

    def write_parts(self, schema: pa.Schema, tables: Iterable[pa.Table], *parts: str,
                    metadata: dict | None = None) -> None:
        """Stream tables into one Parquet file (zstd, large row groups) that appears only when complete."""
        if metadata is not None:
            schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
        target = self.join(*parts)
        if self.is_s3:
            handle, tmp = tempfile.mkstemp(suffix=".parquet")
            os.close(handle)
        else:
            self.fs.makedirs(str(PurePosixPath(target).parent), exist_ok=True)
            tmp = hidden_temporary(target)
        try:
            options = {"compression": "zstd"}
            if "tensor" in schema.names:
                options["use_dictionary"] = ["tensor"]
            if "index" in schema.names:
                options["column_encoding"] = {"index": "DELTA_BINARY_PACKED"}
            with pq.ParquetWriter(tmp, schema, **options) as writer:
                for table in tables:
                    writer.write_table(table.cast(schema), row_group_size=ROW_GROUP_SIZE)
            if self.is_s3:
                self.fs.put_file(tmp, target)  # one upload: the object appears whole or not at all
            else:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read_table(self, *parts: str) -> pa.Table:
        with self.fs.open(self.join(*parts), "rb") as f:
            return pq.read_table(f)

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm(self.join(*parts), recursive=True)

    # --- manifest -------------------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        if not self.exists("_manifest.json"):
            return None
        try:
            return json.loads(self.read_bytes("_manifest.json"))
        except ValueError as e:
            raise CadRayError(f"{self.uri}/_manifest.json is corrupt: {e}") from None

    def write_manifest(self, manifest: dict) -> None:
        self.write_bytes((json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), "_manifest.json")


def partition(concept: str, objective: str) -> str:
    return f"concept={concept}/objective={objective}"


def table_metadata(manifest: dict, concept: str, objective: str, extra: dict | None = None) -> dict:
    return {"concept": concept, "objective": objective, "fingerprint": manifest["fingerprint"],
            "config_hash": manifest["config_hash"], "config": manifest["config"], "code_version": __version__,
            "model": manifest.get("model"), **(extra or {})}


def _as_numpy(values) -> np.ndarray:
    return values.double().numpy() if hasattr(values, "numpy") else np.asarray(values, dtype=np.float64)


def score_parts(tensor_names: list[str], weights: dict, grads: dict) -> Iterator[pa.Table]:
    """The score table of one concept and objective, one tensor at a time (so it streams at SD scale).

    Scores are computed in float64 (w * mean grad) and stored as float32.
    """
    dictionary = pa.array(tensor_names, pa.string())
    for code, name in enumerate(tensor_names):
        w, g = _as_numpy(weights[name]).reshape(-1), _as_numpy(grads[name]).reshape(-1)
        n = w.size
        yield pa.table({
            "tensor": pa.DictionaryArray.from_arrays(pa.array(np.full(n, code, np.int32)), dictionary),
            "index": pa.array(np.arange(n, dtype=np.int64)),
            "weight": pa.array(w.astype(np.float32)),
            "grad": pa.array(g.astype(np.float32)),
            "score": pa.array((w * g).astype(np.float32)),
        }, schema=SCORE_SCHEMA)


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


class ScoreStore:
    """Queries over the score tables of a completed run.

    A run that has not completed is refused unless `allow_incomplete=True`.
    """

    def __init__(self, root: str, allow_incomplete: bool = False):
        self.run = RunRoot(root)
        manifest = self.run.read_manifest()
        if manifest is None or not self.run.exists("scores"):
            raise CadRayError(f"no score tables under {root}: run 'cad-ray attribute' with this --root first")
        if not manifest.get("complete") and not allow_incomplete:
            raise CadRayError(f"the run in {root} did not complete; re-run 'cad-ray attribute' with the same "
                              "config to finish it, or pass allow_incomplete / --allow-incomplete")
        self.manifest = manifest

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def concepts(self) -> pd.DataFrame:
        """(concept, objective) pairs that have score tables."""
        return self.layers()[["concept", "objective"]].drop_duplicates().reset_index(drop=True)

    def _dataset(self, table: str) -> ds.Dataset:
        return ds.dataset(self.run.join(table), filesystem=self._arrow_fs(), format="parquet",
                          partitioning="hive")

    def _arrow_fs(self):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.run.fs))

    def _filter(self, concept: str | None, objective: str | None):
        expr = None
        for field, value in (("concept", concept), ("objective", objective)):
            if value is not None:
                e = pc.field(field) == value
                expr = e if expr is None else expr & e
        return expr

    def _check_known(self, concept: str, objective: str | None) -> None:
        known = self.concepts()
        rows = known[known["concept"] == concept]
        if objective is not None:
            rows = rows[rows["objective"] == objective]
        if rows.empty:
            pairs = ", ".join(f"{c}/{o}" for c, o in known.itertuples(index=False))
            raise CadRayError(f"no scores for concept {concept!r}" + (f" and objective {objective!r}" if objective
                              else "") + f" in {self.run.uri}; it has {pairs}")

    def scores(self, concept: str, objective: str = "erase", columns: list[str] | None = None) -> pd.DataFrame:
        self._check_known(concept, objective)
        return self._dataset("scores").to_table(columns=columns, filter=self._filter(concept, objective)).to_pandas()

    def top(self, concept: str, k: int = 20, negative: bool = False, objective: str = "erase") -> pd.DataFrame:
        """The k components with the largest scores (or most negative with `negative`), streaming the table."""
        if k < 1:
            raise CadRayError(f"k must be at least 1, got {k}")
        self._check_known(concept, objective)
        best: pd.DataFrame | None = None
        scanner = self._dataset("scores").scanner(columns=["tensor", "index", "weight", "grad", "score"],
                                                  filter=self._filter(concept, objective), batch_size=1 << 20)
        for batch in scanner.to_batches():
            if batch.num_rows == 0:
                continue
            score = batch.column("score").to_numpy(zero_copy_only=False)
            key = score if negative else -score
            pick = np.argpartition(key, min(k, len(key) - 1))[:k] if len(key) > k else np.arange(len(key))
            part = batch.take(pa.array(pick)).to_pandas()
            part["tensor"] = part["tensor"].astype(str)
            best = part if best is None else pd.concat([best, part], ignore_index=True)
            best = best.sort_values("score", ascending=negative, kind="stable").head(k)
        best = best.reset_index(drop=True)
        best.insert(0, "rank", np.arange(1, len(best) + 1))
        return best

    def layers(self, concept: str | None = None, objective: str | None = None) -> pd.DataFrame:
        if concept is not None:
            self._check_known(concept, objective)
        table = self._dataset("layers").to_table(filter=self._filter(concept, objective)).to_pandas()
        for col in ("concept", "objective"):
            table[col] = table[col].astype(str)
        return table

    def tensor_scores(self, concept: str, objective: str = "erase") -> dict[str, np.ndarray]:
        """Every scoped tensor's scores, shaped like the tensor, in the run's tensor order."""
        layers = self.layers(concept, objective)
        table = self._dataset("scores").to_table(columns=["tensor", "index", "score"],
                                                 filter=self._filter(concept, objective))
        tensors = table.column("tensor").combine_chunks()
        names = np.asarray(tensors.dictionary.to_pylist(), dtype=object)[tensors.indices.to_numpy()]
        index, score = table.column("index").to_numpy(), table.column("score").to_numpy()
        out = {}
        for name, shape in zip(layers["tensor"], layers["shape"]):
            shape = tuple(int(x) for x in shape.split("x"))
            rows = np.flatnonzero(names == name)
            values = np.empty(int(np.prod(shape)), dtype=np.float32)
            values[index[rows]] = score[rows]
            out[name] = values.reshape(shape)
        return out

    def table(self, name: str) -> pd.DataFrame:
        """A whole (small) table of the run root, such as `validation_summary` or `evaluation`."""
        if not self.run.exists(name):
            raise CadRayError(f"no {name!r} table in {self.run.uri}")
        table = self._dataset(name).to_table().to_pandas()
        for col in ("concept", "objective"):
            if col in table and isinstance(table[col].dtype, pd.CategoricalDtype):
                table[col] = table[col].astype(str)
        return table

    def neurons(self, concept: str, objective: str = "erase") -> pd.DataFrame:
        self._check_known(concept, objective)
        return self._dataset("neurons").to_table(filter=self._filter(concept, objective)).to_pandas()

    def overlap(self, concept_a: str, concept_b: str, k: int = 100, objective: str = "erase",
                negative: bool = False) -> dict:
        """Overlap of two concepts' top-k component sets: shared count and Jaccard index."""
        a = self.top(concept_a, k, negative, objective)
        b = self.top(concept_b, k, negative, objective)
        sa, sb = set(zip(a["tensor"], a["index"])), set(zip(b["tensor"], b["index"]))
        shared = len(sa & sb)
        return {"concept_a": concept_a, "concept_b": concept_b, "k": k, "shared": shared,
                "jaccard": shared / len(sa | sb) if sa | sb else 0.0}

    def metadata(self, concept: str, objective: str = "erase") -> dict:
        """The metadata stored in a score table (fingerprint, objective, config hash, code version)."""
        self._check_known(concept, objective)
        schema = pq.read_schema(self.run.join("scores", partition(concept, objective), "part-0.parquet"),
                                filesystem=self._arrow_fs())
        return json.loads(schema.metadata[METADATA_KEY])
