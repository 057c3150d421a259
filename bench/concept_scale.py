"""A cross-concept query over many concepts' score tables: "which components are in the top 0.1% of more than
50 concepts". Issue 28's thousand-concept plan (docs/benchmarks.md, "A thousand concepts: ImageNet-1k on SD 1.4").

    OMP_NUM_THREADS=1 python bench/concept_scale.py [--concepts 60] [--scale 0.01] [--more-than 50]
        [--fraction 0.001] [--root /tmp/cad-ray-concept-bench] [--json out.json]

Writes `--concepts` synthetic score tables shaped like SD 1.4's feed-forward scope (the real 32 tensor names, each
at `--scale` of its rows, as bench/store_scale.py does) through the job's own writer (`score_parts` +
`RunRoot.write_parts`), the weights table once, and, for each concept, a small `top` table: the row positions
(uint32: the run's component order, the same in every score table and in the weights table) and scores of the
concept's top `--fraction` (k = ceil(fraction * n)), computed from the scores in memory as a worker would when it
writes the concept's tables. That table is this benchmark's proposal; cad-ray does not write it.

Then, each in a fresh process (peak RSS and bytes read of that process alone), the same query three ways:

- `naive`: pandas over all concepts through the public API: `ScoreStore.scores(c, columns=[tensor, index, score])`
  for every concept, concatenated; rank within concept (`groupby(...).rank(method="first")`), keep rank <= k, count
  per (tensor, index), keep count > more_than.
- `scan`: no top table, streamed: per concept, the `score` column alone (row group by row group), its k best
  positions by partition (`first_k`), one uint16 counter per component.
- `top`: the top tables only: read every concept's positions, `np.bincount`, keep count > more_than, and name the
  winners (tensor, index) from the run's tensor offsets.

The three answers are checked equal. Gradients are random normal with a shared part (so concepts' scores
correlate, as real concepts' do) and a few hundred "hub" components that every concept uses strongly (so the
answer is not empty). Times are warm page cache on local disk (the files were just written): CPU cost of the query,
not S3 transfer; the bytes read are reported apart for that.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def layout(scale: float) -> list[tuple[str, tuple[int, int]]]:
    from store_scale import sd14_ff_layout

    return [(n, (max(1, int(r * scale)), c)) for n, (r, c) in sd14_ff_layout()]


def concept_name(i: int) -> str:
    return f"c{i:04d}"


TOP_OPTIONS = {"compression": "zstd", "write_page_checksum": True, "use_dictionary": False,
               "column_encoding": {"position": "DELTA_BINARY_PACKED", "score": "BYTE_STREAM_SPLIT"}}


def write_top(path: str, position: np.ndarray, score: np.ndarray, metadata: dict) -> None:
    """A top table: sorted uint32 positions (delta-encoded) and their float32 scores. Written with pyarrow here (the
    job's `RunRoot.write_table` would dictionary-encode the unique positions: 11 bytes a row instead of about 6)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cad_ray.store.root import METADATA_KEY

    schema = pa.schema([("position", pa.uint32()), ("score", pa.float32())],
                       metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"position": position.astype(np.uint32), "score": score.astype(np.float32)},
                            schema=schema), path, **TOP_OPTIONS)


def write(args) -> dict:
    import torch

    from cad_ray.store import SCORE_SCHEMA, WEIGHT_SCHEMA, RunRoot, score_parts, weight_parts
    from cad_ray.store.tables import first_k
    shapes = layout(args.scale)
    names = [n for n, _ in shapes]
    sizes = [int(np.prod(s)) for _, s in shapes]
    n = sum(sizes)
    k = math.ceil(args.fraction * n)
    rng = np.random.default_rng(0)
    flat_w = rng.normal(0, 0.02, n).astype(np.float32)
    # what concepts share: a dense part (correlation between concepts' scores) and hubs every concept uses strongly
    shared = rng.normal(0, 1e-5, n)
    hubs = rng.choice(n, size=max(1, n // 5000), replace=False)
    shared[hubs] = np.sign(flat_w[hubs]) * 2e-3 / np.maximum(np.abs(flat_w[hubs]), 1e-3) * 0.02
    offsets = np.cumsum([0] + sizes)

    def split(flat: np.ndarray) -> dict:
        return {name: torch.from_numpy(flat[offsets[i]:offsets[i + 1]].reshape(s))
                for i, (name, s) in enumerate(shapes)}

    weights = split(flat_w)
    shutil.rmtree(args.root, ignore_errors=True)
    run = RunRoot(args.root)
    identity = {"fingerprint": "synthetic", "config_hash": "synthetic"}
    run.write_manifest({"complete": True, "config": {"synthetic": True}, **identity})
    run.write_parts(WEIGHT_SCHEMA, weight_parts(names, weights), "weights", "part-0.parquet", metadata=identity)
    gen_s = write_s = top_s = 0.0
    for c in range(args.concepts):
        start = time.perf_counter()
        grad = 0.6 * shared + rng.normal(0, 1e-5, n)
        # share a random fraction of the hubs per concept (0.6-1.0), so counts spread below and above the cut
        drop = hubs[rng.random(hubs.size) > rng.uniform(0.6, 1.0)]
        grad[drop] = rng.normal(0, 1e-5, drop.size)
        gen_s += time.perf_counter() - start
        start = time.perf_counter()
        where = ("concept=" + concept_name(c), "objective=erase", "part-0.parquet")
        run.write_parts(SCORE_SCHEMA, score_parts(names, weights, split(grad)), "scores", *where, metadata=identity)
        write_s += time.perf_counter() - start
        start = time.perf_counter()
        # the top table from the scores in memory, as the worker writing the score table would (float32 as stored)
        score = (flat_w.astype(np.float64) * grad).astype(np.float32)
        pick = np.sort(first_k(-score, k))
        write_top(os.path.join(args.root, "top", *where), pick, score[pick], {**identity, "fraction": args.fraction})
        top_s += time.perf_counter() - start

    def size(table: str) -> int:
        total = 0
        for dirpath, _, files in os.walk(os.path.join(args.root, table)):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total

    return {"components_per_concept": n, "k_per_concept": k, "hubs": int(hubs.size),
            "generate_s": round(gen_s, 2), "write_scores_s": round(write_s, 2),
            "write_scores_components_per_s": round(n * args.concepts / write_s),
            "top_table_build_s_per_concept": round(top_s / args.concepts, 4),
            "scores_bytes": size("scores"), "scores_bytes_per_component": round(size("scores") / (n * args.concepts), 3),
            "top_bytes": size("top"), "top_bytes_per_row": round(size("top") / (k * args.concepts), 3),
            "weights_bytes": size("weights"), "write_peak_rss_gb": round(rss_gb(), 2)}


def answer_frame(tensor: list[str], index: np.ndarray, count: np.ndarray):
    import pandas as pd

    return (pd.DataFrame({"tensor": tensor, "index": np.asarray(index, dtype=np.int64),
                          "count": np.asarray(count, dtype=np.int64)})
            .sort_values(["tensor", "index"]).reset_index(drop=True))


def query(args) -> dict:
    """One method, in this (fresh) process."""
    import pandas as pd  # noqa: F401 (imported before the clock starts)
    import pyarrow.parquet as pq

    from cad_ray.store import ScoreStore
    from cad_ray.store.tables import first_k

    if args.method == "full-top":
        return full_top(args)
    shapes = layout(args.scale)  # imports torch (bench/store_scale.py): before the clock
    base_rss = current_rss_gb()
    start = time.perf_counter()
    store = ScoreStore(args.root)
    concepts = sorted(store.concepts()["concept"])
    names = [n for n, _ in shapes]
    offsets = np.cumsum([0] + [int(np.prod(s)) for _, s in shapes])
    n = int(offsets[-1])
    k = math.ceil(args.fraction * n)
    path = lambda table, c: os.path.join(args.root, table, f"concept={c}", "objective=erase", "part-0.parquet")
    read = 0
    if args.method == "naive":
        import pandas as pd

        frames = []
        for c in concepts:
            frame = store.scores(c, columns=["tensor", "index", "score"])
            frame["concept"] = c
            frames.append(frame)
            read += os.path.getsize(path("scores", c))
        df = pd.concat(frames, ignore_index=True)
        del frames
        df["concept"] = df["concept"].astype("category")
        rank = df.groupby("concept", observed=True)["score"].rank(ascending=False, method="first")
        top = df[rank.to_numpy() <= k]
        counts = top.groupby(["tensor", "index"], observed=True).size()
        counts = counts[counts > args.more_than].reset_index(name="count")
        result = answer_frame(counts["tensor"].astype(str).tolist(), counts["index"], counts["count"])
    else:
        count = np.zeros(n, dtype=np.uint16)
        for c in concepts:
            if args.method == "scan":
                table = pq.ParquetFile(path("scores", c), page_checksum_verification=True)
                column = table.schema_arrow.get_field_index("score")
                score = np.concatenate([table.read_row_group(g, columns=["score"]).column(0).to_numpy()
                                        for g in range(table.num_row_groups)])
                read += sum(table.metadata.row_group(g).column(column).total_compressed_size
                            for g in range(table.num_row_groups))
                count[first_k(-score, k)] += 1
                del score
            else:
                position = pq.read_table(path("top", c), columns=["position"],
                                         page_checksum_verification=True).column(0).to_numpy()
                read += os.path.getsize(path("top", c))
                count[position] += 1  # a concept's positions are distinct: O(k), not O(n)
        winners = np.flatnonzero(count > args.more_than)
        tensor_of = np.searchsorted(offsets, winners, side="right") - 1
        result = answer_frame([names[i] for i in tensor_of], winners - offsets[tensor_of], count[winners])
    seconds = time.perf_counter() - start
    out = os.path.join(args.root, f"answer-{args.method}.parquet")
    result.to_parquet(out)
    return {"method": args.method, "seconds": round(seconds, 2), "bytes_read": read,
            "peak_rss_gb": round(rss_gb(), 3), "rss_after_imports_gb": round(base_rss, 3),
            "answer_rows": len(result)}


SD14_FF = 148_684_800  # SD 1.4's ff scope (bench/store_scale.py's layout at scale 1)


def write_full_top(args) -> dict:
    """`--full-top` top tables at SD 1.4's real size (k = ceil(0.001 x 148,684,800) = 148,685 rows each), with
    synthetic contents: positions drawn uniformly (sorted; the real top set clusters in rows, which compresses
    better, so these bytes are an upper bound) and float32 scores, written as the small benchmark's are."""
    k = math.ceil(args.fraction * SD14_FF)
    rng = np.random.default_rng(1)
    root = args.root + "-full-top"
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    total = 0
    for c in range(args.full_top):
        # concept c shares the first 1,000 positions with every other concept (hubs), the rest its own
        position = np.unique(np.concatenate([np.arange(1000), rng.integers(1000, SD14_FF, k - 1000)]))
        while position.size < k:  # rare duplicates
            position = np.unique(np.concatenate([position, rng.integers(1000, SD14_FF, k - position.size)]))
        score = rng.lognormal(-13, 0.5, k).astype(np.float32)
        where = ("top", "concept=" + concept_name(c), "objective=erase", "part-0.parquet")
        write_top(os.path.join(root, *where), position, score, {"fingerprint": "synthetic", "fraction": args.fraction})
        total += os.path.getsize(os.path.join(root, *where))
    return {"concepts": args.full_top, "k": k, "bytes": total, "bytes_per_concept": round(total / args.full_top),
            "bytes_per_row": round(total / (k * args.full_top), 3), "write_s": round(time.perf_counter() - start, 1)}


def full_top(args) -> dict:
    """The `top` query over the full-size top tables, in this fresh process."""
    import pyarrow.parquet as pq

    root = args.root + "-full-top"
    base_rss = current_rss_gb()
    start = time.perf_counter()
    count = np.zeros(SD14_FF, dtype=np.uint16)
    read = 0
    concepts = sorted(os.listdir(os.path.join(root, "top")))
    for c in concepts:
        path = os.path.join(root, "top", c, "objective=erase", "part-0.parquet")
        position = pq.read_table(path, columns=["position"], page_checksum_verification=True).column(0).to_numpy()
        read += os.path.getsize(path)
        count[position] += 1
    winners = np.flatnonzero(count > args.more_than)
    seconds = time.perf_counter() - start
    return {"method": "full-top", "concepts": len(concepts), "seconds": round(seconds, 2), "bytes_read": read,
            "peak_rss_gb": round(rss_gb(), 3), "rss_after_imports_gb": round(base_rss, 3),
            "answer_rows": int(winners.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/cad-ray-concept-bench")
    parser.add_argument("--concepts", type=int, default=60)
    parser.add_argument("--scale", type=float, default=0.01, help="fraction of each SD 1.4 ff tensor's rows")
    parser.add_argument("--fraction", type=float, default=0.001, help="the top fraction of each concept")
    parser.add_argument("--more-than", type=int, default=50, help="concepts a component must be in the top of")
    parser.add_argument("--methods", default="top,scan,naive")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one query in this process
    parser.add_argument("--full-top", type=int, default=1000,
                        help="also write this many top tables of SD 1.4's real size and time the query over them (0: no)")
    parser.add_argument("--json")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(query(args)))
        return

    import pandas as pd
    import torch

    figures = {"concepts": args.concepts, "scale": args.scale, "fraction": args.fraction, "more_than": args.more_than,
               "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
               "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    figures.update(write(args))
    figures["queries"] = {}
    answers = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--root", args.root,
               "--scale", str(args.scale), "--fraction", str(args.fraction), "--more-than", str(args.more_than)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        figures["queries"][method] = result
        answers[method] = pd.read_parquet(os.path.join(args.root, f"answer-{method}.parquet"))
        print(json.dumps(result), file=sys.stderr)
    if args.full_top:
        figures["full_size_top_tables"] = write_full_top(args)
        cmd = [sys.executable, os.path.abspath(__file__), "--method", "full-top", "--root", args.root,
               "--fraction", str(args.fraction), "--more-than", str(args.more_than)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        figures["queries"]["full-top"] = result
        print(json.dumps(result), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(args.root + "-full-top", ignore_errors=True)
    first = next(iter(answers.values()))
    figures["answers_equal"] = all(a.equals(first) for a in answers.values())
    assert figures["answers_equal"], "the methods disagree"
    figures["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if not args.keep:
        shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
