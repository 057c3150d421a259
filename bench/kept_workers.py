"""Start-up paid once (issue 28): one concept's `cad-ray attribute`, wall time of the command, in four ways.

    python bench/kept_workers.py [--concepts three seven one] [--workers 1]

- `in-process`: the default for one concept (no Ray);
- `fresh-ray`: `--ray`, a local Ray started and stopped by the command;
- `running-ray`: `--address auto` on a Ray started before (`ray start --head`), new workers each command;
- `kept`: `--address auto --keep-workers`: the first command starts the workers, the next ones (another concept)
  find them with the model loaded.

The digits model, erase, 8 samples, T = 50, every point (jobs/configs/digits.yaml's settings). One JSON line per
command; the last line is the medians per mode (the `kept` median leaves out its first, cold, command).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """model: null
seed: 0
scope: ff+attn2+tokens
samples: 8
block: 4
chunk_size: 64
erase: {{steps: 50, points_per_sample: null}}
concepts: [{{name: {concept}}}]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", nargs="+", default=["three", "seven", "one"])
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    cad_ray, ray = str(bin_dir / "cad-ray"), str(bin_dir / "ray")
    work = Path(tempfile.mkdtemp(prefix="cad-ray-kept-"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    walls: dict[str, list[float]] = {}

    def command(mode: str, concept: str, *flags: str) -> None:
        config = work / f"{concept}.yaml"
        config.write_text(CONFIG.format(concept=concept))
        root = work / f"{mode}-{concept}"
        start = time.perf_counter()
        subprocess.run([cad_ray, "attribute", "--config", str(config), "--root", str(root), "--quiet", *flags],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        walls.setdefault(mode, []).append(wall)
        print(json.dumps({"mode": mode, "concept": concept, "wall_seconds": round(wall, 2)}), flush=True)

    try:
        for concept in args.concepts:
            command("in-process", concept)
            command("fresh-ray", concept, "--ray", "--workers", str(args.workers))
        subprocess.run([ray, "start", "--head", "--num-cpus", str(os.cpu_count()), "--include-dashboard", "false",
                        "--disable-usage-stats"], check=True, env=env, capture_output=True)
        try:
            for concept in args.concepts:
                command("running-ray", concept, "--address", "auto", "--workers", str(args.workers))
            for concept in args.concepts:
                command("kept", concept, "--address", "auto", "--workers", str(args.workers), "--keep-workers")
        finally:
            subprocess.run([cad_ray, "stop-workers", "--address", "auto"], env=env, capture_output=True)
            subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {mode: round(statistics.median(w[1:] if mode == "kept" else w), 2) for mode, w in walls.items()}
    print(json.dumps({"median_wall_seconds": medians, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
