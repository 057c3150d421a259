"""`ScoreStore`: queries over the score tables of a completed run, streaming where a table is large. What the scores
say an edit takes (a specific ranking, a selection's masks) is `selections`'s."""

from __future__ import annotations

import json
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cad_ray.config import AttributionConfig, parse_config
from cad_ray.errors import CadRayError
from cad_ray.method.ranking import first_k
from cad_ray.store.root import METADATA_KEY, PART_FILE, RunRoot, belongs
from cad_ray.store.rows import row_group_starts, rows_at
from cad_ray.store.selections import SelectionQueries, scored_partition
from cad_ray.store.tables import partition

# cad_ray.method.baselines is imported inside the method that uses it, for start-up speed only: it imports torch,
# which the plain queries ('cad-ray top', 'layers', 'overlap') never need

# Parquet that verifies page checksums where the writer stored them (`RunRoot.write_parts` does)
CHECKED_PARQUET = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))


class ScoreStore(SelectionQueries):
    """Queries over the score tables of a completed run (and what they say an edit takes: `SelectionQueries`).

    A run that has not completed is refused unless `allow_incomplete=True`.
    """

    def __init__(self, root: str, allow_incomplete: bool = False):
        self.run = RunRoot(root)
        manifest = self.run.read_manifest()
        if manifest is None or not self.run.exists("scores"):
            raise CadRayError(f"no score tables under {root}: run 'cad-ray attribute' with this --root first")
        if not manifest.get("complete") and not allow_incomplete:
            raise CadRayError(f"the run in {root} did not complete; re-run 'cad-ray attribute' with the same "
                              "config to finish it (top, layers and overlap read it as it is with --allow-incomplete)")
        self.manifest = manifest

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @cached_property
    def config(self) -> AttributionConfig:
        """The run's config as its manifest records it (with the later stages' options it was made with), parsed
        into the config model once: the one reader of the manifest's config."""
        return parse_config({**self.manifest["config"], **self.manifest.get("stage_options", {})},
                            self.run.uri_under("_manifest.json"))

    def concepts(self) -> pd.DataFrame:
        """(concept, objective) pairs that have score tables (from the partition folders: one listing)."""
        pairs = []
        for path in sorted(self.run.fs.glob(self.run.join("scores", "concept=*", "objective=*"))):
            concept, objective = path.rstrip("/").split("/")[-2:]
            pairs.append((concept.split("=", 1)[1], objective.split("=", 1)[1]))
        return pd.DataFrame(pairs, columns=["concept", "objective"])

    def _dataset(self, table: str) -> ds.Dataset:
        return ds.dataset(self.run.join(table), filesystem=self._arrow_fs(), format=CHECKED_PARQUET,
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

    def check_whole(self, table: str, concept: str, objective: str) -> None:
        """One line naming a table file that is missing, damaged or not of this run, and the repair."""
        parts = (table, partition(concept, objective), PART_FILE)
        footer = self.run.footer(*parts)
        if footer is None:
            problem = "is missing or damaged"
        elif not belongs(footer, self.manifest):
            problem = "was written for another model or config than the run's manifest names"
        else:
            return
        raise self._damaged(parts, problem)

    def _damaged(self, parts, problem: str = "is missing or damaged") -> CadRayError:
        return CadRayError(f"{self.run.uri_under(*parts)} {problem}; repair it with 'cad-ray attribute --root "
                           f"{self.run.uri}' and the run's config (finished shards are kept)")

    def _read(self, table: str, concept: str | None, objective: str | None, **scan):
        """A table's rows of one (concept, objective) (all with None); a file whose pages do not decode is named in
        one line."""
        try:
            return self._dataset(table).to_table(filter=self._filter(concept, objective), **scan)
        except (pa.ArrowInvalid, OSError):
            raise self._damaged((table, partition(concept, objective), PART_FILE)) from None

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
        """A concept's whole score table; `weight` and `grad` (= score / weight) are derived from the run's
        weights table when asked for (by default they are)."""
        self._check_known(concept, objective)
        self.check_whole("scores", concept, objective)
        derived = [c for c in ("weight", "grad") if columns is None or c in columns]
        stored = None if columns is None else [c for c in columns if c not in derived] or ["score"]
        table = self._read("scores", concept, objective, columns=stored).to_pandas()
        if derived:
            table = self._with_weights(table, derived)
        return table if columns is None else table[columns]

    def _with_weights(self, rows: pd.DataFrame, derived: list[str]) -> pd.DataFrame:
        """`rows` with the weight of each (tensor, index) from the weights table, and grad = score / weight (NaN
        where the weight is zero: the score is then zero whatever the gradient)."""
        parts = ("weights", PART_FILE)
        if self.run.ours(*parts, owner=self.manifest, keys=("fingerprint",)) is None:
            raise CadRayError(f"{self.run.uri_under(*parts)} is missing or damaged (runs written before cad-ray "
                              f"kept weights there lack it); add it with 'cad-ray attribute --root {self.run.uri}' "
                              "and the run's config")
        keys = rows[["tensor", "index"]].astype({"tensor": str})
        expr = pc.field("tensor").isin(sorted(set(keys["tensor"]))) if len(rows) < 1 << 20 else None
        if expr is not None:
            expr = expr & pc.field("index").isin(sorted(set(keys["index"].tolist())))
        try:
            weights = ds.dataset(self.run.join(*parts), filesystem=self._arrow_fs(), format=CHECKED_PARQUET).to_table(
                filter=expr).to_pandas()
        except (pa.ArrowInvalid, OSError):
            raise self._damaged(parts) from None
        weights["tensor"] = weights["tensor"].astype(str)
        merged = keys.merge(weights, on=["tensor", "index"], how="left")
        return _derived(rows, merged["weight"].to_numpy(), derived)

    def top(self, concept: str, k: int = 20, negative: bool = False, objective: str = "erase",
            method: str = "cad") -> pd.DataFrame:
        """The k components with the largest scores (or most negative with `negative`), streaming the table.
        Another `method` (`tensor_scores`) ranks by its scores, in the `score` column."""
        if k < 1:
            raise CadRayError(f"k must be at least 1, got {k}")
        if method != "cad":
            return self._top_of(self.tensor_scores(concept, objective, method), k, negative)
        self._check_known(concept, objective)
        self.check_whole("scores", concept, objective)
        parts = ("scores", partition(concept, objective), PART_FILE)
        try:
            with self.run.fs.open(self.run.join(*parts), "rb") as f:
                table = pq.ParquetFile(f, page_checksum_verification=True)
                starts = row_group_starts(table)
                # the score column alone, a row group at a time, keeping the k best with their row numbers: the
                # k smallest of -score (or score), ties to the earlier row, that is the run's tensor order, then
                # index (as the final sort below orders them)
                key, position = np.empty(0, np.float32), np.empty(0, np.int64)
                for group in range(table.num_row_groups):
                    scores = table.read_row_group(group, columns=["score"]).column(0).to_numpy()
                    scores = scores if negative else -scores
                    pick = np.sort(first_k(scores, k))
                    key = np.concatenate([key, scores[pick]])
                    position = np.concatenate([position, starts[group] + pick])
                    keep = np.sort(first_k(key, k))
                    key, position = key[keep], position[keep]
                order = np.lexsort((position, key))
                key, position = key[order], position[order]
                rows = rows_at(table, starts, position)
        except (pa.ArrowInvalid, OSError):
            raise self._damaged(parts) from None
        best = pd.DataFrame({"tensor": rows["tensor"], "index": rows["index"],
                             "score": (key if negative else -key).astype(np.float32)})
        weights = self._weights_at(position, best, starts[-1])
        best = (self._with_weights(best, ["weight", "grad"]) if weights is None
                else _derived(best, weights, ["weight", "grad"]))[["tensor", "index", "weight", "grad", "score"]]
        best.insert(0, "rank", np.arange(1, len(best) + 1))
        return best

    def _weights_at(self, position: np.ndarray, rows: pd.DataFrame, total: int) -> np.ndarray | None:
        """The weights of score-table rows looked up by row number in the weights table, which `weight_parts`
        writes in the same order as `score_parts` (the run's tensors in order, index 0..n-1 in each) and in small
        row groups; None (the caller joins on (tensor, index)) unless the weights table has as many rows as the
        score table (`total`) and the rows read hold the same (tensor, index)."""
        parts = ("weights", PART_FILE)
        if self.run.ours(*parts, owner=self.manifest, keys=("fingerprint",), rows=total) is None:
            return None
        try:
            with self.run.fs.open(self.run.join(*parts), "rb") as f:
                table = pq.ParquetFile(f, page_checksum_verification=True)
                found = rows_at(table, row_group_starts(table), position, "weight")
        except (pa.ArrowInvalid, OSError):
            raise self._damaged(parts) from None
        if found["tensor"] != list(rows["tensor"]) or not np.array_equal(found["index"], rows["index"].to_numpy()):
            return None
        return found["weight"]

    def _top_of(self, scores: dict[str, np.ndarray], k: int, negative: bool) -> pd.DataFrame:
        """`top` over tensor scores in memory (ties: the run's tensor order, then index)."""
        names = list(scores)
        flat = np.concatenate([scores[n].reshape(-1) for n in names]).astype(np.float64)
        sizes = np.cumsum([0] + [scores[n].size for n in names])
        pick = np.argsort(flat if negative else -flat, kind="stable")[:k]
        tensor_of = np.searchsorted(sizes, pick, side="right") - 1
        rows = pd.DataFrame({"tensor": [names[i] for i in tensor_of], "index": pick - sizes[tensor_of],
                             "score": flat[pick].astype(np.float32)})
        # no grad column: score / weight is CAD's gradient only for CAD's scores
        rows = self._with_weights(rows, ["weight"])[["tensor", "index", "weight", "score"]]
        rows.insert(0, "rank", np.arange(1, len(rows) + 1))
        return rows

    def layers(self, concept: str | None = None, objective: str | None = None) -> pd.DataFrame:
        if concept is not None:
            self._check_known(concept, objective)
            if objective is not None:
                self.check_whole("layers", concept, objective)
        table = self._read("layers", concept, objective).to_pandas()
        for col in ("concept", "objective"):
            table[col] = table[col].astype(str)
        return table

    def tensor_scores(self, concept: str, objective: str = "erase", method: str = "cad") -> dict[str, np.ndarray]:
        """Every scored tensor's scores, shaped like the tensor, in the run's tensor order. `method`: `cad` (the
        stored w * dJ/dw), `gradient` (|dJ/dw|) or `magnitude` (|w|), both derived from CAD's table and the
        weights, or `conceptprune` (its own partition; `objective` is then not used); see
        cad_ray.method.baselines."""
        from cad_ray.method.baselines import DERIVED, check_method, derived_scores  # torch: see the top

        objective = scored_partition(objective, check_method(method))
        if method in DERIVED:
            scores = self.tensor_scores(concept, objective)
            return derived_scores(method, scores, self.tensor_weights({n: s.shape for n, s in scores.items()}))
        self._check_known(concept, objective)
        layers = self.layers(concept, objective)
        self.check_whole("scores", concept, objective)
        shapes = {name: tuple(int(x) for x in shape.split("x"))
                  for name, shape in zip(layers["tensor"], layers["shape"])}

        def incomplete(name, rows, size):
            return CadRayError(f"the score table of {concept}/{objective} has {rows} rows for {name}, which has {size} "
                               f"components; repair it with 'cad-ray attribute --root {self.run.uri}'")

        return self._shaped(self._dataset("scores"), "score", shapes, ("scores", partition(concept, objective),
                            PART_FILE), incomplete, self._filter(concept, objective))

    def tensor_weights(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """The run's weights (the weights table) of the tensors named in `shapes`, shaped like them."""
        parts = ("weights", PART_FILE)
        if self.run.ours(*parts, owner=self.manifest, keys=("fingerprint",)) is None:
            raise self._damaged(parts)
        data = ds.dataset(self.run.join(*parts), filesystem=self._arrow_fs(), format=CHECKED_PARQUET)
        return self._shaped(data, "weight", shapes, parts,
                            lambda name, rows, size: self._damaged(parts, f"lacks the weights of {name}"),
                            pc.field("tensor").isin(sorted(shapes)))

    def _shaped(self, data: ds.Dataset, column: str, shapes: dict[str, tuple[int, ...]], parts, incomplete,
                filter=None) -> dict[str, np.ndarray]:
        """A (tensor, index, `column`) table as one float32 array per tensor of `shapes`, shaped like it (rows of
        other tensors are passed over), read a batch at a time. Tensors are told apart by their dictionary codes
        (one look-up of each batch's dictionary), never by comparing names row by row; a tensor is complete when
        it has as many rows as components and every component was seen. `incomplete(name, rows, size)` is the
        error for one that is not; `parts` names the file in the error for one that does not decode."""
        names = list(shapes)
        sizes = [int(np.prod(shapes[n])) for n in names]
        slot_of = {n: i for i, n in enumerate(names)}
        values = [np.empty(size, dtype=np.float32) for size in sizes]
        seen = [np.zeros(size, dtype=bool) for size in sizes]
        rows = np.zeros(len(names), dtype=np.int64)
        try:
            # one batch read ahead, not Arrow's 16: a batch is 64 MB, and more read-ahead read no faster (2 cores)
            # but held memory (Arrow's pool peaked at 1.7 GB reading one SD-size concept, about 1 GB with one)
            for batch in data.to_batches(columns=["tensor", "index", column], filter=filter, batch_size=1 << 22,
                                         batch_readahead=1, fragment_readahead=1):
                tensors = batch.column("tensor")
                slots = np.asarray([slot_of.get(n, -1) for n in tensors.dictionary.to_pylist()],
                                   dtype=np.int64)[tensors.indices.to_numpy()]
                index, value = batch.column("index").to_numpy(), batch.column(column).to_numpy()
                for slot in np.flatnonzero(np.bincount(slots + 1, minlength=len(names) + 1)[1:]):
                    here = slots == slot
                    at = index[here]
                    if at.min() < 0 or at.max() >= sizes[slot]:
                        raise incomplete(names[slot], rows[slot] + at.size, sizes[slot])
                    values[slot][at] = value[here]
                    seen[slot][at] = True
                    rows[slot] += at.size
        except (pa.ArrowInvalid, OSError):
            raise self._damaged(parts) from None
        finally:
            # Arrow's allocator keeps the pages of the batches read for its next allocations; give them back, or the
            # process keeps them beside the arrays it goes on to make from the scores
            pa.default_memory_pool().release_unused()
        out = {}
        for slot, name in enumerate(names):
            if rows[slot] != sizes[slot] or not seen[slot].all():
                raise incomplete(name, int(rows[slot]), sizes[slot])
            seen[slot] = None
            out[name] = values[slot].reshape(shapes[name])
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
        self.check_whole("neurons", concept, objective)
        return self._read("neurons", concept, objective).to_pandas()

    def overlap(self, concept_a: str, concept_b: str, k: int = 100, objective: str = "erase",
                negative: bool = False, method: str = "cad", method_b: str | None = None) -> dict:
        """Overlap of two concepts' top-k component sets: shared count and Jaccard index. With `method_b`, the
        second set is ranked by another method (the same concept twice: how far two methods agree)."""
        def signed(rows: pd.DataFrame, ranked_by: str) -> pd.DataFrame:
            # CAD's top-k beyond the scores of the sign asked for would count zero and opposite scores as shared
            if ranked_by != "cad":
                return rows
            return rows[rows["score"] < 0] if negative else rows[rows["score"] > 0]

        a = signed(self.top(concept_a, k, negative, objective, method), method)
        b = signed(self.top(concept_b, k, negative, objective, method_b or method), method_b or method)
        sa, sb = set(zip(a["tensor"], a["index"])), set(zip(b["tensor"], b["index"]))
        shared = len(sa & sb)
        return {"concept_a": concept_a, "concept_b": concept_b, "k": k, "shared": shared, "size_a": len(sa),
                "size_b": len(sb), "jaccard": shared / len(sa | sb) if sa | sb else 0.0}

    def metadata(self, concept: str, objective: str = "erase") -> dict:
        """The metadata stored in a score table (fingerprint, objective, config hash, code version)."""
        self._check_known(concept, objective)
        schema = pq.read_schema(self.run.join("scores", partition(concept, objective), PART_FILE),
                                filesystem=self._arrow_fs())
        return json.loads(schema.metadata[METADATA_KEY])


def _derived(rows: pd.DataFrame, weight: np.ndarray, derived: list[str]) -> pd.DataFrame:
    """`rows` with `weight` (one per row, NaN where unknown) and grad = score / weight as asked for (NaN where the
    weight is zero: the score is then zero whatever the gradient)."""
    out = rows.copy()
    w = np.asarray(weight, dtype=np.float64)
    if "weight" in derived:
        out["weight"] = w.astype(np.float32)
    if "grad" in derived:
        with np.errstate(divide="ignore", invalid="ignore"):
            out["grad"] = np.where(w != 0, rows["score"].to_numpy(dtype=np.float64) / w, np.nan).astype(np.float32)
    return out
