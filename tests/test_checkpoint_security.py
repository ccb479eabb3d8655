"""Checkpoints from elsewhere run no code; stored configs build adtrain classes only; files are 0644."""

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from adtrain.errors import DataError


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears if a loader runs pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload_ckpt(path, marker, config=None):
    """A checkpoint shaped like adtrain's (state_dict + adtrain_config) carrying the payload."""
    torch.save({"state_dict": {"w": torch.zeros(1)}, "adtrain_config": config or {"method": {}},
                "trap": Payload(marker)}, path)
    return path


def _assert_refused_in_one_line(err, path):
    text = str(err)
    assert "\n" not in text and str(path) in text and "refused" in text and "open" in text


def test_payload_is_real_when_loaded_unsafely(tmp_path):
    """The control: the same payload does create its marker under weights_only=False."""
    marker = tmp_path / "control"
    torch.load(_payload_ckpt(tmp_path / "p.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_read_checkpoint_refuses_payload_missing_and_corrupt_files(tmp_path):
    from adtrain.loading import read_checkpoint

    marker = tmp_path / "marker"
    path = _payload_ckpt(tmp_path / "p.ckpt", marker)
    with pytest.raises(DataError) as e:
        read_checkpoint(path)
    _assert_refused_in_one_line(e.value, path)
    assert e.value.path == str(path) and not marker.exists()
    with pytest.raises(DataError, match="not found") as e:
        read_checkpoint(tmp_path / "nope.ckpt")
    assert e.value.path == str(tmp_path / "nope.ckpt")
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3)}, "epoch": 2}, good)
    good.write_bytes(good.read_bytes()[:40])
    with pytest.raises(DataError, match="cannot read checkpoint") as e:
        read_checkpoint(good)
    assert "\n" not in str(e.value)
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(DataError, match="not a checkpoint"):
        read_checkpoint(tmp_path / "list.ckpt")
    (tmp_path / "notes.ckpt").write_text("hello world, not a checkpoint\n")  # torch's own error: KeyError '101'
    with pytest.raises(DataError, match=r"notes.ckpt: not a PyTorch checkpoint \(neither"):
        read_checkpoint(tmp_path / "notes.ckpt")
    torch.save({"epoch": 1}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)  # a pickle: still read
    assert read_checkpoint(tmp_path / "legacy.ckpt") == {"epoch": 1}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(DataError, match="run: is a folder, not a checkpoint$"):
        read_checkpoint(run)
    torch.save({"epoch": 1}, run / "checkpoints" / "model.ckpt")
    with pytest.raises(DataError, match="is a folder, not a checkpoint: a run's model is .*checkpoints/model.ckpt"):
        read_checkpoint(run)


def test_load_method_refuses_payload(tmp_path):
    from adtrain.loading import load_method

    marker = tmp_path / "marker"
    path = _payload_ckpt(tmp_path / "model.ckpt", marker)
    with pytest.raises(DataError) as e:
        load_method(path)
    _assert_refused_in_one_line(e.value, path)
    assert not marker.exists()


def test_load_task_checkpoint_refuses_payload(fast_cfg, tmp_path):
    from adtrain.build import build_method
    from adtrain.continual.state import load_task_checkpoint

    method = build_method(fast_cfg())
    before = {k: v.clone() for k, v in method.state_dict().items() if torch.is_tensor(v)}
    marker = tmp_path / "marker"
    path = _payload_ckpt(tmp_path / "model.ckpt", marker)
    with pytest.raises(DataError) as e:
        load_task_checkpoint(method, path)
    _assert_refused_in_one_line(e.value, path)
    assert not marker.exists()
    after = {k: v for k, v in method.state_dict().items() if torch.is_tensor(v)}
    torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)  # untouched


def test_predict_cli_refuses_payload_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    path = _payload_ckpt(tmp_path / "model.ckpt", marker)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img_dir / "a.png")
    p = subprocess.run([sys.executable, "-m", "adtrain.predict", f"checkpoint={path}", f"images={img_dir}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("adtrain.predict: error: ") and str(path) in lines[0], p.stderr
    assert "refused" in lines[0] and "Traceback" not in p.stderr
    assert not marker.exists()


def test_lightning_resume_refuses_payload(fast_cfg, tmp_path):
    from adtrain.checkpoint_io import AtomicCheckpointIO
    from adtrain.run import run

    marker = tmp_path / "marker"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    last = _payload_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(DataError) as e:
        AtomicCheckpointIO().load_checkpoint(last)
    _assert_refused_in_one_line(e.value, last)
    with pytest.raises(DataError) as e:  # python -m adtrain ... resume=true: Lightning's own resume path
        run(fast_cfg("resume=true"), tmp_path / "run")
    _assert_refused_in_one_line(e.value, last)
    assert not marker.exists()
    assert not (tmp_path / "run" / "results.json").exists()


def test_atomic_checkpoint_io_round_trip_is_weights_only(tmp_path):
    from adtrain.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    ckpt = {"state_dict": {"a": torch.randn(3)}, "epoch": 4, "loops": {"x": [1, 2.5, None, "s"]}}
    io.save_checkpoint(ckpt, tmp_path / "last.ckpt")
    back = io.load_checkpoint(tmp_path / "last.ckpt", weights_only=False)  # asked for unsafe: still safe
    assert torch.equal(back["state_dict"]["a"], ckpt["state_dict"]["a"]) and back["loops"] == ckpt["loops"]


def _stored_config(fast_cfg, **nodes):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(fast_cfg(), resolve=True)
    for dotted, value in nodes.items():
        *parents, last = dotted.split("__")
        node = cfg
        for k in parents:
            node = node[k]
        node[last] = value
    return cfg


@pytest.mark.parametrize("where, key", [
    ("method___target_", "method._target_"),
    ("data___target_", "data._target_"),
    ("method__backbone__weights", "method.backbone.weights._target_"),
    ("method__extra", "method.extra[1]._target_"),
])
def test_config_target_outside_adtrain_is_refused_before_building(fast_cfg, tmp_path, monkeypatch, where, key):
    import hydra.utils

    from adtrain.loading import load_method
    from adtrain.continual.state import load_task_checkpoint

    marker = tmp_path / "marker"
    evil = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    value = {"method___target_": "os.system", "data___target_": "os.system",
             "method__backbone__weights": evil, "method__extra": [1, evil]}[where]
    cfg = _stored_config(fast_cfg, **{where: value})
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "adtrain_config": cfg}, path)
    built = []
    monkeypatch.setattr(hydra.utils, "instantiate", lambda *a, **k: built.append(a))
    with pytest.raises(DataError) as e:
        load_method(path)
    msg = str(e.value)
    assert f"'{key}'" in msg and "os.system" in msg and str(path) in msg and "\n" not in msg
    with pytest.raises(DataError, match="os.system"):
        load_task_checkpoint(object(), path)  # refused before the method is touched
    assert built == [] and not marker.exists()


@pytest.mark.parametrize("where", ["method__evil", "data__root", "method__backbone__stages__layer9"])
def test_an_interpolation_in_a_stored_config_is_refused_before_it_resolves(fast_cfg, tmp_path, where):
    """No `_target_` key in the stored config, yet ``${oc.create:...}`` makes one when the config is
    resolved, after the check: the method's build called open(marker, "w") (the file appeared),
    then failed on the unknown key. A run stores its config resolved: an interpolation is refused."""
    from adtrain.continual.state import load_task_checkpoint
    from adtrain.loading import load_method

    marker = tmp_path / "PWNED"
    evil = "${oc.create:'{_target_: builtins.open, _args_: [\"" + str(marker) + "\", w]}'}"
    cfg = _stored_config(fast_cfg, **{where: evil})
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "adtrain_config": cfg}, path)
    with pytest.raises(DataError) as e:
        load_method(path)
    msg = str(e.value)
    assert "interpolation" in msg and f"'{where.replace('__', '.')}'" in msg and str(path) in msg and "\n" not in msg
    with pytest.raises(DataError, match="interpolation"):
        load_task_checkpoint(object(), path)
    assert not marker.exists()


def test_weights_that_do_not_fit_their_config_are_refused_naming_the_file(fast_cfg, tmp_path):
    """A file that loads weights-only and builds adtrain classes, but whose tensors do not fit the
    method its config builds (damaged, crafted, or another method's): predict, test and export printed
    torch's 27-line "size mismatch" traceback without the file's name."""
    from adtrain.continual.state import load_task_checkpoint
    from adtrain.loading import load_method
    from adtrain.methods.base import AnomalyModule
    from adtrain.selection import Selection

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.student.conv1.weight": torch.zeros(1, 1, 1, 1)},
                "adtrain_config": _stored_config(fast_cfg)}, path)
    for load in (load_method, lambda p: load_task_checkpoint(AnomalyModule(), p)):
        with pytest.raises(DataError) as e:
            load(path)
        assert e.value.path == str(path) and "do not fit" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "sel").mkdir()
    path.rename(tmp_path / "sel" / "start.ckpt")  # the untrained start a selection keeps
    with pytest.raises(DataError, match="do not fit"):
        Selection("val_image_auroc", tmp_path / "sel").restore(AnomalyModule(), {"selected": "start"})


def test_a_malformed_rng_state_in_last_ckpt_is_an_error_naming_it():
    """A resume from a last.ckpt whose RunState holds an RNG state of the wrong size failed deep in
    Lightning's restore ("Expected a CPUGeneratorImplState of size 5056") without naming the file."""
    from adtrain.runstate import RunState

    before = torch.get_rng_state()
    with pytest.raises(DataError) as e:
        RunState("run/checkpoints/last.ckpt").load_state_dict({"rng": {"torch": torch.zeros(3, dtype=torch.uint8)}})
    assert e.value.path == "run/checkpoints/last.ckpt" and "overwrite=true" in str(e.value)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("target", ["adtrain.io.write_text", "adtrain.rundir.clear", "adtrain.io.os.system",
                                    "adtrain.loading.torch.load"])
def test_adtrain_functions_and_imported_names_are_refused_too(fast_cfg, tmp_path, target):
    """'adtrain.' as a prefix is not enough: a function of adtrain (write_text, rundir.clear) or a
    name reached through an adtrain module's imports (adtrain.io.os.system) would run when the
    config is built. Only classes defined in adtrain are built from a checkpoint."""
    from adtrain.loading import checked_config

    marker = tmp_path / "PWNED"
    stored = _stored_config(fast_cfg, method__x={"_target_": target, "path": str(marker), "text": "x"})
    with pytest.raises(DataError, match="method.x._target_"):
        checked_config(stored, tmp_path / "m.ckpt")
    assert not marker.exists()
    ok = checked_config(_stored_config(fast_cfg), tmp_path / "m.ckpt")  # an ordinary run's config
    assert ok["method"]["_target_"] == "adtrain.methods.stfpm.Stfpm"


def test_training_only_targets_are_dropped_not_built(fast_cfg, tmp_path):
    """A csv logger and albumentations augmentations are in ordinary runs' configs: they are
    never built from a checkpoint, so they are set to null rather than refused."""
    from adtrain.loading import checked_config

    stored = _stored_config(fast_cfg, logger={"_target_": "lightning.pytorch.loggers.CSVLogger"},
                            data__augment=[{"_target_": "albumentations.HorizontalFlip", "p": 0.5}])
    cfg = checked_config(stored, tmp_path / "m.ckpt")
    assert cfg["logger"] is None and cfg["data"]["augment"] is None
    assert cfg["method"] == stored["method"] and cfg["data"]["_target_"] == stored["data"]["_target_"]
    assert stored["logger"]["_target_"] == "lightning.pytorch.loggers.CSVLogger"  # the stored copy is kept
    assert stored["data"]["augment"][0]["p"] == 0.5


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_respect_the_umask(tmp_path, umask022):
    from adtrain.io import save_image, torch_save, write_json, write_text

    paths = [write_json(tmp_path / "r.json", {"a": 1}), write_text(tmp_path / "c.yaml", "a: 1\n"),
             torch_save({"x": torch.zeros(1)}, tmp_path / "m.ckpt"),
             save_image(Image.fromarray(np.zeros((4, 4), np.uint8)), tmp_path / "h.png")]
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in paths] == [0o644] * 4
    os.umask(0o027)
    assert stat.S_IMODE(os.stat(write_json(tmp_path / "r.json", {"a": 2})).st_mode) == 0o640  # replaced, new mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "h.png", "m.ckpt", "r.json"]  # no temp files
