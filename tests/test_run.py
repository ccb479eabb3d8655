"""The run a user walks: results.json and friends, resume, bad config, NaN loss, CLI, sweeps."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from adtrain.errors import ConfigError, TrainingError

RESULT_KEYS = {
    "method", "data", "category", "backbone", "seed", "image_auroc", "image_ap", "image_f1max",
    "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "fit_seconds", "test_seconds",
    "test_images_per_second", "peak_memory_mb",
}


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_run_writes_results_config_checkpoint_heatmaps(fast_cfg, tmp_path, umask022):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from adtrain.run import run

    # the teacher here is a random-init timm ResNet (no weights offline), whose residual branches start
    # at zero: a student with timm's init (not the official torchvision one) matches it within an epoch
    res = run(fast_cfg("output.heatmaps=4", "logger=csv", "method.student_init=timm"), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= set(saved)
    assert saved == json.loads(json.dumps(res))
    assert saved["method"] == "stfpm" and saved["data"] == "synthetic" and saved["backbone"] == "resnet18"
    assert saved["num_test"] == 16 and saved["test_images_per_second"] > 0
    for name in ("results.json", "config.yaml", "scores.csv", "checkpoints/model.ckpt", "checkpoints/last.ckpt"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o644), name  # readable by others
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 4
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert len(rows) == 16 and {r["label"] for r in rows} == {"0", "1"}
    # the image metrics are those of the scores written: recomputed here independently
    labels, scores = [int(r["label"]) for r in rows], [float(r["score"]) for r in rows]
    assert saved["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert saved["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    # even one epoch from random weights localises the synthetic defects (constant maps give 0.5)
    assert saved["pixel_auroc"] > 0.75 and saved["pixel_aupro"] > 0.4
    # 16 maps of 64 x 64: within metrics.exact_pixels, so counted exactly
    assert saved["pixel_metrics_exact"] is True
    assert saved["pixel_error_bounds"] == {"pixel_auroc": 0.0, "pixel_ap": 0.0, "pixel_f1max": 0.0, "pixel_aupro": 0.0}
    assert saved["threshold"] is not None
    assert (tmp_path / "score_histogram.png").exists()
    metrics = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert any(r.get("test/image_auroc") for r in metrics)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_mvtec_layout_without_ground_truth_gives_null_pixel_metrics(base_cfg, tmp_path):
    from adtrain.data.testing import write_mvtec_tree
    from adtrain.run import run

    root = write_mvtec_tree(tmp_path / "mvtec", "widget", n_train=10, n_test_good=3, defects={},
                            defects_without_gt={"crack": 3}, size=48)
    cfg = base_cfg("data=mvtec", f"data.root={root}", "data.category=widget", "data.num_workers=0")
    res = run(cfg, tmp_path / "run")
    assert res["data"] == "mvtec" and res["category"] == "widget" and res["num_test"] == 6
    assert res["image_auroc"] is not None
    assert all(res[k] is None for k in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"))


def test_resume_after_crash_continues_from_last_checkpoint(fast_cfg, tmp_path, monkeypatch):
    from adtrain.methods.stfpm import Stfpm
    from adtrain.run import run

    original = Stfpm.training_step
    seen_epochs = []

    def crashing(self, batch, idx):
        seen_epochs.append(self.current_epoch)
        if self.current_epoch == 1:
            raise RuntimeError("simulated crash")
        return original(self, batch, idx)

    monkeypatch.setattr(Stfpm, "training_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(fast_cfg("trainer.max_epochs=3"), tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "results.json").exists()

    monkeypatch.setattr(Stfpm, "training_step", lambda self, b, i: (seen_epochs.append(self.current_epoch), original(self, b, i))[1])
    seen_epochs.clear()
    res = run(fast_cfg("trainer.max_epochs=3", "resume=true"), tmp_path)
    assert 0 not in seen_epochs and set(seen_epochs) == {1, 2}
    assert res["epochs_trained"] == 3


@pytest.mark.parametrize("method", ["patchcore", "cfa", "dfm"])
def test_bf16_mixed_runs_on_the_cpu_with_the_fp32_searches(fast_cfg, tmp_path, method):
    """trainer.precision=bf16-mixed on the CPU (README: every method) failed for PatchCore and CFA
    in the memory search (topk's fp32 out buffers got bf16) and for DFM in the map's blur (its cached
    operator was built in bf16). The memory work now runs in fp32 under the autocast."""
    from adtrain.run import run

    res = run(fast_cfg(f"method={method}", "trainer.precision=bf16-mixed", "output.heatmaps=0"), tmp_path / "run")
    assert res["precision"] == "bf16-mixed" and 0.0 <= res["image_auroc"] <= 1.0


def test_resume_without_checkpoint_names_the_key(fast_cfg, tmp_path):
    from adtrain.run import run

    with pytest.raises(ConfigError, match="resume"):
        run(fast_cfg("resume=true"), tmp_path)


def test_nan_loss_stops_with_a_clear_message(fast_cfg, tmp_path, monkeypatch):
    import adtrain.methods.stfpm.lightning as lit
    from adtrain.run import run

    monkeypatch.setattr(lit, "stfpm_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match=r"nan.*method\.lr"):
        run(fast_cfg(), tmp_path)


def test_unknown_config_key_is_named():
    from hydra.errors import ConfigCompositionException

    from tests.conftest import compose

    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose("method.lrr=0.1")


def test_bad_constructor_argument_names_the_group(fast_cfg, tmp_path):
    from omegaconf import open_dict

    from adtrain.run import run

    cfg = fast_cfg()
    with open_dict(cfg):
        cfg.method.bogus = 1
    with pytest.raises(ConfigError, match="method.*bogus"):
        run(cfg, tmp_path)


def _cli(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "adtrain", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_cli_run_then_predict(tmp_path):
    from tests.conftest import FAST

    run_dir = tmp_path / "run"
    p = _cli(*FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["method"] == "stfpm"
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert "overridden `on_after_batch_transfer`" not in p.stderr + p.stdout  # deliberate: not shown (adtrain.logs)

    # python -m adtrain.predict on a folder of new images
    from PIL import Image
    import numpy as np

    img_dir = tmp_path / "new"
    img_dir.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((50, 70)) * 255).astype(np.uint8)).save(img_dir / f"n{i}.png")
    out = tmp_path / "pred"
    p = subprocess.run([sys.executable, "-m", "adtrain.predict", f"checkpoint={run_dir}/checkpoints/model.ckpt",
                        f"images={img_dir}", f"out={out}"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 3 and all(r["is_anomalous"] in ("0", "1") for r in rows)
    assert len(list((out / "heatmaps").glob("*.png"))) == 3


def test_cli_bad_input_gives_message_not_traceback(tmp_path):
    # Hydra's refusals (a misspelt key, a group's unknown option, an override it cannot parse): one line
    # naming the key, status 2, as adtrain's own (Hydra printed 3-10 lines and exited 1)
    for args, said in ((["method.lrr=1"], "config key 'method.lrr': is not in the config; did you mean method.lr?"),
                       (["method=pachcore"], "config key 'method': has no option 'pachcore'; did you mean method=patchcore?"),
                       (["method.layers=[layer2"], "config key 'method.layers': the override 'method.layers=[layer2' "
                                                  "cannot be parsed")):
        p = _cli(*args, f"hydra.run.dir={tmp_path}/x", cwd=tmp_path)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and said in p.stderr, p.stderr
    assert not (tmp_path / "x").exists()
    p = _cli("data=mvtec", f"data.root={tmp_path}/nowhere", "data.category=bottle", f"hydra.run.dir={tmp_path}/y", cwd=tmp_path)
    assert p.returncode == 2
    assert "nowhere" in p.stderr and "Traceback" not in p.stderr


def test_hydras_sweep_refusal_names_the_key_not_a_quote_of_its_own_text():
    """"Sweeping over Hydra's configuration ... : '<override>'": the apostrophe in Hydra's was read as
    the key's opening quote (config key 's configuration is not supported : ')."""
    from hydra.errors import ConfigCompositionException

    from adtrain.hydra_errors import composition_error

    err = composition_error(ConfigCompositionException(
        "Sweeping over Hydra's configuration is not supported : 'hydra.sweeper.params.method.coreset_ratio=choice(0.1,0.2)'"))
    assert err.key == "hydra.sweeper.params.method.coreset_ratio"
    assert "'method.coreset_ratio=choice(...)'" in str(err)


def test_multirun_writes_a_summary(tmp_path):
    from tests.conftest import FAST

    sweep = tmp_path / "sweep"
    p = _cli("-m", *FAST, "trainer.limit_train_batches=1", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["seed"] for r in rows] == ["0", "1"]
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert [r["seed"] for r in runs] == [0, 1]
    for row, result in zip(rows, runs):  # the summary holds each run's own numbers
        assert float(row["image_auroc"]) == pytest.approx(result["image_auroc"], abs=1e-4)
    md = (sweep / "summary.md").read_text()
    assert "image_auroc" in md and "Mean ± std" in md


def test_bench_reports_the_runs_own_figures(tmp_path, capsys):
    """adtrain.bench (the source of docs/BENCHMARKS.md's end-to-end rows): its figures are the
    run's results.json figures, the exactness of the pixel metrics included, and are written to
    bench.out as printed."""
    from tests.conftest import FAST

    from adtrain.bench import main

    run_dir, out = tmp_path / "run", tmp_path / "bench.json"
    overrides = [o for o in FAST if not o.startswith(("logger=", "output.heatmaps="))]
    figures = main([*overrides, "method=patchcore", "method.center_crop=null", f"bench.run_dir={run_dir}",
                    f"bench.out={out}", "bench.model_only=true"])
    saved = json.loads((run_dir / "results.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pixel_metrics_exact", "pixel_error_bounds", "fit_seconds",
                "test_images_per_second", "num_test"):
        assert figures[key] == saved[key], key
    assert figures["method"] == "patchcore" and figures["pixel_metrics_exact"] is True
    assert figures["model_only_images_per_second"] > 0
    assert json.loads(out.read_text()) == figures
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):]) == figures
