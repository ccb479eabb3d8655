"""Fault injection (issue 11): predict writes only what describes its own call, names its heatmaps by
folder, skips the unreadable when asked, and says why it cannot decide without a threshold."""

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adtrain.errors import ConfigError, DataError
from tests.conftest import FAST


# ---------------------------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from adtrain.run import run
    from tests.conftest import compose

    run_dir = tmp_path_factory.mktemp("trained")
    run(compose(*FAST, "trainer.limit_train_batches=1"), run_dir)
    return run_dir


def _images(folder: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def _predict(capsys, *args):
    from adtrain.predict import main

    with pytest.raises(SystemExit) as ex:
        main(list(args))
    return ex.value.code, capsys.readouterr().err


def test_predict_names_heatmaps_by_folder_and_clears_an_earlier_call(trained, tmp_path):
    from adtrain.predict import predict

    imgs = _images(tmp_path / "new", ["good/000.png", "crack/000.png", "crack/001.png"])
    out = predict(str(trained / "checkpoints" / "model.ckpt"), str(imgs))
    assert out == trained / "predictions"  # beside the checkpoint's run
    assert sorted(p.name for p in (out / "heatmaps").glob("*.png")) == ["crack__000.png", "crack__001.png",
                                                                       "good__000.png"]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert {r["heatmap"] for r in rows} == {"heatmaps/crack__000.png", "heatmaps/crack__001.png",
                                            "heatmaps/good__000.png"}
    # drawn as the run's test heatmaps (colour bar, threshold), output.heatmap_size's 320 px panels, not thumbnails
    assert Image.open(out / "heatmaps" / "good__000.png").height > 320
    other = _images(tmp_path / "other", ["scratch/000.png"])
    mine = out / "heatmaps" / "mine.png"  # a file predict did not write: kept by the next call
    mine.write_bytes(b"not predict's")
    predict(str(trained / "checkpoints" / "model.ckpt"), str(other))
    assert mine.read_bytes() == b"not predict's"
    mine.unlink()
    assert [p.name for p in (out / "heatmaps").glob("*.png")] == ["other__scratch__000.png"] or \
        [p.name for p in (out / "heatmaps").glob("*.png")] == ["scratch__000.png"]
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 1
    # a call that fails on an unreadable image leaves the earlier call's output as it was
    before = sorted(p.name for p in (out / "heatmaps").glob("*.png")), (out / "predictions.csv").read_bytes()
    broken = _images(tmp_path / "broken", ["good/000.png", "good/001.png"])
    (broken / "good" / "001.png").write_bytes((broken / "good" / "001.png").read_bytes()[:200])  # cut short
    with pytest.raises(DataError, match="001.png"):
        predict(str(trained / "checkpoints" / "model.ckpt"), str(broken), batch_size=1)
    assert (sorted(p.name for p in (out / "heatmaps").glob("*.png")), (out / "predictions.csv").read_bytes()) == before
    assert not list(out.glob(".predict-*"))
    # out= a run directory would mix into (and once cleared) the test's heatmaps: refused, nothing touched
    test_heatmaps = sorted((trained / "heatmaps").iterdir())
    with pytest.raises(ConfigError, match="is a run directory") as err:
        predict(str(trained / "checkpoints" / "model.ckpt"), str(other), out=str(trained))
    assert err.value.key == "out" and sorted((trained / "heatmaps").iterdir()) == test_heatmaps
    project = tmp_path / "project"  # a folder that merely holds a checkpoints/ folder is not a run: allowed
    (project / "checkpoints").mkdir(parents=True)
    assert predict(str(trained / "checkpoints" / "model.ckpt"), str(other), out=str(project)) == project


def test_predict_on_error_skip_scores_the_rest_and_lists_the_unreadable(trained, tmp_path, caplog):
    """on_error=skip: a cut-short file and a non-image get rows with their reason and no score; the
    readable images are scored as a clean call scores them; a call where nothing reads still fails."""
    from adtrain.predict import predict

    ckpt = str(trained / "checkpoints" / "model.ckpt")
    imgs = _images(tmp_path / "mixed", ["a/000.png", "a/001.png", "a/002.png", "b/000.png"])
    clean = {r["path"]: r for r in csv.DictReader(open(predict(ckpt, str(imgs), out=str(tmp_path / "clean")) /
                                                      "predictions.csv"))}
    assert all(r["error"] == "" for r in clean.values())
    (imgs / "a" / "001.png").write_bytes((imgs / "a" / "001.png").read_bytes()[:200])  # cut short
    (imgs / "b" / "000.png").write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        out = predict(ckpt, str(imgs), out=str(tmp_path / "skip"), batch_size=2, on_error="skip")
    rows = {r["path"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert set(rows) == set(clean)
    bad = {p for p, r in rows.items() if r["error"]}
    assert {Path(p).relative_to(imgs).as_posix() for p in bad} == {"a/001.png", "b/000.png"}
    for p in bad:
        assert rows[p]["score"] == "" and rows[p]["heatmap"] == "" and rows[p]["is_anomalous"] == ""
    for p in set(rows) - bad:
        assert float(rows[p]["score"]) == pytest.approx(float(clean[p]["score"]), rel=1e-5)
        assert (out / rows[p]["heatmap"]).is_file()
    assert len(list((out / "heatmaps").glob("*.png"))) == 2
    assert any("2 of 4 images could not be read" in r.getMessage() for r in caplog.records)
    # the rows in listing order (a batch's unreadable files came first: b/000 before a/000 in batches of 2
    # ending with it; here a/001 sits in the first batch)
    assert list(rows) == sorted(rows)
    with pytest.raises(DataError, match=r"no image could be read \(1 given"):
        predict(ckpt, str(imgs / "b") + "/*.png", out=str(tmp_path / "none"), on_error="skip")
    assert not (tmp_path / "none").exists()  # a call that failed leaves no folder it made
    with pytest.raises(ConfigError, match="on_error"):
        predict(ckpt, str(imgs), on_error="ignore")


def test_predict_outside_a_run_writes_beside_the_checkpoint(trained, tmp_path):
    from adtrain.predict import predict

    (tmp_path / "models").mkdir()
    ckpt = tmp_path / "models" / "model.ckpt"
    ckpt.write_bytes((trained / "checkpoints" / "model.ckpt").read_bytes())
    out = predict(str(ckpt), str(_images(tmp_path / "new", ["a.png"])))
    assert out == tmp_path / "models" / "predictions" and (out / "predictions.csv").exists()
    assert not (tmp_path / "predictions").exists()


def test_an_output_folder_that_takes_no_file_is_one_line(trained, tmp_path, capsys, monkeypatch):
    """A read-only folder (a model store): a 20-line OSError traceback before."""
    import tempfile

    import adtrain.predict as pr

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    (tmp_path / "o").mkdir()
    monkeypatch.setattr(pr.tempfile, "mkdtemp", read_only)
    imgs = _images(tmp_path / "new", ["a.png"])
    code, err = _predict(capsys, f"checkpoint={trained}/checkpoints/model.ckpt", f"images={imgs}", f"out={tmp_path}/o")
    assert code == 2 and "config key 'out': the output folder" in err and "not writable" in err
    assert "Traceback" not in err and list((tmp_path / "o").iterdir()) == []
    monkeypatch.setattr(pr.tempfile, "mkdtemp", tempfile.mkdtemp)


def test_predict_refuses_a_checkpoint_without_a_threshold(trained, tmp_path, capsys):
    imgs = _images(tmp_path / "new", ["a.png"])
    code, err = _predict(capsys, f"checkpoint={trained}/checkpoints/last.ckpt", f"images={imgs}", f"out={tmp_path}/o")
    assert code == 2 and "no fitted threshold" in err and "last.ckpt" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_predict_bad_arguments_are_one_line(trained, tmp_path, capsys):
    imgs = _images(tmp_path / "new", ["a.png"])
    ckpt = f"checkpoint={trained}/checkpoints/model.ckpt"
    code, err = _predict(capsys, ckpt, f"images={imgs}", "batch_size=0")
    assert code == 2 and "batch_size" in err and ">= 1" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "a_file").write_text("x")
    for arg, said in (("num_workers=-1", "'num_workers': must be a whole number >= 0"),
                      ("anomaly_maps=maybe", "'anomaly_maps': must be true or false"),
                      (f"out={tmp_path / 'a_file'}", "'out': cannot make the folder")):
        code, err = _predict(capsys, ckpt, f"images={imgs}", arg)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    if not torch.cuda.is_available():
        code, err = _predict(capsys, ckpt, f"images={imgs}", "device=cuda")
        assert code == 2 and "device" in err and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_predict_takes_paths_as_typed_and_never_scores_its_own_outputs(trained, tmp_path, capsys, monkeypatch):
    """A folder named 2024, an out= named 007, a file name holding ${...}: YAML read them as 2024, 7 and an
    interpolation (a TypeError traceback, or another value put in). out= inside the images' folder: the
    second call scored the first call's heatmaps as new images."""
    from adtrain.predict import main, predict

    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "2024", ["a.png", "d${x}.png"])
    ckpt = f"checkpoint={trained}/checkpoints/model.ckpt"
    for images in ("images=2024", "images=2024/d${x}.png"):
        main([ckpt, images, "out=007", "heatmaps=false"])
        rows = list(csv.DictReader(open(tmp_path / "007" / "predictions.csv")))
        assert [r["path"] for r in rows] == (["2024/a.png", "2024/d${x}.png"] if images.endswith("2024")
                                             else ["2024/d${x}.png"])
    capsys.readouterr()
    code, err = _predict(capsys, ckpt, "images=2024", "batch_size=[1")
    assert code == 2 and "'batch_size': cannot read '[1'" in err and len(err.strip().splitlines()) == 1, err
    for _ in range(2):
        out = predict(str(trained / "checkpoints" / "model.ckpt"), "2024", out="2024/results")
        assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 2  # not 4: its heatmaps left out


def test_predict_says_which_images_are_far_from_the_models_input(trained, tmp_path, caplog):
    """A 1x1 file or a thumbnail, a line-scan strip: upscaled or stretched into the input, scored without a
    word (a training run warns about its own such images)."""
    from adtrain.predict import predict

    imgs = _images(tmp_path / "new", ["a.png", "b.png"])
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(imgs / "dot.png")
    Image.fromarray(np.zeros((20, 200, 3), np.uint8)).save(imgs / "strip.png")
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        predict(str(trained / "checkpoints" / "model.ckpt"), str(imgs), out=str(tmp_path / "out"), heatmaps=False)
    said = [r.getMessage() for r in caplog.records if "far from the model's input" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("2 of 4 images") and "dot.png, 1x1" in said[0], said


def test_predict_stopped_by_sigterm_keeps_the_earlier_call_and_leaves_no_work_folder(trained, tmp_path, capsys,
                                                                                 monkeypatch):
    """SIGTERM (timeout, SLURM) ended predict without running its clean-up: a hidden work folder with
    partial heatmaps stayed in out= for good, one per stopped call. Now: status 143, nothing left."""
    import os
    import signal

    from adtrain.inference.detector import Detector

    imgs = _images(tmp_path / "new", ["a.png", "b.png", "c.png"])
    ckpt, out = f"checkpoint={trained}/checkpoints/model.ckpt", tmp_path / "out"
    from adtrain.predict import main

    main([ckpt, f"images={imgs}", f"out={out}"])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = Detector.predict_batches

    def stopped_after_one(self, *args, **kwargs):
        for k, batch in enumerate(real(self, *args, **kwargs)):
            yield batch
            if k == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Detector, "predict_batches", stopped_after_one)
    code, err = _predict(capsys, ckpt, f"images={imgs}", f"out={out}", "batch_size=1")
    assert code == 143 and "stopped by SIGTERM" in err, err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(out.glob(".predict-*")) and signal.getsignal(signal.SIGTERM) is not None


def test_a_run_without_held_out_normals_warns_and_predict_says_why_it_cannot_decide(fast_cfg, tmp_path, caplog):
    """data.val_split=0 (the papers' "all normals into the bank"): threshold-free figures, a warning
    that says so at the run, and adtrain.predict's refusal names the cause, not only "a training
    checkpoint" (the finished run's own model.ckpt is what the user passes)."""
    
    from adtrain.predict import predict
    from adtrain.run import run

    with caplog.at_level(logging.WARNING, logger="adtrain"):
        result = run(fast_cfg("method=patchcore", "data.val_split=0", "output.heatmaps=0"), tmp_path / "run")
    assert result["threshold"] is None and result["image_auroc"] is not None
    import adtrain

    rows = adtrain.Run.open(tmp_path / "run").scores()  # no threshold, no prediction: None, not ""
    assert rows and all(r["prediction"] is None and isinstance(r["score"], float) for r in rows)
    assert any("No held-out normals (data.val_split=0" in r.getMessage() for r in caplog.records)
    ckpt = tmp_path / "run" / "checkpoints" / "model.ckpt"
    images = next(p for p in (tmp_path / "run").rglob("*.png"))
    with pytest.raises(DataError, match=r"model.ckpt: holds no fitted threshold: .*data.val_split=0") as err:
        predict(str(ckpt), str(images), out=str(tmp_path / "pred"))
    assert "\n" not in str(err.value) and not (tmp_path / "pred").exists()
    from adtrain import Detector

    with pytest.raises(DataError, match="holds no fitted threshold"):  # the API as the CLI: no silent "normal"
        Detector.load(ckpt)


def test_a_test_set_of_one_label_is_said_before_its_figures_are_null(fast_cfg, tmp_path, caplog):
    
    from adtrain.run import run

    with caplog.at_level(logging.INFO, logger="adtrain"):
        result = run(fast_cfg("method=patchcore", "data.num_test_anomalous=0", "output.heatmaps=0"), tmp_path / "run")
    assert result["image_auroc"] is None and result["test_at_threshold"]["tn"] + result["test_at_threshold"]["fp"] == 8
    assert any("The test set holds no anomalous image (8 images)" in r.getMessage() for r in caplog.records)
    # the kept state names a file that is there: a one-pass method takes no optimiser step, so no last.ckpt
    assert result["selected_checkpoint"] == "model.ckpt" and not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert any("Kept the last state (model.ckpt, after 1 epoch)" in r.getMessage() for r in caplog.records)


def test_two_calls_publishing_into_one_folder_take_turns(tmp_path, monkeypatch):
    """Two predict calls into one out= publish at once (here call A's heatmap moves are slow, as on a
    network file system, and B begins while A moves them): B's predictions.csv listed heatmaps that A
    then replaced with its own pictures of other images of the same names. They now take turns."""
    import os
    import threading
    import time

    import adtrain.predict as P

    out = tmp_path / "out"
    out.mkdir()
    for who in "AB":
        stage = tmp_path / f"stage_{who}"
        (stage / "heatmaps").mkdir(parents=True)
        rows = "".join(f"{who}/{i}.png,heatmaps/{i:03d}.png,{who}\n" for i in range(4))
        (stage / "predictions.csv").write_text("path,heatmap,who\n" + rows)
        for i in range(4):
            (stage / "heatmaps" / f"{i:03d}.png").write_text(who)
    real, a_moving = os.replace, threading.Event()

    def replace(src, dst):
        if threading.current_thread().name == "A" and str(src).endswith(".png"):
            a_moving.set()
            time.sleep(0.05)
        return real(src, dst)

    monkeypatch.setattr(P.os, "replace", replace)
    a = threading.Thread(target=P._publish, args=(tmp_path / "stage_A", out), name="A")
    b = threading.Thread(target=lambda: (a_moving.wait(5), P._publish(tmp_path / "stage_B", out)), name="B")
    a.start(), b.start()
    a.join(), b.join()
    with open(out / "predictions.csv") as f:
        listed = list(csv.DictReader(f))
    assert {r["who"] for r in listed} == {"B"}  # the later call's output, whole
    assert [(out / r["heatmap"]).read_text() for r in listed] == ["B"] * 4
