"""Ray's overhead: the attribution job on a local Ray instance against the same work in-process.

    python bench/ray_overhead.py [--config jobs/configs/digits.yaml] [--concepts 4]

Both runs use one worker with one torch thread, so they do the same work on the same resources; Ray
start-up and model loading are reported apart (`setup_seconds`) and excluded from the overhead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/digits.yaml")
    parser.add_argument("--concepts", type=int, default=4, help="first N concepts of the config")
    args = parser.parse_args()

    import ray
    import torch

    from cad_ray.config import load_config
    from cad_ray.distributed import run_attribution

    config = load_config(args.config)
    config = config.model_copy(update={"concepts": config.concepts[: args.concepts], "workers": 1})
    torch.set_num_threads(1)
    results = {}
    for mode in ("in-process", "ray"):
        root = tempfile.mkdtemp(prefix=f"cad-ray-{mode}-")
        try:
            m = run_attribution(config, root, local=(mode == "in-process"), progress=False)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            if mode == "ray":
                ray.shutdown()
        results[mode] = {"setup_seconds": round(m["setup_seconds"], 2),
                         "compute_seconds": round(m["run_seconds"] - m["setup_seconds"], 2),
                         "shards": m["shards_computed"]}
    overhead = results["ray"]["compute_seconds"] / results["in-process"]["compute_seconds"] - 1
    print(json.dumps({**results, "ray_overhead": round(overhead, 4)}, indent=1))


if __name__ == "__main__":
    main()
