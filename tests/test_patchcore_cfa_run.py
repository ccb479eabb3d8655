"""PatchCore and CFA through `python -m adtrain`'s run path, and inside continual schedules."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from adtrain.viz import denormalize


def test_patchcore_run_ranks_defects_and_keeps_a_coreset(fast_cfg, tmp_path, caplog):
    import logging

    from adtrain.loading import load_method
    from adtrain.run import run

    res = run(fast_cfg("method=patchcore", "method.coreset_ratio=0.25"), tmp_path)
    assert res["method"] == "patchcore" and res["image_auroc"] > 0.8 and res["pixel_auroc"] > 0.8
    assert json.loads((tmp_path / "results.json").read_text())["pixel_aupro"] > 0.6  # a constant map gives ~0.15
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="adtrain"):
        m, _, _ = load_method(tmp_path / "checkpoints" / "model.ckpt")
    # the backbone is built without weights, then given the checkpoint's: no "random init" note
    assert "random init" not in caplog.text and "loaded from" in caplog.text and "model.ckpt" in caplog.text
    assert not logging.getLogger("adtrain").filters
    patches_per_image = 8 * 8  # layer2 grid at 64x64 input
    expected = round(0.25 * res["num_train"] * patches_per_image)
    assert abs(len(m.model.memory) - expected) <= 1


@pytest.mark.parametrize("method", ["patchcore", "dfm"])
def test_a_pass_the_host_memory_cannot_hold_is_refused_at_its_first_batch(fast_cfg, tmp_path, monkeypatch, method):
    """Not an hour of extraction ending in the OOM killer: the refusal names the cap's key and a
    value that fits, and that value runs."""
    from adtrain.errors import ConfigError
    from adtrain.memory import ram
    from adtrain.run import run

    key, switch = (("method.memory.max_features", "method.memory.ram_check") if method == "patchcore"
                   else ("method.max_memory_features", "method.ram_check"))
    monkeypatch.setattr(ram, "available_bytes", lambda: 400_000)  # the whole pass needs ~2.5 MB
    with pytest.raises(ConfigError, match=rf"config key '{key}'.*{switch}=false") as err:
        run(fast_cfg(f"method={method}", "trainer.max_epochs=1"), tmp_path / "a")
    fits = int(str(err.value).split("about ")[1].split(" fit")[0].replace(",", ""))
    res = run(fast_cfg(f"method={method}", "trainer.max_epochs=1", f"{key}={fits}", "trainer.limit_val_batches=1",
                       "trainer.limit_test_batches=1"), tmp_path / "b")
    assert res["method"] == method


def test_cfa_run_learns_radius_and_ranks_defects(fast_cfg, tmp_path):
    from adtrain.loading import load_method
    from adtrain.run import run

    res = run(fast_cfg("method=cfa", "trainer.max_epochs=2"), tmp_path / "a")
    assert res["method"] == "cfa" and res["image_auroc"] > 0.85 and res["pixel_auroc"] > 0.9
    m, _, _ = load_method(tmp_path / "a" / "checkpoints" / "model.ckpt")
    assert isinstance(m.model.radius, torch.nn.Parameter) and float(m.model.radius) != 1e-5
    assert len(m.model.memory) == 16 * 16  # layer1 grid at 64x64: one item per position
    run(fast_cfg("method=cfa", "method.learn_radius=false", "trainer.limit_train_batches=1"), tmp_path / "b")
    m2, _, _ = load_method(tmp_path / "b" / "checkpoints" / "model.ckpt")
    assert not isinstance(m2.model.radius, torch.nn.Parameter) and abs(float(m2.model.radius) - 1e-5) < 1e-12


def test_patchcore_per_task_banks_route_images_to_their_task(fast_cfg, tmp_path):
    from adtrain.build import build_datamodule
    from adtrain.loading import load_method
    from adtrain.run import run

    cfg = fast_cfg("method=patchcore", "schedule=synthetic_3", "method.coreset_ratio=0.5")
    res = run(cfg, tmp_path)
    assert len(res["matrices"]["image_auroc"]) == 3
    final = sorted((tmp_path / "tasks").glob("*/model.ckpt"))[-1]
    m, _, _ = load_method(final)
    assert len(m.task_memories) == 3
    correct = total = 0
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for t, cat in enumerate(["texture", "grid", "stripes"]):
        c2 = fast_cfg("method=patchcore", f"data.category={cat}")
        dm = build_datamodule(c2)
        batch = next(iter(dm.test_dataloader()))
        for i in range(3):
            Image.fromarray(denormalize(batch["image"][i])).save(pngs / f"{cat}_{i}.png")
        with torch.no_grad():
            m.anomaly_output(batch["image"])
        correct += int((m.last_routed_tasks == t).sum())
        total += batch["image"].shape[0]
        # each image is decided with its routed task's threshold (fitted on that task's normals),
        # not the last task's: predict_step and the display map's 0.5 level follow it
        thresholds = torch.tensor([p["threshold"] for p in res["per_task"]])
        assert torch.equal(torch.stack(m.task_calibration)[:, 0], thresholds.float())
        with torch.no_grad():
            pred = m.predict_step(batch["image"])
        own = thresholds.float()[m.last_routed_tasks]
        assert torch.equal(pred["decision"], pred["score"] > own)
        cal = torch.stack(m.task_calibration)[m.last_routed_tasks]  # (B, 3): threshold, score and map centres
        assert torch.allclose(pred["normalized_score"], 0.5 * (pred["score"] - cal[:, 1]) / (cal[:, 0] - cal[:, 1]))
    assert correct / total > 0.8
    assert len(set(thresholds.tolist())) == 3  # the tasks' thresholds differ: the check above can fail
    # scores.csv: every test image's prediction against its routed task's threshold
    import csv

    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert rows and all(r["prediction"] in ("0", "1") for r in rows)
    last = thresholds[-1].item()
    assert any(int(r["prediction"]) != int(float(r["score"]) > last) for r in rows)  # not the last task's
    # adtrain.predict's CSV: each image's threshold is its routed task's, as its decision is
    from adtrain.inference.detector import Detector
    from adtrain.predict import predict

    files = sorted(str(p) for p in pngs.glob("*.png"))
    det = Detector.load(final, device="cpu", batch_size=len(files))
    pred = det.predict(files)
    routed = det.method.last_routed_tasks
    assert np.array_equal(pred.thresholds, thresholds.float().numpy()[routed.numpy()])
    assert len(set(routed.tolist())) > 1
    out = predict(str(final), str(pngs / "*.png"), out=str(tmp_path / "pred"), batch_size=len(files),
                  device="cpu", heatmaps=False)
    rows = {r["path"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    for f, thr, score in zip(pred.names, pred.thresholds, pred.scores):
        r = rows[f]
        assert float(r["threshold"]) == pytest.approx(float(thr)) and int(r["is_anomalous"]) == int(score > thr)

    # export: a routing checkpoint is refused (no export folder made for it: one was); a task's own checkpoint
    # exports beside it, not to RUN/export where the next task's export would replace it
    from adtrain.errors import DataError
    from adtrain.export import export

    with pytest.raises(DataError, match=r"routes images among several tasks.*tasks/0/model\.ckpt"):
        export(final, "torchscript")
    assert not (tmp_path / "export").exists()
    first_task = tmp_path / "tasks" / "0" / "model.ckpt"
    assert export(first_task, "torchscript") == first_task.resolve().parent / "export" / "model.pt"
    assert Detector.load(first_task.parent / "export" / "model.pt", device="cpu").predict(files[:2]).scores.shape == (2,)

    # adtrain.test on the continual run: every seen task's test set, as the run's last row (not the last
    # task's alone); a task's checkpoint: the tasks up to it; data.category: those categories as one set
    import adtrain

    again = adtrain.test(tmp_path, out_dir=tmp_path / "again")
    assert [e["image_auroc"] for e in again["per_task"]] == pytest.approx(res["matrices"]["image_auroc"][2], abs=1e-9)
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert again[key] == pytest.approx(res[key], abs=1e-9), key
    assert len(set(res["matrices"]["image_auroc"][2])) > 1  # the average differs from the last task's figure
    assert [float(r["score"]) for r in csv.DictReader(open(tmp_path / "again" / "scores.csv"))] == \
        pytest.approx([float(r["score"]) for r in csv.DictReader(open(tmp_path / "scores.csv"))], abs=1e-6)
    drawn = {f.parent.name: [] for f in (tmp_path / "again" / "heatmaps").rglob("*.png")}
    assert sorted(drawn) == ["task_0", "task_1", "task_2"]  # moved in from the test's staging folder, which is gone
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["heatmaps", "scores.csv"]
    first = adtrain.test(tmp_path / "tasks" / "1" / "model.ckpt", ["output.heatmaps=0"])
    assert [e["image_auroc"] for e in first["per_task"]] == pytest.approx(res["matrices"]["image_auroc"][1][:2], abs=1e-9)
    one = adtrain.test(tmp_path, ["data.category=grid", "output.heatmaps=0"])
    assert "per_task" not in one and one["num_test"] == res["per_task"][2]["evaluations"][1]["num_test"]


def test_patchcore_shared_bank_grows_across_tasks(fast_cfg, tmp_path):
    from adtrain.loading import load_method
    from adtrain.run import run

    run(fast_cfg("method=patchcore", "schedule=synthetic_3", "method.continual=shared", "method.coreset_ratio=0.25"), tmp_path)
    sizes = [len(load_method(p)[0].model.memory) for p in sorted((tmp_path / "tasks").glob("*/model.ckpt"))]
    assert sizes[0] < sizes[1] < sizes[2]


def test_cfa_eval_batch_size_keeps_the_memory_and_the_scores(fast_cfg, tmp_path):
    """The eval batch (CFA: 32; elsewhere the training batch) is a speed setting: the memory is the
    same (its init keeps the training batch: C is an equal-weight mean of batch means) and so are
    the scores. Bit for bit on ELPV at 224x224 (docs/BENCHMARKS.md); at this 64x64 size oneDNN's
    blur convolution may round differently per batch shape, so here to float32 precision."""
    import csv

    from adtrain.build import build_datamodule
    from adtrain.loading import load_method
    from adtrain.run import run

    cfg = fast_cfg("method=cfa")
    assert cfg.method.eval_batch_size == 32 and build_datamodule(cfg).eval_batch_size == 32
    assert fast_cfg("method=patchcore").data.eval_batch_size is None  # other methods: batch_size
    runs, rows, res = {}, {}, {}
    for name, eval_bs in (("same", "null"), ("other", "5")):
        res[name] = run(fast_cfg("method=cfa", "trainer.limit_train_batches=1",
                                 f"method.eval_batch_size={eval_bs}"), tmp_path / name)
        runs[name] = load_method(tmp_path / name / "checkpoints" / "model.ckpt")[0]
        rows[name] = list(csv.DictReader(open(tmp_path / name / "scores.csv")))
    assert torch.equal(runs["same"].model.memory.bank, runs["other"].model.memory.bank)
    assert [r["path"] for r in rows["same"]] == [r["path"] for r in rows["other"]]
    a, b = ([float(r["score"]) for r in rows[n]] for n in ("same", "other"))
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=0)
    assert res["same"]["image_auroc"] == res["other"]["image_auroc"]


def _per_state(m, images):
    """The routed output the slow way: every task's memory runs the whole model."""
    from adtrain.methods.base import AnomalyModule

    current = {k: v.clone() for k, v in m.memory_state().items()}
    outs = []
    for state in m.task_memories:
        m.load_memory_state(state)
        outs.append(AnomalyModule.anomaly_output(m, images))
    m.load_memory_state(current)
    scores = torch.stack([o.pred_score for o in outs])
    best, rows = scores.argmin(0), torch.arange(images.shape[0])
    return best, torch.stack([o.anomaly_map for o in outs])[best, rows], scores[best, rows]



@pytest.mark.parametrize("method", ["patchcore", "cfa", "hetmm"])
def test_per_task_memories_share_one_frozen_pass_per_image(fast_cfg, tmp_path, method):
    """Routing among T task memories runs the memory-independent part of the model (backbone,
    pooling) once per image, not T times, with the outputs of running each memory's whole model."""
    from adtrain.build import build_datamodule
    from adtrain.loading import load_method
    from adtrain.run import run

    over = [f"method={method}", "schedule=synthetic_3", "method.continual=per_task", "trainer.max_epochs=1",
            "output.heatmaps=0"]
    if method == "patchcore":
        over.append("method.coreset_ratio=0.25")
    run(fast_cfg(*over), tmp_path)
    m, _, _ = load_method(sorted((tmp_path / "tasks").glob("*/model.ckpt"))[-1])
    m.eval()
    assert len(m.task_memories) == 3 and not m.task_open
    m.cpu_chunk_pixels = 3 * 64 * 64  # three images a call
    images = next(iter(build_datamodule(fast_cfg(f"method={method}", "data.category=grid")).test_dataloader()))["image"]
    images = images[:6].float() if images.dtype != torch.uint8 else m.model_input(images[:6])
    calls = []
    hook = m.model.extractor.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        shared = m.anomaly_output(images)
        assert calls == [3, 3]  # each image once, in the chunks of a single pass
        best, maps, scores = _per_state(m, images)
    hook.remove()
    assert sum(calls) == 3 * 6 + 6  # the slow way: once per task memory
    assert torch.equal(m.last_routed_tasks, best)
    assert torch.allclose(shared.pred_score, scores, atol=1e-6) and torch.allclose(shared.anomaly_map, maps, atol=1e-5)
