"""Issue 28: one concept on one machine is computed in this process unless Ray is asked for (Ray's start costs
more than the work it would spread: docs/benchmarks.md, "One concept without Ray")."""

import argparse

import pytest
import ray
import yaml
from conftest import SMALL

from cad_ray.cli import main
from cad_ray.commands.attribution import in_process


def flags(ray=False, address=None, workers=None, keep_workers=False):
    return argparse.Namespace(ray=ray, address=address, workers=workers, keep_workers=keep_workers)


@pytest.mark.parametrize("concepts, args, expected", [
    (1, flags(), True),
    (1, flags(workers=1), True),
    (2, flags(), False),                   # several concepts: Ray spreads them
    (1, flags(ray=True), False),           # asked for
    (1, flags(address="auto"), False),     # a running cluster named
    (1, flags(workers=2), False),          # more than one worker asked for
    (1, flags(keep_workers=True), False),  # workers kept on a cluster (without --address: refused)
])
def test_ray_starts_only_where_it_is_asked_for_or_has_several_concepts(concepts, args, expected):
    assert in_process(args, concepts) is expected


def test_one_concept_starts_no_ray_and_ray_starts_when_asked(tmp_path, monkeypatch, capsys):
    def refused(*args, **kwargs):
        raise RuntimeError("Ray was started")

    monkeypatch.setattr(ray, "init", refused)
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "samples": 2, "erase": {"steps": 3}, "concepts": [{"name": "seven"}]}))
    assert main(["attribute", "--config", str(config), "--root", str(tmp_path / "a"), "--show", "0"]) == 0
    assert "computed in this process" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="Ray was started"):
        main(["attribute", "--config", str(config), "--root", str(tmp_path / "b"), "--ray", "--quiet"])
