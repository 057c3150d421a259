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
