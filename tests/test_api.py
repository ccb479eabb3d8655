"""The Python API (adtrain.compose/fit/test, Run), the tables people read, --help and the no-argument quickstart."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FAST, ROOT



def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def test_fit_then_test_through_the_api(tmp_path, one_faiss_thread, capsys, caplog, monkeypatch):
    import adtrain
    from adtrain.errors import ConfigError, DataError

    cfg = adtrain.compose([*FAST, "method=patchcore", "method.coreset_ratio=0.5", "output.heatmaps=3"])
    assert cfg.method.name == "patchcore" and cfg.data.name == "synthetic"
    run = adtrain.fit(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert "image AUROC" in out and f"run directory: {tmp_path / 'run'}" in out  # the results table
    assert run["method"] == "patchcore" and 0.0 <= run["image_auroc"] <= 1.0
    assert len(run.heatmaps) == 3 and run.histogram.exists() and run.checkpoint.exists()
    assert len(run.scores()) == run["num_test"] == 16
    row = run.scores()[0]
    assert isinstance(row["score"], float) and row["label"] in (0, 1) and isinstance(row["category"], str)
    assert adtrain.Run.open(run.run_dir).results == run.results
    (run.run_dir / "score_histogram.png").unlink()  # as a continual run or test=false draws none: None, not a path
    assert adtrain.Run.open(run.run_dir).histogram is None
    kept = (run.run_dir / "scores.csv").rename(run.run_dir / "kept.csv")  # output.scores_csv=false: said, not
    with pytest.raises(DataError, match=r"scores\.csv: not found: the run kept none"):  # a bare FileNotFoundError
        adtrain.Run.open(run.run_dir).scores()
    kept.rename(run.run_dir / "scores.csv")
    assert "image threshold" in run.table() and str(run.run_dir) in repr(run)

    # the finished run's model.ckpt on its test set again: the same figures, same threshold
    again = adtrain.test(run.run_dir, out_dir=tmp_path / "again")
    assert again["image_auroc"] == pytest.approx(run["image_auroc"], abs=1e-9)
    assert again["pixel_auroc"] == pytest.approx(run["pixel_auroc"], abs=1e-6)
    assert (tmp_path / "again" / "scores.csv").exists()
    (tmp_path / "again" / "heatmaps" / "notes.txt").write_text("mine")
    adtrain.test(run.run_dir, ["data.category=grid"], out_dir=tmp_path / "again")  # the same folder again:
    kept = sorted(p.name for p in (tmp_path / "again" / "heatmaps").iterdir())  # only this test's heatmaps
    assert len(kept) == 4 and "notes.txt" in kept and all("_grid_" in n for n in kept if n.endswith(".png"))
    with open(tmp_path / "again" / "scores.csv") as f:
        assert {r["category"] for r in csv.DictReader(f)} == {"grid"}
    # a test that fails after its heatmaps are drawn (here: scores.csv cannot be written) leaves the
    # earlier test's files as they were and none of its own (they were cleared first: both were lost)
    import adtrain.engine

    folder = tmp_path / "again"
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with monkeypatch.context() as m, pytest.raises(OSError, match="disk full"):
        m.setattr(adtrain.engine, "write_scores_csv", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
        adtrain.test(run.run_dir, out_dir=folder)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in folder.iterdir()) == ["heatmaps", "scores.csv"]  # no staging folder left
    scores = (run.run_dir / "scores.csv").read_bytes()  # out_dir = the run's own directory: refused, untouched
    with pytest.raises(ConfigError, match="is a run directory") as err:
        adtrain.test(run.run_dir, ["data.category=grid"], out_dir=run.run_dir)
    assert err.value.key == "out_dir" and (run.run_dir / "scores.csv").read_bytes() == scores
    other = adtrain.test(run.checkpoint, ["data.category=grid", "output.heatmaps=0"])
    assert other["num_test"] == 16 and other["image_auroc"] is not None
    spaced = adtrain.test(run.checkpoint, "data.category=grid output.heatmaps=0")  # one string, as compose takes
    assert spaced["image_auroc"] == other["image_auroc"]  # (was split into letters: the run's own category tested)
    # what a test would not read, a typo, a group swapped, a value a run refuses: said naming the key
    for overrides, key, said in ((["method.blur_sigma=0"], "method.blur_sigma", "is not read"),
                                 (["backbone.fuse_batchnorm=false"], "backbone.fuse_batchnorm", "checkpoint's"),
                                 (["data.categroy=grid"], "data.categroy", "a typo?"),
                                 (["data=mvtec"], "data", "is a config group"),
                                 (["trainer.limit_test_batches=0"], "trainer.limit_test_batches", "is 0"),
                                 (["output.heatmaps=abc"], "output.heatmaps", "whole number")):
        with pytest.raises(ConfigError) as err:
            adtrain.test(run.run_dir, overrides)
        assert err.value.key == key and said in str(err.value), str(err.value)
    assert adtrain.test(run.run_dir, ["logger=none", "output.heatmaps=0"])["image_auroc"] == again["image_auroc"]
    # a test checks its own files alone (a training file damaged after the fit stopped it)
    import adtrain.data.file_checks as file_checks

    checked, real = [], file_checks.check_files
    monkeypatch.setattr(file_checks, "check_files", lambda dm, **kw: checked.append(kw) or real(dm, **kw))
    adtrain.test(run.run_dir, ["output.heatmaps=0"])
    assert checked == [{"test": True, "train": False}]
    monkeypatch.undo()
    # a run whose stored config a newer check refuses (here a negative blur) is still tested, with a warning
    from adtrain.io import torch_save
    from adtrain.loading import read_checkpoint

    ckpt = read_checkpoint(run.checkpoint)
    ckpt["adtrain_config"]["method"]["blur_sigma"] = -1.0
    older = torch_save(ckpt, tmp_path / "older.ckpt")
    with caplog.at_level("WARNING", logger="adtrain"):
        kept = adtrain.test(older, ["output.heatmaps=0"])
    assert kept["image_auroc"] == pytest.approx(again["image_auroc"], abs=1e-9) and "method.blur_sigma" in caplog.text

    with pytest.raises(ConfigError, match="overrides"):
        adtrain.compose(["method=no_such_method"])


def test_fit_names_its_default_run_directory_absolutely(tmp_path, monkeypatch):
    import adtrain

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr("adtrain.run.run", lambda cfg, run_dir: seen.append(run_dir) or {"method": "patchcore"})
    run = adtrain.fit([*FAST, "method=patchcore"])
    assert seen == [run.run_dir] and run.run_dir.is_absolute()
    assert run.run_dir.parent == tmp_path / "outputs" / "patchcore" / "synthetic"
    # one string, as compose() and test() take it (split into letters before)
    assert adtrain.fit(" ".join([*FAST, "method=patchcore"])).run_dir.parent == run.run_dir.parent
    from adtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="'hydra.run.dir': is not read by adtrain.fit: give its run_dir"):
        adtrain.fit([*FAST, "hydra.run.dir=elsewhere"])  # was ignored without a word


def _fake_run(run_dir, *, finished=True):
    """A run directory's record (config.yaml, results.json or a continual task) around a model.ckpt
    that is no checkpoint: a test that reads it raises DataError, so a refusal must come first."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("method:\n  name: patchcore\n")
    (run_dir / "checkpoints" / "model.ckpt").write_bytes(b"not a checkpoint")
    (run_dir / "scores.csv").write_text("the run's own scores\n")
    if finished:
        (run_dir / "results.json").write_text('{"method": "patchcore"}')
    return run_dir


def test_test_refuses_an_out_dir_that_is_a_run_directory(tmp_path):
    """adtrain.test(..., out_dir=) a run's directory, its own or another's (finished, begun, a
    continual one under way): refused before the checkpoint is read, the run's files untouched. A
    folder that merely holds a checkpoints/ folder is no run: the test goes on (to the checkpoint)."""
    import adtrain
    from adtrain.errors import ConfigError, DataError

    run = _fake_run(tmp_path / "run")
    other = _fake_run(tmp_path / "other")
    begun = _fake_run(tmp_path / "begun", finished=False)
    continual = tmp_path / "continual"
    (continual / ".hydra").mkdir(parents=True)
    (continual / "tasks" / "0").mkdir(parents=True)
    for source in (run, run / "checkpoints" / "model.ckpt"):
        for out_dir in (run, other, begun, continual):
            with pytest.raises(ConfigError, match="is a run directory") as err:
                adtrain.test(source, ["data.category=grid"], out_dir=out_dir)
            assert err.value.key == "out_dir" and str(out_dir) in str(err.value)
    assert (run / "scores.csv").read_text() == "the run's own scores\n"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "results.json", "scores.csv"]
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    with pytest.raises(DataError, match="model.ckpt"):
        adtrain.test(run, out_dir=project)


@pytest.mark.parametrize("text", ["", '{"method": "patchcore", "image_au', "[]", b"\xff\xfe\x00garbage"])
def test_an_unreadable_results_json_is_named(tmp_path, text):
    """results.json empty, cut short, not a run's results, not text: Run.open and test() raise a
    DataError naming the file and what to do, not a bare JSONDecodeError (or a Run of a list)."""
    import adtrain
    from adtrain.errors import DataError

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    path = run_dir / "results.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for read in (adtrain.Run.open, adtrain.test):
        with pytest.raises(DataError) as err:
            read(run_dir)
        assert err.value.path == str(path) and "unreadable results.json" in str(err.value), str(err.value)
        assert "overwrite=true" in str(err.value)


def test_import_adtrain_is_light():
    code = "import sys, adtrain; print('torch' in sys.modules, 'hydra' in sys.modules, callable(adtrain.compose))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.stdout.split() == ["False", "False", "True"], out.stderr


def test_plain_tables_name_the_directory_and_align(monkeypatch):
    from adtrain.report import plain, run_table, sweep_table

    results = {"method": "patchcore", "data": "elpv", "category": "mono", "backbone": "efficientnet_lite0",
               "seed": 0, "image_auroc": 0.91234, "pixel_auroc": None, "val_image_auroc": 0.8, "threshold": 1.5,
               "selected_checkpoint": "last.ckpt", "fit_seconds": 12.0, "tested": True}
    text = plain(*run_table(results, "outputs/x"))
    lines = text.splitlines()
    assert lines[0].startswith("patchcore on elpv/mono") and lines[-1].startswith("run directory: outputs/x")
    assert "0.9123" in text and "pixel AUROC" not in text  # a test figure that is undefined is left out
    ends = {line.index(v) + len(v) for line in lines for v in ("0.9123", "0.8000", "12.0", "last.ckpt") if v in line}
    assert len(ends) == 1  # the value column is right-aligned
    rows = [{"job": "0", "method": "cfa", "category": "a", "image_auroc": 0.5, "_overrides": {}},
            {"job": "1", "error": "ConfigError: x", "_overrides": {}}]
    continual = {**results, "summary": {"num_tasks": 3}, "matrices": {}, "final_checkpoint": "tasks/2/model.ckpt"}
    assert plain(*run_table(continual, "c")).splitlines()[-1] == \
        "run directory: c  (results.json, tasks/<t>/, the final model tasks/2/model.ckpt)"  # no checkpoints/ there
    sweep = plain(*sweep_table(rows, [], "multirun/s", ("summary.csv",)))
    assert "failed" in sweep and sweep.splitlines()[-1] == "sweep directory: multirun/s  (summary: summary.csv)"
    # seed=0,1 (never a swept column): a seed column where the jobs' seeds differ, else two rows of one
    # setting with other figures stood unexplained; a list value drawn by rich stays (its markup dropped it)
    seeds = [{"job": str(i), "method": "patchcore", "category": "a", "seed": i, "method.layers": "[layer2,layer3]",
              "image_auroc": 0.5 + i / 10, "_overrides": {}} for i in (0, 1)]
    head = sweep_table(seeds, ["method.layers"], "s")[1]
    assert head[:5] == ["job", "method", "category", "seed", "method.layers"]
    import io

    from adtrain.report import render

    pytest.importorskip("rich")
    monkeypatch.setenv("COLUMNS", "300")  # rich's width off a terminal: no cell folded over two lines
    drawn = io.StringIO()
    render(*sweep_table(seeds, ["method.layers"], "s"), file=drawn)
    assert drawn.getvalue().count("[layer2,layer3]") == 2, drawn.getvalue()
    # a log file without COLUMNS (SLURM, `> log`): drawn as wide as the table needs, not folded at 80
    monkeypatch.delenv("COLUMNS")
    wide = [{**r, **{f"method.key_{k}": f"value_{k}" for k in range(8)}} for r in seeds]
    drawn = io.StringIO()
    render(*sweep_table(wide, [f"method.key_{k}" for k in range(8)], "s"), file=drawn)
    assert drawn.getvalue().count("value_7") == 2 and max(map(len, drawn.getvalue().splitlines())) > 80
    # test=false: the footer names only what such a run writes (no heatmaps/, no scores.csv)
    untested = plain(*run_table({**results, "tested": False}, "outputs/x")).splitlines()[-1]
    assert untested.startswith("test=false") and "heatmaps" not in untested and "model.ckpt" in untested


def test_the_histogram_says_where_its_threshold_comes_from():
    from adtrain.viz import histogram_figure

    scores, labels = np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1])
    assert "held-out normals" in histogram_figure(scores, labels, 0.5).axes[0].get_title()
    # threshold.mode=val_f1: the line is the validation set's F1 cut, not the held-out normals' quantile
    assert "best F1" in histogram_figure(scores, labels, 0.5, "val_f1").axes[0].get_title()


def test_heatmap_keeps_the_source_aspect_and_the_backend(tmp_path):
    import matplotlib

    from adtrain.viz import save_heatmap

    backend = matplotlib.get_backend()
    image = np.zeros((64, 64, 3), np.uint8)
    amap = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    kw = dict(image=image, norm_map=amap, mask=None, score=2.0, threshold=1.0, label=0, defect="good", height=120)
    wide = Image.open(save_heatmap(tmp_path / "wide.png", source_size=(100, 300), **kw))
    square = Image.open(save_heatmap(tmp_path / "square.png", source_size=(100, 100), **kw))
    assert wide.size[0] > square.size[0] + 2 * 2 * 120  # three panels, each 3x as wide as tall vs square
    assert abs(wide.size[1] - square.size[1]) <= 2  # same height: the size option
    # a line-scan image (4 x 300): panels at most 8x as wide as tall, not 72,000 px wide figures
    thin = Image.open(save_heatmap(tmp_path / "thin.png", source_size=(4, 300), **kw))
    assert thin.size[0] < 3 * (8 * 120 + 200) and thin.size[1] < square.size[1]
    assert matplotlib.get_backend() == backend


def test_heatmaps_of_a_crop_take_the_crops_proportions(tmp_path, one_faiss_thread, monkeypatch):
    """A centre crop of other proportions than image_size shows a part of the source of other
    proportions than the source: the test's and predict's heatmaps were drawn at the whole source's
    aspect ratio, so a square defect came out stretched (here 1.5x wide)."""
    import adtrain
    import adtrain.viz
    from adtrain.predict import predict

    drawn, original = [], adtrain.viz.save_heatmap

    def spy(path, **kw):
        drawn.append(kw["source_size"])
        return original(path, **kw)

    monkeypatch.setattr(adtrain.viz, "save_heatmap", spy)
    assert adtrain.viz.shown_size((150, 230), (64, 96), None) == (150, 230)
    cfg = adtrain.compose([*FAST, "method=patchcore", "method.coreset_ratio=0.5", "output.heatmaps=2",
                           "method.image_size=[64,96]", "method.center_crop=[48,48]"])
    run = adtrain.fit(cfg, tmp_path / "run")  # synthetic sources are 128 x 128: the crop shows 96 x 64 of them
    assert len(run.heatmaps) == 2 and drawn == [(96.0, 64.0)] * 2
    drawn.clear()
    Image.new("RGB", (230, 150)).save(tmp_path / "wide.png")  # a source of other proportions than the run's
    predict(str(run.checkpoint), str(tmp_path / "wide.png"), out=str(tmp_path / "pred"), heatmaps=True)
    assert drawn == [(150 * 48 / 64, 230 * 48 / 96)] and len(list((tmp_path / "pred" / "heatmaps").glob("*.png"))) == 1


def test_selection_says_what_was_kept_and_why():
    from adtrain.selection import Selection, describe

    sel = Selection("val_image_auroc", "/tmp")
    sel.history = [{"epoch": 0, "metrics": {}}, {"epoch": 1, "metrics": {}}]
    sel.start = {"value": 0.7, "metrics": {}}
    line = describe({"selected": "epoch", "epoch": 1, "value": 0.9}, "val_image_auroc", sel, 2)
    assert line.startswith("Selected epoch 1 (best.ckpt)") and "of 2 validated states" in line and "0.7000" in line
    sel.best = {"epoch": 1, "value": 0.6}
    line = describe({"selected": "start", "value": 0.7}, "val_image_auroc", sel, 2)
    assert line.startswith("Kept the untrained start (start.ckpt)") and "epoch 1" in line
    # trained states validated but none confidently better than the start: say so, not "none validated"
    sel = Selection("val_image_auroc", "/tmp", start_confidence=0.9)
    sel.history = [{"epoch": 2, "metrics": {}, "confidence_vs_start": 0.48},
                   {"epoch": 5, "metrics": {}, "confidence_vs_start": 0.70}]
    sel.start = {"value": 0.7, "metrics": {}}
    line = describe({"selected": "start", "value": 0.7}, "val_image_auroc", sel, 6)
    assert "none of the 2 validated trained states" in line and "90%" in line and "epoch 5: 70%" in line
    sel.history = []
    assert "no trained state was validated" in describe({"selected": "start", "value": 0.7}, "val_image_auroc", sel, 6)
    last = describe({"selected": "last"}, "last", Selection("last", "/tmp"), 1)
    assert "last.ckpt" in last and "nothing to select" in last
    assert "no validation set" in describe({"selected": "last"}, "normal_score", None, 3)


def test_no_arguments_runs_the_quickstart(monkeypatch, capsys):
    import adtrain.__main__ as cli_mod
    from adtrain.api import QUICKSTART

    seen = []
    monkeypatch.setattr(cli_mod, "main", lambda: seen.append(list(sys.argv[1:])))
    monkeypatch.setattr(sys, "argv", ["adtrain"])
    cli_mod.cli()
    assert seen == [list(QUICKSTART)] and "quickstart" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["adtrain", "method=cfa"])
    cli_mod.cli()
    assert seen[-1] == ["method=cfa"]


def test_help_says_what_adtrain_is():
    out = subprocess.run([sys.executable, "-m", "adtrain", "--help"], capture_output=True, text=True, env=_env(),
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("adtrain: train and evaluate industrial visual anomaly detectors")
    assert "method: cfa, dfm, dfm_cfa, hetmm, patchcore, stfpm" in out.stdout
    examples = out.stdout.split("== Examples ==")[1].split("\n\n")[0].strip().splitlines()
    assert len(examples) == 5 and all(e.startswith("python -m adtrain") for e in examples)


def test_quiet_drops_library_noise(caplog):
    import logging

    from adtrain.logs import quiet

    quiet()
    with caplog.at_level(logging.INFO):
        logging.getLogger("faiss.loader").info("Could not load library with AVX512 support")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
        logging.getLogger("adtrain").info("kept")
    assert [r.getMessage() for r in caplog.records] == ["kept"]
