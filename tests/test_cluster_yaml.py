"""cluster.yaml is valid for Ray's cluster launcher and keeps the cluster closed."""

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= t["min_workers"] for t in gpu_types)
    image = config["docker"]["image"]
    assert image.startswith("rayproject/ray:") and "ray-ml" not in image and "cu" in image.split(":")[1]
    assert any("pip install" in c and "cad-ray" in c for c in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE" not in (ROOT / "cluster.yaml").read_text().replace("never set RAY_AUTH_MODE", "")
