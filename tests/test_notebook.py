"""notebooks/01_quickstart.ipynb runs top to bottom (shrunk through its parameters)."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NB = Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("ADTRAIN_NB_EPOCHS", "1")
    monkeypatch.setenv("ADTRAIN_NB_IMAGE_SIZE", "96")
    monkeypatch.setenv("ADTRAIN_NB_LIMIT", "4")
    monkeypatch.setenv("ADTRAIN_NB_RUN_DIR", str(tmp_path / "run"))
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "run" / "results.json").exists()
    assert len(list((tmp_path / "run" / "heatmaps").glob("*.png"))) == 6
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "image_auroc" in outputs
