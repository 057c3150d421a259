import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SMALL = {"samples": 4, "block": 2, "batch": 2, "erase": {"steps": 8}, "amplify": {"points_per_sample": 6},
         "concepts": [{"name": "seven", "objectives": ["erase", "amplify"]}, {"name": "red"}]}


def small_config(**changes):
    """A small digits attribution config: two concepts, 4 samples of 8 steps."""
    from cad_ray.config import parse_config

    return parse_config({**SMALL, **changes})


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A completed attribution run of small_config() (read-only: copy it before writing into it)."""
    from cad_ray.distributed import run_attribution

    root = str(tmp_path_factory.mktemp("runs") / "small")
    run_attribution(small_config(), root, local=True, progress=False)
    return root


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Model downloads from s3:// go to a per-session cache, never the user's."""
    os.environ["CAD_RAY_CACHE"] = str(tmp_path_factory.mktemp("cad-ray-cache"))


@pytest.fixture(scope="session")
def digits_model():
    from cad_ray.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto's server), configured through the environment only."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def untrained_float64_model(seed: int):
    """An untrained digits model in float64, for identities that hold whatever the weights."""
    from cad_ray.models.digits import DigitsModel

    model = DigitsModel.build(seed=seed)
    for module in model.weight_modules().values():
        module.double()
    return model
