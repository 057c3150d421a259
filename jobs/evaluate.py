"""Ray job entry point for evaluate: the same arguments as `cad-ray evaluate`.

    ray job submit --working-dir . -- python jobs/evaluate.py --root s3://my-bucket/runs/digits --address auto
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir holds cad_ray/

from cad_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
