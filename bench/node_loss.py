"""What losing a GPU node costs a run: the digits attribution on a local 3-node cluster (each node
advertising one GPU), once without failure and once with a node removed (not gracefully) after the
first shards are written.

    python bench/node_loss.py
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path


def timed_run(config, lose_node: bool) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from cad_ray.distributed import run_attribution

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(3)]
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
    from cad_ray.config import parse_config

    config = parse_config({"samples": 12, "block": 2, "batch": 2, "erase": {"steps": 10},
                           "concepts": [{"name": "seven"}, {"name": "two"}, {"name": "red"}]})
    clean, lossy = timed_run(config, False), timed_run(config, True)
    print(json.dumps({"failure_free": clean, "one_node_lost": lossy,
                      "added_seconds": round(lossy["run_seconds"] - clean["run_seconds"], 1)}, indent=1))


if __name__ == "__main__":
    main()
