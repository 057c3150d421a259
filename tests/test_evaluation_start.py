"""The evaluation opens a pool of fine-tuning workers (each loads the model) only where it fine-tunes: the
model's default guidance is read on the pool the stage needs anyway (on Ray, a pool opened for one number
started every actor and loaded the model on each)."""

import shutil

import pandas as pd
import pytest
from conftest import small_config

from cad_ray.distributed import run_evaluation
from cad_ray.stages import edit_workers

EVALUATION = {"targets": ["seven"], "edits": ["cad-erase"], "ratios": [0.05], "images_per_prompt": 1, "steps": 4,
              "prompt_panel": "canonical"}


@pytest.mark.parametrize("guidance", [None, 3.0])
def test_no_fine_tuning_worker_is_started_where_nothing_is_fine_tuned(small_run, tmp_path, monkeypatch, guidance):
    def refused(*args, **kwargs):
        raise AssertionError("a fine-tuning worker was started")

    monkeypatch.setattr(edit_workers.EditWorker, "__init__", refused)
    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    config = small_config(evaluation={**EVALUATION, "guidance": guidance})
    run_evaluation(config, str(root), local=True, progress=False)
    rows = pd.read_parquet(root / "evaluation")
    # the rows are judged at the model's own guidance (3.0 for the digits model) where none is given
    assert set(rows["guidance"]) == {3.0}
