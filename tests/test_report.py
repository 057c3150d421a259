"""The HTML report: self-contained, and rendered by a real headless browser with its plots and grids."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_evaluation import evaluation_config
from test_validation import validation_config

from cad_ray.cli import main
from cad_ray.distributed import run_evaluation, run_validation


@pytest.fixture(scope="module")
def full_root(small_run, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("report") / "run")
    shutil.copytree(small_run, root)
    config = evaluation_config()
    config = config.model_copy(update={"validation": validation_config().validation})
    run_validation(config, root, local=True, progress=False)
    run_evaluation(config, root, local=True, progress=False)
    return root


def test_report_is_self_contained_and_has_every_section(full_root, capsys):
    assert main(["report", "--root", full_root]) == 0
    path = os.path.join(full_root, "report.html")
    assert path in capsys.readouterr().out
    text = open(path).read()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)  # nothing fetched from a network
    for heading in ("Attribution", "Validation by random ablation", "Localization", "Edits judged by images"):
        assert heading in text
    assert text.count("data:image/png;base64,") >= 6  # layers, 2 scatters, heatmap, sweep, grids


def test_report_renders_in_headless_chromium(full_root, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CAD_RAY_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed")
    assert main(["report", "--root", full_root, "--out", str(tmp_path / "report.html")]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,5000", f"--screenshot={shot}", f"file://{tmp_path / 'report.html'}"],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    # rendered plots: many colours and a share of non-white pixels; image grids: their grey frames
    assert len(np.unique(pixels, axis=0)) > 500
    assert (pixels.sum(axis=1) < 700).mean() > 0.03
    assert (pixels == [89, 89, 89]).all(axis=1).sum() > 2000


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plots draw, kept open for their text (no PNG is read back)."""
    import cad_ray.plots as plots

    kept = []
    monkeypatch.setattr(plots, "_png", lambda fig: kept.append(fig) or b"")
    return kept


def test_attribution_plot_shows_the_evaluated_concept_with_full_tensor_names_a_title_and_both_signs(full_root,
                                                                                                      figures):
    from cad_ray.plots import layer_summary
    from cad_ray.stages.report import attribution_concepts
    from cad_ray.store import ScoreStore

    store = ScoreStore(full_root)
    evaluation, validation = store.table("evaluation_summary"), store.table("validation_summary")
    shown, why = attribution_concepts(store.concepts(), evaluation, validation)
    assert shown == ["seven"] and why == "the evaluated targets"  # not the first alphabetically ("red")
    layers = store.layers(objective="erase")
    layer_summary(layers[layers["concept"].isin(shown)], "erase")
    ax = figures[-1].axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(names) == sorted(layers["tensor"].unique())  # the tables' names, in full
    assert all("transformer_blocks" in n and "tb." not in n for n in names)
    assert "seven" in ax.get_title() and "erase objective" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("positive" in t for t in legend) and any("negative" in t for t in legend)


def test_scatter_says_ablated_fraction_and_sweep_keeps_every_edit_visible(full_root, figures):
    from cad_ray.plots import ratio_sweep, validation_scatter
    from cad_ray.store import ScoreStore

    store = ScoreStore(full_root)
    validation = store.table("validation")
    validation_scatter(validation[validation["concept"] == "seven"])
    titles = [ax.get_title() for ax in figures[-1].axes]
    assert all("ablated fraction" in t and "rho" not in t for t in titles)
    ratio_sweep(store.table("evaluation_summary"), "seven")
    lines = [line for line in figures[-1].axes[0].get_lines() if line.get_label() in ("cad-erase", "random")]
    assert len(lines) == 2
    assert lines[0].get_marker() != lines[1].get_marker() and lines[0].get_linestyle() != lines[1].get_linestyle()
    assert not np.allclose(lines[0].get_xdata(), lines[1].get_xdata())  # nudged apart, not on top of each other
    ticks = [t.get_text() for t in figures[-1].axes[0].get_xticklabels()]
    assert ticks == ["0.05"]  # the ratios measured, not a crowd of minor ticks


def test_report_never_marks_random_best_interprets_pearson_and_names_every_grid_row(full_root, monkeypatch):
    import cad_ray.stages.report as report

    summary = report.ScoreStore(full_root).table("evaluation_summary")
    assert not summary.loc[summary["edit"].isin(["random", "none"]), "best"].any()  # references, never best
    assert summary.loc[summary["edit"] == "cad-erase", "best"].any()
    named = []
    draw = report._labelled_grid_png
    monkeypatch.setattr(report, "_labelled_grid_png", lambda rows, columns: named.append(
        [name for name, _ in rows]) or draw(rows, columns))
    text = report.build_report(full_root)
    main_table = text[text.index("Edits judged by images"):].split("</table>")[0]
    header = re.findall(r"<th>(\w+)</th>", main_table)
    assert header[-1] == "best" and len(header) <= 12  # the main columns; every column under <details>
    for row in re.findall(r"<tr>(.*?)</tr>", main_table, flags=re.S):
        cells = re.findall(r"<td>(.*?)</td>", row)
        if cells and cells[0] in ("random", "none"):
            assert cells[-1] == "False", row
    assert "overflow-x:auto" in text  # a wide table scrolls in its own box
    words = re.sub(r"data:image/png;base64,[^\"]+", "", text)
    assert not re.search(r"\brho\b", words) and "Pearson correlation of predicted and actual change" in words
    assert named and all(rows[0] == "seven" for rows in named)  # the target's row first, every row named
    assert all(len(set(rows)) == len(rows) >= 10 for rows in named)  # one row per label: all ten digits
