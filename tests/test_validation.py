"""The validation stage: estimators on models where the truth is known, the job's tables, worker invariance,
resume and bad input."""

import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_config

from cad_ray.method.attribution import CAD
from cad_ray.cli import main
from cad_ray.config import parse_config
from cad_ray.distributed import run_validation
from cad_ray.errors import CadRayError
from cad_ray.method.objectives import Concept, Points
from cad_ray.method.estimators import AblationEvaluator, SecondOrderSketch, quadratic_terms, random_subset
from cad_ray.stages.validation import predictions


class ToyModel(torch.nn.Module):
    """eps(x) = f(x . w) per point with one scoped tensor `blocks.0.ff.net.2.weight` (rows x cols).

    `kind="linear_j"`: eps = sqrt(1 + x . w) with target 0, so J = mean_p (1 + x_p . w) is exactly linear in w.
    `kind="linear_residual"`: eps = x . w, so J = mean_p (x_p . w - target_p)^2 is quadratic with a linear residual.
    """

    def __init__(self, weight: torch.Tensor, kind: str):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Module()])
        ff = torch.nn.Module()
        ff.net = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity(), torch.nn.Linear(1, 1)])
        ff.net[2].weight = torch.nn.Parameter(weight.clone().double(), requires_grad=False)
        self.blocks[0].ff = ff
        self.kind = kind

    @property
    def weight(self):
        return self.blocks[0].ff.net[2].weight

    def predict_noise(self, x, t, cond):
        z = (x.flatten(1) * self.weight.reshape(1, -1)).sum(1)
        out = torch.sqrt(1 + z) if self.kind == "linear_j" else z
        return out.view(-1, 1, 1, 1)


class ToyObjective:
    name, sign = "erase", 1.0

    def __init__(self, x: torch.Tensor, target: torch.Tensor):
        self.x, self.target = x, target

    def points(self, model, concept, samples, seed, chunk_size=256):
        rows = [i for s in samples for i in range(s * 4, s * 4 + 4)]  # 4 points per sample
        x = self.x[rows]
        n = len(rows)
        return Points(x, torch.zeros(n, dtype=torch.long), torch.zeros(n, 1), self.target[rows],
                      torch.tensor([r // 4 for r in rows]), self.sign)


def toy_setup(kind: str, rows=4, cols=8, samples=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "linear_j":
        # the contribution x . w of each component is the same within a row, so COAR's per-neuron regression
        # can represent the truth exactly
        weight = torch.ones(rows, cols, dtype=torch.float64)
        per_row = torch.rand(samples * 4, rows, 1, generator=g, dtype=torch.float64)
        x = per_row.expand(-1, rows, cols).reshape(samples * 4, 1, 1, rows * cols)
        target = torch.zeros(samples * 4, 1, 1, 1, dtype=torch.float64)
    else:
        weight = torch.randn(rows, cols, generator=g, dtype=torch.float64)
        x = torch.randn(samples * 4, 1, 1, rows * cols, generator=g, dtype=torch.float64)
        target = torch.randn(samples * 4, 1, 1, 1, generator=g, dtype=torch.float64)
    model = ToyModel(weight, kind)
    return model, ToyObjective(x, target), Concept("toy", ("toy",))


def toy_predictions(kind: str, projections: int, ablations: int = 40, fraction: float = 0.25):
    model, objective, concept = toy_setup(kind)
    samples = [0, 1, 2]
    scores = CAD(model, objective, "ff", seed=0, batch=4).attribute(concept, samples).scores
    flat = scores["blocks.0.ff.net.2.weight"].reshape(-1).numpy()
    evaluator = AblationEvaluator(model, objective, concept, "ff", samples, seed=0)
    uw = SecondOrderSketch(model, objective, "ff", projections, seed=0, batch=4).attribute(concept, samples)
    actual = pd.DataFrame([{"fraction": fraction, "ablation": a,
                            "actual": evaluator.change(random_subset(flat.size, fraction, a, 0)).frozen_base,
                            "actual_ablated_base": 0.0} for a in range(ablations)])
    sketch = pd.DataFrame([{"fraction": fraction, "ablation": a,
                            "quadratic": quadratic_terms(
                                uw[:, random_subset(flat.size, fraction, a, 0)].sum(axis=1, keepdims=True), 1.0)[0]}
                           for a in range(ablations)])
    config = parse_config({"concepts": [{"name": "toy"}], "validation": {"ablations": ablations,
                                                                         "fractions": [fraction]}})
    table = predictions(config, config.validation, flat, [tuple(model.weight.shape)], actual, sketch)
    return table.pivot_table(index="ablation", columns="estimator", values="predicted").join(
        actual.set_index("ablation")["actual"])


def test_on_a_linear_objective_cad_and_coar_predict_the_actual_change_exactly():
    table = toy_predictions("linear_j", projections=8)
    scale = np.abs(table["actual"]).max()
    assert scale > 0.1
    np.testing.assert_allclose(table["cad"], table["actual"], atol=1e-10 * scale)
    np.testing.assert_allclose(table["coar"], table["actual"], atol=1e-4 * scale)


def test_second_order_estimator_captures_the_quadratic_term_that_first_order_misses():
    table = toy_predictions("linear_residual", projections=4000)
    error = lambda col: np.abs(table[col] - table["actual"]).max() / np.abs(table["actual"]).max()  # noqa: E731
    assert error("cad2") < 0.1 < error("cad")
    assert np.corrcoef(table["cad2"], table["actual"])[0, 1] > 0.98


VALIDATION = {"fractions": [0.01, 0.05], "ablations": 8, "eval_samples": 2, "eval_points_per_sample": 4,
              "projections": 8, "sketch_points_per_sample": 4, "block": 3}


def validation_config(**changes):
    return small_config(validation={**VALIDATION, **changes})


@pytest.fixture(scope="module")
def validated(small_run, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("validated") / "run")
    shutil.copytree(small_run, root)
    result = run_validation(validation_config(), root, local=True, progress=False)
    return root, result


def test_validation_tables_plots_and_localization(validated):
    root, result = validated
    table = pd.read_parquet(os.path.join(root, "validation"))
    assert {"concept", "objective", "fraction", "ablation", "estimator", "predicted", "actual",
            "actual_ablated_base", "split"} <= set(table.columns)
    # two erase concepts x two fractions x 8 ablations x three estimators
    assert len(table) == 2 * 2 * 8 * 3
    assert set(table["estimator"]) == {"cad", "cad2", "coar"}
    cad = table[table["estimator"] == "cad"]
    assert cad["actual"].abs().max() > 0 and cad["predicted"].abs().max() > 0
    summary = pd.read_parquet(os.path.join(root, "validation_summary"))
    assert len(summary) == 2 * 3 * 2
    # the summary's statistics are those of the table's test-split rows, recomputed here
    test = table[table["split"] == "test"]
    for row in summary.itertuples():
        g = test[(test["concept"] == row.concept) & (test["estimator"] == row.estimator)
                 & (test["fraction"] == row.fraction)]
        assert row.ablations == len(g)
        assert row.pearson == pytest.approx(np.corrcoef(g["predicted"], g["actual"])[0, 1], nan_ok=True)
    assert (summary["pearson_low"] <= summary["pearson"] + 1e-12).all()
    assert (summary["pearson"] <= summary["pearson_high"] + 1e-12).all()
    shares = pd.read_parquet(os.path.join(root, "localization"))
    assert ((shares["top_0.1%_share"] > 0) & (shares["top_0.1%_share"] < shares["top_1%_share"])
            & (shares["top_1%_share"] <= 1)).all()
    overlap = pd.read_parquet(os.path.join(root, "overlap"))
    assert (overlap[overlap["concept_a"] == overlap["concept_b"]]["jaccard"] == 1).all()
    assert (overlap[overlap["concept_a"] != overlap["concept_b"]]["jaccard"] < 1).all()
    for name in ("seven.png", "red.png", "overlap.png"):
        with open(os.path.join(root, "plots", "validation", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_actual_changes_do_not_depend_on_the_number_of_workers(validated, small_run, tmp_path):
    root, _ = validated
    other = str(tmp_path / "ray")
    shutil.copytree(small_run, other)
    result = run_validation(validation_config().model_copy(update={"workers": 2}), other, progress=False)
    assert result["workers"] == 2
    key = ["concept", "fraction", "ablation", "estimator"]
    a = pd.read_parquet(os.path.join(root, "validation")).astype({"concept": str}).sort_values(key)
    b = pd.read_parquet(os.path.join(other, "validation")).astype({"concept": str}).sort_values(key)
    for column in ("actual", "actual_ablated_base", "predicted"):
        np.testing.assert_array_equal(a[column].to_numpy(), b[column].to_numpy())


def test_rerun_skips_finished_shards_and_other_options_are_refused(validated, tmp_path):
    root, _ = validated
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    os.remove(next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(copy, "_validation")) for f in fs
                   if f.startswith("actual")))
    result = run_validation(validation_config(), copy, local=True, progress=False)
    assert result["shards_computed"] == 1
    before = pd.read_parquet(os.path.join(root, "validation_summary"))
    with pytest.raises(CadRayError, match="other options"):
        run_validation(validation_config(ablations=9), copy, local=True, progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(copy, "validation_summary")), before)


def test_bad_input_is_one_line_and_keeps_results(validated, tmp_path, capsys):
    root, _ = validated
    before = pd.read_parquet(os.path.join(root, "validation_summary"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["validate", "--root", str(empty)], "no attribution run"),
        (["validate", "--root", root, "--fractions", "0.01", "1.5"], r"fractions must be in \(0, 1\)"),
        (["validate", "--root", root, "--fractions", "0"], r"fractions must be in \(0, 1\)"),
        (["validate", "--root", root, "--ablations", "0"], "M must be at least 1"),
        (["validate", "--root", root, "--ablations", "4"], "COAR is fit on 2 of the 4 .* at least 6"),
        (["validate", "--root", root, "--concepts", "eight"], "no erase scores for eight"),
    ]
    for argv, message in cases:
        assert main(argv + ["--local", "--quiet"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and re.search(message, err), err
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(root, "validation_summary")), before)
    assert json.loads(open(os.path.join(root, "_validation.json")).read())["complete"] is True
