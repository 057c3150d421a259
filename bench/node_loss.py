"""What losing a GPU node costs a run: the digits attribution on a local 3-node cluster (each node
advertising one GPU), without failure and with a node removed (not gracefully) after the first shards are
written, each `--repeats` times, alternating.

    python bench/node_loss.py [--samples 12] [--cpus-per-node 1] [--repeats 1]

On a machine with one GPU, the three nodes' actors share it (each node's GPU 0 is the same card).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


def timed_run(config, lose_node: bool, cpus_per_node: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from cad_ray.distributed import run_attribution

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=cpus_per_node, num_gpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="cad-ray-node-loss-"))
    result = {}
    try:
        driver = threading.Thread(target=lambda: result.update(run_attribution(config, str(root), progress=False)))
        driver.start()
        if lose_node:
            while len(list(root.rglob("shard-*.parquet"))) < 2:
                time.sleep(0.05)
            cluster.remove_node(nodes[0], allow_graceful=False)
        driver.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"run_seconds": round(result["run_seconds"], 1), "setup_seconds": round(result["setup_seconds"], 1),
            "workers_lost": result["workers_lost"], "shards": result["shards_computed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from cad_ray.config import parse_config

    config = parse_config({"samples": args.samples, "block": 2, "batch": 2, "erase": {"steps": 10},
                           "concepts": [{"name": "seven"}, {"name": "two"}, {"name": "red"}]})
    runs = {"failure_free": [], "one_node_lost": []}
    for _ in range(args.repeats):
        for name, lose in (("failure_free", False), ("one_node_lost", True)):
            runs[name].append(timed_run(config, lose, args.cpus_per_node))
            print(name, json.dumps(runs[name][-1]), flush=True)
    mean = {name: sum(r["run_seconds"] for r in rs) / len(rs) for name, rs in runs.items()}
    print(json.dumps({**runs, "added_seconds_mean": round(mean["one_node_lost"] - mean["failure_free"], 1)},
                     indent=1))


if __name__ == "__main__":
    main()
