"""The paths that matter at Stable Diffusion size (issue 11): top-k by partition, `select` at `global`
granularity, tensor scores and weights read by dictionary code, `ScoreStore.top` reading the score column alone
and weights by row number, a pair of one shard reduced without a shard file, and validation's estimators and
localization on float32 scores with neurons found per subset. Each against what the code did before, on the same
data."""

import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cad_ray.distributed import run_attribution
from cad_ray.errors import CadRayError
from cad_ray.method.editing import select
from cad_ray.method.estimators import Coar, FirstOrder, NeuronMap, concentration, neuron_shares, top_set
from cad_ray.stages.validation import _flat_scores, localization
from cad_ray.store import RunRoot, ScoreStore
from cad_ray.store.tables import first_k, partition

from conftest import small_config


# --- the earlier implementations, as references ----------------------------------------------------------------

def old_select_global(scores, ratio=None, count=None, largest=True):
    key = {name: (s if largest else -s).astype(np.float64) for name, s in scores.items()}
    flat = np.concatenate([k.reshape(-1) for k in key.values()])
    n = flat.size
    how_many = min(count, n) if count is not None else min(max(1, int(round(ratio * n))), n)
    chosen = np.zeros(n, dtype=bool)
    order = np.argsort(-flat, kind="stable")[:how_many]
    chosen[order[flat[order] > 0]] = True
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[offset:offset + s.size].reshape(s.shape)
        offset += s.size
    return masks


def old_top(store, concept, k, negative, objective):
    order = [("score", "ascending" if negative else "descending")]
    scanner = store._dataset("scores").scanner(columns=["tensor", "index", "score"],
                                               filter=store._filter(concept, objective), batch_size=1 << 20)
    best = None
    for batch in scanner.to_batches():
        rows = pa.Table.from_batches([batch])
        rows = rows if best is None else pa.concat_tables([best, rows.cast(best.schema)])
        best = pc.take(rows, pc.select_k_unstable(rows, k=min(k, len(rows)), sort_keys=order))
    best = best.to_pandas().sort_values(["score", "tensor", "index"], ascending=[negative, True, True],
                                        kind="stable").reset_index(drop=True)
    best["tensor"] = best["tensor"].astype(str)
    best = store._with_weights(best, ["weight", "grad"])[["tensor", "index", "weight", "grad", "score"]]
    best.insert(0, "rank", np.arange(1, len(best) + 1))
    return best


def old_tensor_table(root, table, column, concept=None, objective=None):
    """{tensor: flat values by index} from a whole table read with pandas."""
    filters = [("concept", "==", concept), ("objective", "==", objective)] if concept else None
    frame = pd.read_parquet(os.path.join(root, table), filters=filters).astype({"tensor": str})
    out = {}
    for name, rows in frame.groupby("tensor", sort=False):
        values = np.empty(len(rows), dtype=np.float32)
        values[rows["index"].to_numpy()] = rows[column].to_numpy()
        out[name] = values
    return out


def old_neuron_index(shapes):
    """flat component -> neuron id, one int64 per component."""
    ids, offset = [], 0
    for shape in shapes:
        rows = shape[0] if len(shape) > 1 else 1
        per_row = int(np.prod(shape)) // rows
        ids.append(offset + np.repeat(np.arange(rows), per_row))
        offset += rows
    return np.concatenate(ids), offset


def old_neuron_shares(subsets, neuron_of, n_neurons):
    sizes = np.bincount(neuron_of, minlength=n_neurons)
    x = np.zeros((len(subsets), n_neurons))
    for row, subset in enumerate(subsets):
        x[row] = np.bincount(neuron_of[subset], minlength=n_neurons) / sizes
    return x


def old_first_order(scores, subsets):
    scores = np.asarray(scores, dtype=np.float64)
    return np.array([-scores[s].sum() for s in subsets])


def old_concentration(scores, shares=(0.001, 0.01)):
    magnitude = np.sort(np.abs(np.asarray(scores, dtype=np.float64)))[::-1]
    total = magnitude.sum()
    return {s: float(magnitude[:max(1, int(round(s * len(magnitude))))].sum() / total) if total else float("nan")
            for s in shares}


def old_top_set(scores, share):
    k = max(1, int(round(share * len(scores))))
    return np.argpartition(-np.asarray(scores), k - 1)[:k]


# --- first_k and select ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_first_k_is_the_head_of_a_stable_argsort(dtype):
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 3000))
        key = np.round(rng.normal(size=n), int(rng.integers(0, 3))).astype(dtype)  # few values: many ties
        if trial % 4 == 0:
            key[rng.choice(n, n // 3, replace=False)] = np.nan
        if trial % 5 == 0:
            key[rng.choice(n, n // 4, replace=False)] = -0.0
        for k in {0, 1, n // 7, n // 2, n - 1, n, n + 3}:
            got = np.sort(first_k(key, k))
            want = np.sort(np.argsort(key, kind="stable")[:k])
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("largest", [True, False])
def test_select_global_picks_what_the_full_stable_argsort_picked(dtype, largest):
    rng = np.random.default_rng(1)
    for trial in range(12):
        scores = {f"t{i}": np.round(rng.normal(size=shape), int(rng.integers(0, 2))).astype(dtype)
                  for i, shape in enumerate([(7, 5), (11,), (3, 4, 2), (1,)])}
        if trial % 3 == 0:  # mixed dtypes, as specific scores beside stored ones
            scores["t1"] = scores["t1"].astype(np.float64)
        for ratio in (0.01, 0.1, 0.33, 0.5, 1.0):
            got = select(scores, ratio=ratio, granularity="global", largest=largest)
            want = old_select_global(scores, ratio=ratio, largest=largest)
            assert list(got) == list(want)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])
        for count in (1, 5, 40, 1000):
            got = select(scores, count=count, granularity="global", largest=largest)
            want = old_select_global(scores, count=count, largest=largest)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])


def test_select_global_keeps_float32_input_in_float32(monkeypatch):
    import cad_ray.method.editing as editing

    seen = []
    real = editing.first_k
    monkeypatch.setattr(editing, "first_k", lambda key, k: seen.append(key.dtype) or real(key, k))
    select({"a": np.ones((4, 3), np.float32)}, ratio=0.5, granularity="global")
    assert seen == [np.float32]


# --- tensor scores, tensor weights, top --------------------------------------------------------------------

@pytest.mark.parametrize("concept, objective", [("seven", "erase"), ("seven", "amplify"), ("red", "erase")])
def test_tensor_scores_and_weights_match_the_whole_tables(small_run, concept, objective):
    store = ScoreStore(small_run)
    scores = store.tensor_scores(concept, objective)
    want = old_tensor_table(small_run, "scores", "score", concept, objective)
    assert list(scores) == list(want)
    for name, values in scores.items():
        assert values.dtype == np.float32
        np.testing.assert_array_equal(values.reshape(-1), want[name])
    weights = store.tensor_weights({n: s.shape for n, s in scores.items()})
    all_weights = old_tensor_table(small_run, "weights", "weight")
    for name, values in weights.items():
        assert values.shape == scores[name].shape
        np.testing.assert_array_equal(values.reshape(-1), all_weights[name])
    some = list(scores)[1:2]
    assert list(store.tensor_weights({n: scores[n].shape for n in some})) == some


def test_tensor_scores_refuse_a_table_with_a_component_twice(small_run, tmp_path):
    root = str(tmp_path / "run")
    shutil.copytree(small_run, root)
    path = os.path.join(root, "scores", partition("seven", "erase"), "part-0.parquet")
    table = pq.read_table(path)
    index = table.column("index").to_numpy().copy()
    index[1] = index[0]  # as many rows as components, one of them twice and one missing
    table = table.set_column(table.schema.get_field_index("index"), "index", pa.array(index))
    pq.write_table(table, path)
    with pytest.raises(CadRayError, match="rows for"):
        ScoreStore(root).tensor_scores("seven", "erase")
    ScoreStore(root).tensor_scores("red", "erase")  # the other concept is whole


@pytest.mark.parametrize("concept, objective", [("seven", "erase"), ("seven", "amplify"), ("red", "erase")])
@pytest.mark.parametrize("negative", [False, True])
def test_top_gives_what_it_gave_before(small_run, concept, objective, negative):
    store = ScoreStore(small_run)
    assert pq.ParquetFile(os.path.join(small_run, "weights", "part-0.parquet")).num_row_groups > 1
    for k in (1, 7, 100, 2500):
        got = store.top(concept, k, negative, objective)
        pd.testing.assert_frame_equal(got, old_top(store, concept, k, negative, objective))


def test_top_reads_the_score_column_and_the_winners_weights_only(small_run, monkeypatch):
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, columns=None, **kw: read.append(tuple(columns)) or real(self, i, columns, **kw))
    ScoreStore(small_run).top("seven", 10)
    assert set(read) == {("score",), ("weight",)}  # tensor and index from the row groups' statistics
    weights = pq.ParquetFile(os.path.join(small_run, "weights", "part-0.parquet"))
    assert read.count(("weight",)) <= 10 < weights.num_row_groups


def test_top_reads_tensor_and_index_where_a_row_group_holds_several_tensors(small_run, tmp_path):
    root = str(tmp_path / "run")
    shutil.copytree(small_run, root)
    want = ScoreStore(root).top("seven", 300, objective="amplify")
    for parts in (("scores", partition("seven", "amplify")), ("weights",)):
        path = os.path.join(root, *parts, "part-0.parquet")
        table = pq.read_table(path)
        pq.write_table(table, path, row_group_size=50_000)  # row groups across tensors
        assert pq.ParquetFile(path).num_row_groups > 1
    pd.testing.assert_frame_equal(ScoreStore(root).top("seven", 300, objective="amplify"), want)


def test_top_falls_back_to_the_join_when_the_weights_are_not_in_score_order(small_run, tmp_path):
    root = str(tmp_path / "run")
    shutil.copytree(small_run, root)
    want = ScoreStore(root).top("seven", 50)
    path = os.path.join(root, "weights", "part-0.parquet")
    table = pq.read_table(path)
    reversed_rows = table.take(pa.array(np.arange(len(table))[::-1]))  # the same rows, another order
    pq.write_table(reversed_rows, path)
    store = ScoreStore(root)
    rows = store.top("seven", 50)
    pd.testing.assert_frame_equal(rows, want)
    position = np.arange(3)
    assert store._weights_at(position, rows.head(3), len(table)) is None


# --- a pair of one shard -----------------------------------------------------------------------------------

def test_a_single_shard_pair_writes_no_shard_file_and_the_same_tables(tmp_path, monkeypatch):
    from cad_ray.stages.attribution_worker import AttributionWorker

    one = dict(samples=2, block=2, batch=2)
    kept = str(tmp_path / "kept")  # the shards written to _shards/ and reduced from the files
    run_attribution(small_config(keep_shards=True, **one), kept, local=True, progress=False)
    assert os.listdir(os.path.join(kept, "_shards"))

    written = []
    write_parts = RunRoot.write_parts

    def recording(self, schema, tables, *parts, **options):
        written.append("/".join(parts))
        return write_parts(self, schema, tables, *parts, **options)

    monkeypatch.setattr(RunRoot, "write_parts", recording)
    direct = str(tmp_path / "direct")
    manifest = run_attribution(small_config(**one), direct, local=True, progress=False)
    assert written and not any(p.startswith("_shards") for p in written)
    assert not os.path.exists(os.path.join(direct, "_shards"))
    assert manifest["complete"] and manifest["shards_computed"] == 3

    # killed in the reduce of the second pair: the resume recomputes its one shard, with the same result
    killed = str(tmp_path / "killed")
    finalize, calls = AttributionWorker.finalize, []

    def dies_on_the_second(self, *args, **options):
        calls.append(args[:2])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return finalize(self, *args, **options)

    monkeypatch.setattr(AttributionWorker, "finalize", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_attribution(small_config(**one), killed, local=True, progress=False)
    monkeypatch.setattr(AttributionWorker, "finalize", finalize)
    resumed = run_attribution(small_config(**one), killed, local=True, progress=False)
    assert resumed["shards_computed"] == 2  # the two pairs whose tables were not written
    assert not any(p.startswith("_shards") for p in written)

    for table in ("scores", "neurons", "layers"):
        want = pq.read_table(os.path.join(kept, table))
        for root in (direct, killed):
            assert pq.read_table(os.path.join(root, table)).equals(want), (table, root)
    for root in (direct, killed):
        store, reference = ScoreStore(root), ScoreStore(kept)
        for concept, objective in (("seven", "erase"), ("seven", "amplify"), ("red", "erase")):
            pd.testing.assert_frame_equal(store.top(concept, 20, objective=objective),
                                          reference.top(concept, 20, objective=objective))


def test_shards_are_byte_stream_split(tmp_path):
    root = str(tmp_path / "run")
    run_attribution(small_config(keep_shards=True, samples=4, block=2, concepts=[{"name": "red"}]), root,
                    local=True, progress=False)
    shard = os.path.join(root, "_shards", partition("red", "erase"), "shard-00000.parquet")
    assert "BYTE_STREAM_SPLIT" in pq.ParquetFile(shard).metadata.row_group(0).column(0).encodings


# --- validation: estimators and localization ----------------------------------------------------------------

SHAPES = [(7, 3), (5,), (4, 2, 3, 3), (1, 9), (6,), (3, 1)]  # linear, bias, conv, one row, one-element rows


def test_neuron_map_gives_the_dense_index_and_coar_features():
    neuron_of, n_neurons = old_neuron_index(SHAPES)
    neurons = NeuronMap(SHAPES)
    assert neurons.n_neurons == n_neurons
    every = np.arange(neuron_of.size)
    np.testing.assert_array_equal(neurons(every), neuron_of)
    np.testing.assert_array_equal(neurons(every.astype(np.int32)), neuron_of)  # compact_subset's indices
    np.testing.assert_array_equal(neurons.sizes, np.bincount(neuron_of, minlength=n_neurons))
    rng = np.random.default_rng(0)
    subsets = [np.sort(rng.choice(neuron_of.size, size, replace=False)).astype(np.int32) for size in (1, 5, 40, neuron_of.size)]
    np.testing.assert_array_equal(neuron_shares(subsets, neurons), old_neuron_shares(subsets, neuron_of, n_neurons))


def scores_with_ties(n, seed=0):
    """float32 scores rounded to few values (many ties, zeros among them), as a score table holds them."""
    rng = np.random.default_rng(seed)
    return np.round(rng.normal(size=n) * 20).astype(np.float32) / np.float32(7)


@pytest.mark.parametrize("n", [1_000, 300_001])  # above numpy's pairwise-summation blocks
def test_estimators_and_localization_on_float32_give_the_float64_results(n):
    scores = scores_with_ties(n)
    wide = scores.astype(np.float64)  # what validation used to hold
    rng = np.random.default_rng(1)
    subsets = [np.sort(rng.choice(n, size, replace=False)).astype(np.int32) for size in (1, n // 100, n // 10)]
    np.testing.assert_array_equal(FirstOrder(scores).predict(subsets), old_first_order(wide, subsets))
    assert concentration(scores) == old_concentration(wide)
    np.testing.assert_array_equal(np.sort(top_set(scores, 0.01)), np.sort(old_top_set(wide, 0.01)))
    assert top_set(scores, 0.01).base is None  # not a view that keeps argpartition's n indices alive


@pytest.mark.parametrize("concept", ["seven", "red"])
def test_validation_reads_float32_scores_and_gives_the_same_tables(small_run, concept):
    store = ScoreStore(small_run)
    scores, shapes = _flat_scores(store, concept, "erase")
    assert scores.dtype == np.float32
    want = np.concatenate([s.reshape(-1) for s in old_tensor_table(small_run, "scores", "score", concept,
                                                                    "erase").values()]).astype(np.float64)
    np.testing.assert_array_equal(scores, want)
    row, top = localization(concept, "erase", scores)
    shares = old_concentration(want)
    assert (row["top_0.1%_share"], row["top_1%_share"]) == (shares[0.001], shares[0.01])
    assert row["positive_share"] == float((want > 0).mean())
    np.testing.assert_array_equal(np.sort(top), np.sort(old_top_set(want, 0.01)))
    rng = np.random.default_rng(2)
    subsets = [np.sort(rng.choice(scores.size, scores.size // 50, replace=False)).astype(np.int32) for _ in range(5)]
    np.testing.assert_array_equal(FirstOrder(scores).predict(subsets), old_first_order(want, subsets))
    neuron_of, n_neurons = old_neuron_index(shapes)
    np.testing.assert_array_equal(Coar(shapes).features(subsets), old_neuron_shares(subsets, neuron_of, n_neurons))
