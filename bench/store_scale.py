"""The score store at Stable Diffusion scale: a synthetic score table shaped like SD 1.4's feed-forward
scope (the real tensor names and shapes, 148.7M components per concept).

    python bench/store_scale.py [--root /tmp/cad-ray-store-bench] [--scale 1.0]

Measures write throughput, bytes per component on disk (the score table per concept; the weights table once per
run), the time of a top-100 query for one concept (weight and grad derived) and of
the per-layer summary, and compares with saving the gradient dict with torch.save as the published code does.
Weights and gradients are random normal with SD-like magnitudes; real tables compress about the same
(float mantissas are noise either way).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch


def sd14_ff_layout() -> list[tuple[str, tuple[int, int]]]:
    """Names and shapes of SD 1.4's feed-forward weights (`*.ff.net.0.proj.weight`, `*.ff.net.2.weight`)."""
    blocks = [(f"down_blocks.{b}.attentions.{a}", d) for b, d in ((0, 320), (1, 640), (2, 1280)) for a in range(2)]
    blocks += [("mid_block.attentions.0", 1280)]
    blocks += [(f"up_blocks.{b}.attentions.{a}", d) for b, d in ((1, 1280), (2, 640), (3, 320)) for a in range(3)]
    layout = []
    for prefix, d in blocks:
        base = f"{prefix}.transformer_blocks.0.ff.net"
        layout += [(f"{base}.0.proj.weight", (8 * d, d)), (f"{base}.2.weight", (d, 4 * d))]
    return layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/cad-ray-store-bench")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each tensor's rows (for a quick run)")
    args = parser.parse_args()

    from cad_ray.store import SCORE_SCHEMA, WEIGHT_SCHEMA, RunRoot, ScoreStore, aggregate_tables, score_parts, weight_parts

    layout = [(n, (max(1, int(r * args.scale)), c)) for n, (r, c) in sd14_ff_layout()]
    rng = np.random.default_rng(0)
    weights = {n: torch.from_numpy(rng.normal(0, 0.02, s).astype(np.float32)) for n, s in layout}
    grads = {n: torch.from_numpy(rng.normal(0, 1e-5, s)) for n, s in layout}
    names = [n for n, _ in layout]
    components = sum(int(np.prod(s)) for _, s in layout)

    shutil.rmtree(args.root, ignore_errors=True)
    run = RunRoot(args.root)
    identity = {"fingerprint": "synthetic", "config_hash": "synthetic"}
    run.write_manifest({"complete": True, "config": {"synthetic": True}, **identity})
    where = ("concept=synthetic", "objective=erase", "part-0.parquet")
    start = time.perf_counter()
    run.write_parts(SCORE_SCHEMA, score_parts(names, weights, grads), "scores", *where, metadata=identity)
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    run.write_parts(WEIGHT_SCHEMA, weight_parts(names, weights), "weights", "part-0.parquet", metadata=identity)
    weights_s = time.perf_counter() - start
    weights_size = os.path.getsize(os.path.join(args.root, "weights", "part-0.parquet"))
    start = time.perf_counter()
    neurons, layers = aggregate_tables(names, weights, grads)
    run.write_table(neurons, "neurons", *where, metadata=identity)
    run.write_table(layers, "layers", *where, metadata=identity)
    aggregate_s = time.perf_counter() - start
    size = os.path.getsize(os.path.join(args.root, "scores", *where))

    store = ScoreStore(args.root)
    start = time.perf_counter()
    top = store.top("synthetic", 100)
    top_s = time.perf_counter() - start
    start = time.perf_counter()
    summary = store.layers("synthetic")
    layers_s = time.perf_counter() - start
    expected = max(float((weights[n].double() * grads[n]).max()) for n in names)
    assert abs(top["score"].iloc[0] - expected) <= 1e-6 * abs(expected), "top-1 is wrong"

    start = time.perf_counter()
    torch.save({n: g.float() for n, g in grads.items()}, os.path.join(args.root, "grads.pt"))
    torch_s = time.perf_counter() - start
    torch_size = os.path.getsize(os.path.join(args.root, "grads.pt"))
    print(json.dumps({
        "components": components, "tensors": len(names), "threads": torch.get_num_threads(),
        "write_seconds": round(write_s, 1), "write_components_per_s": round(components / write_s),
        "bytes_per_component": round(size / components, 2), "scores_file_mb": round(size / 2**20, 1),
        "weights_table_bytes_per_component_once_per_run": round(weights_size / components, 2),
        "weights_write_seconds": round(weights_s, 1),
        "neurons_layers_seconds": round(aggregate_s, 1),
        "top100_seconds": round(top_s, 2), "layer_summary_seconds": round(layers_s, 3), "layer_rows": len(summary),
        "torch_save_seconds": round(torch_s, 1), "torch_save_bytes_per_component": round(torch_size / components, 2),
    }, indent=1))
    shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
