"""The notebooks run top to bottom (shrunk through their parameters) and show figures, not only text."""

import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, cwd: Path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    return text, images


def test_quickstart_notebook_shows_heatmaps_and_histogram(tmp_path, monkeypatch):
    monkeypatch.setenv("ADTRAIN_NB_IMAGE_SIZE", "64")
    monkeypatch.setenv("ADTRAIN_NB_LIMIT", "2")
    monkeypatch.setenv("ADTRAIN_NB_TEST_LIMIT", "2")
    monkeypatch.setenv("ADTRAIN_NB_RUN_DIR", str(tmp_path / "run"))
    text, images = _execute("01_quickstart.ipynb", tmp_path)
    assert (tmp_path / "run" / "results.json").exists()
    heatmaps = list((tmp_path / "run" / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 6
    assert len(images) == 6 + 1  # every heatmap and the histogram, inline
    assert "image AUROC" in text and "run directory" in text and "poly: image AUROC" in text


def test_continual_and_sweep_notebook_shows_matrices_and_heatmaps(tmp_path, monkeypatch):
    monkeypatch.setenv("ADTRAIN_NB_TINY", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's WORK = mkdtemp(): removed with tmp_path
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))
    text, images = _execute("02_continual_and_sweeps.ipynb", tmp_path)
    # two matrices (image and pixel AUROC), two heatmaps of each of three tasks, the sweep's bars
    assert len(images) >= 2 + 3 * 2 + 1, text[-2000:]
    assert "forgetting" in text and "after task 2" in text
    # each matrix row with its figures (a misplaced conditional printed the labels alone)
    assert re.search(r"after task 2[^\n]*: +\d\.\d{4}  \d\.\d{4}  \d\.\d{4}", text), text[-2000:]
