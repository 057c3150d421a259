"""The whole pipeline against a real S3 endpoint on loopback (moto's server): attribute, validate, evaluate and
report with an s3:// root, then plain pandas queries from s3://; no credential is written anywhere."""

import json

import pandas as pd

from cad_ray.config import parse_config
from cad_ray.distributed import run_attribution, run_evaluation, run_validation
from cad_ray.models.loading import s3_filesystem
from cad_ray.stages.report import write_report
from cad_ray.status import root_status

CONFIG = {"samples": 2, "block": 2, "batch": 2, "erase": {"steps": 6}, "amplify": {"points_per_sample": 4},
          "concepts": [{"name": "seven", "objectives": ["erase", "amplify"]}, {"name": "red"}],
          "validation": {"fractions": [0.01], "ablations": 6, "eval_samples": 1, "eval_points_per_sample": 3,
                         "projections": 4, "sketch_points_per_sample": 3, "block": 3, "concepts": ["seven"]},
          "evaluation": {"targets": ["seven"], "edits": ["cad-erase", "finetune", "finetune+cad-amplify"],
                         "ratios": [0.05], "recovery_ratios": [0.05], "images_per_prompt": 1, "steps": 5, "prompt_panel": "canonical",
                         "selection": "all/global/others-mean",
                         "finetune": {"steps": 2, "samples": 1}}}


def test_attribute_validate_evaluate_report_on_s3(s3_endpoint):
    fs = s3_filesystem()
    fs.mkdir("cad-pipeline")
    root = "s3://cad-pipeline/run"
    config = parse_config(CONFIG)
    run_attribution(config, root, local=True, progress=False)
    run_validation(config, root, local=True, progress=False)
    run_evaluation(config, root, local=True, progress=False)
    report = write_report(root)
    assert report == f"{root}/report.html" and fs.exists("cad-pipeline/run/report.html")

    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    validation = pd.read_parquet(f"{root}/validation", storage_options=options)
    assert len(validation) == 6 * 3 and set(validation["estimator"]) == {"cad", "cad2", "coar"}
    evaluation = pd.read_parquet(f"{root}/evaluation", storage_options=options)
    assert set(evaluation["edit"]) == {"none", "cad-erase", "finetune", "finetune+cad-amplify"}
    assert len(evaluation) == 4 * 10
    assert fs.exists("cad-pipeline/run/edits/finetune-seven/model/model_index.json")

    written = [p for p in fs.find("cad-pipeline/run") if p.endswith((".json", ".parquet", ".html"))]
    for path in written:
        data = fs.cat_file(path)
        assert b"testing" not in data and s3_endpoint.encode() not in data, path  # no key, no endpoint
    manifest = json.loads(fs.cat_file("cad-pipeline/run/_validation.json"))
    assert manifest["complete"] is True

    status = root_status(root).set_index("stage")  # one listing of the bucket prefix
    assert status["complete"].all()
    assert (status.loc["attribution", "done"], status.loc["attribution", "total"]) == (3, 3)
    assert (status.loc["validation", "done"], status.loc["validation", "total"]) == (3, 3)
