"""Continual schedules: the task loop, the accuracy matrix, forgetting, resume, joint, routing."""

import csv
import json

import pytest
import torch

from adtrain.errors import ConfigError

# tiny synthetic tasks: 8 training normals (+2 held out), 3 + 3 test images, 32x32, one batch
TINY = [
    "data.num_train=10", "data.num_test_normal=3", "data.num_test_anomalous=3", "data.size=32",
    "method.image_size=[32,32]", "method.batch_size=4", "trainer.limit_train_batches=1", "output.heatmaps=0",
]
MATRIX_METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions: one intra-op thread is faster, and far faster on a loaded shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _record_training(monkeypatch, crash_on=None, modes=None):
    """Patch STFPM's training_step to record each batch's category (and crash on one); with a
    list `modes`, also the train/eval flags of all submodules at each step."""
    from adtrain.methods.stfpm import Stfpm

    original = getattr(Stfpm.training_step, "unpatched", Stfpm.training_step)
    seen = []

    def step(self, batch, idx):
        seen.append(batch["category"][0])
        if modes is not None:
            modes.append({n: m.training for n, m in self.named_modules()})
        if batch["category"][0] == crash_on:
            raise RuntimeError("simulated crash")
        return original(self, batch, idx)

    step.unpatched = original
    monkeypatch.setattr(Stfpm, "training_step", step)
    return seen


def test_three_task_schedule_end_to_end(fast_cfg, tmp_path, monkeypatch):
    from adtrain.loading import load_method
    from adtrain.methods.stfpm import Stfpm
    from adtrain.run import run

    events = []
    monkeypatch.setattr(Stfpm, "begin_task", lambda self, t, cats: events.append(("begin", t, tuple(cats))))
    monkeypatch.setattr(Stfpm, "end_task", lambda self, t, cats: events.append(("end", t, tuple(cats))))
    modes = []
    seen = _record_training(monkeypatch, modes=modes)

    res = run(fast_cfg(*TINY, "schedule=synthetic_3", "logger=csv", "output.heatmaps=1"), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    for key in ("method", "data", "backbone", "seed", "schedule", "tasks", "per_task", "matrices", "summary",
                "image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro", "fit_seconds"):
        assert key in saved, key
    assert saved["tasks"] == [["texture"], ["grid"], ["stripes"]] and saved["category"] == "synthetic_3"
    assert events == [("begin", 0, ("texture",)), ("end", 0, ("texture",)), ("begin", 1, ("grid",)),
                      ("end", 1, ("grid",)), ("begin", 2, ("stripes",)), ("end", 2, ("stripes",))]
    assert seen == ["texture", "grid", "stripes"]  # one batch per task, each task's own data only
    # later tasks train in the same train/eval modes as the first (testing leaves it in eval mode)
    assert modes[1] == modes[0] and modes[2] == modes[0] and modes[0]["model.student"] is True

    for m in MATRIX_METRICS:
        R = saved["matrices"][m]
        assert len(R) == 3 and all(len(row) == 3 for row in R)
        for t in range(3):
            for i in range(3):
                if i > t:
                    assert R[t][i] is None
                else:
                    assert 0.0 <= R[t][i] <= 1.0
        last = R[2]
        assert saved["summary"][f"final_{m}"] == pytest.approx(sum(last) / 3)
        assert saved[m] == pytest.approx(saved["summary"][f"final_{m}"])
        fm = ((max(R[0][0], R[1][0]) - R[2][0]) + (R[1][1] - R[2][1])) / 2
        assert saved["summary"][f"forgetting_{m}"] == pytest.approx(fm)
        png = tmp_path / f"matrix_{m}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [len(p["evaluations"]) for p in saved["per_task"]] == [1, 2, 3]
    # routed validation (schedule.routed_val=last): every task's validation set after the last task,
    # scored as the test sets are; its average is the run's val_* (a sweep's objective)
    assert [len(p["routed_validation"]) for p in saved["per_task"]] == [0, 0, 3]
    assert [p["routed_val_seconds"] > 0 for p in saved["per_task"]] == [False, False, True]
    routed = [r["val/image_auroc"] for r in saved["per_task"][2]["routed_validation"]]
    assert saved["val_source"] == "routed" and saved["val_image_auroc"] == pytest.approx(sum(routed) / 3)
    # the last task's own validation is the final model's: the same figure through the routed path
    assert routed[2] == pytest.approx(saved["per_task"][2]["val_image_auroc"])
    # the logger's task<t>/val/ curves are the tasks' own validations (each task's steps count from 0:
    # one key for all overlaid them on W&B's step axis); the routed ones go under routed_val/
    logged = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    for t, p in enumerate(saved["per_task"]):
        passes = [float(r[f"task{t}/val/image_auroc"]) for r in logged if r.get(f"task{t}/val/image_auroc")]
        # logged as float64: the very figures the selection kept (float32 rounded 0.485 to 0.48500001)
        assert passes == [h["metrics"]["val/image_auroc"] for h in p["selection"]["history"]]
    assert not any(r.get("val/image_auroc") for r in logged)
    assert [float(r["routed_val/task0/image_auroc"]) for r in logged if r.get("routed_val/task0/image_auroc")] == \
        [pytest.approx(routed[0])]
    own = [p["val_image_auroc"] for p in saved["per_task"]]
    assert saved["own_state_val"]["val_image_auroc"] == pytest.approx(sum(own) / 3)
    assert saved["fit_seconds"] == pytest.approx(sum(p["fit_seconds"] for p in saved["per_task"]), abs=0.01)

    for t in range(3):
        assert (tmp_path / "tasks" / str(t) / "model.ckpt").exists()
        assert len(list((tmp_path / "heatmaps" / f"task_{t}").glob("*.png"))) == 1
    state = json.loads((tmp_path / "continual_state.json").read_text())
    assert state["finished"] == [0, 1, 2]
    method, cfg, _ = load_method(tmp_path / saved["final_checkpoint"])  # adtrain.predict can use it
    assert cfg.data.category == "stripes" and method.threshold.isfinite()
    # one shared model decides every task's images: its final threshold is fitted on the held-out
    # normals of all three tasks (schedule.threshold=seen), each earlier task's on its own
    import numpy as np

    from adtrain.build import build_datamodule
    from adtrain.continual.schedule import task_config

    scores = []
    with torch.no_grad():
        for cat in ("texture", "grid", "stripes"):
            dm = build_datamodule(task_config(fast_cfg(*TINY, "schedule=synthetic_3"), [cat]))
            scores.append(torch.cat([method.anomaly_output(b["image"]).pred_score
                                     for b in dm.val_normal_dataloader()]).double().numpy())
    final = saved["per_task"][2]
    assert [p["threshold_tasks"] for p in saved["per_task"]] == [[0], [1], [0, 1, 2]]
    assert final["num_threshold_images"] == sum(len(s) for s in scores) == 6
    assert float(method.threshold) == pytest.approx(np.quantile(np.concatenate(scores), 0.99), rel=1e-5)
    assert final["threshold"] == pytest.approx(float(method.threshold), rel=1e-6)
    assert final["task_threshold"] == pytest.approx(np.quantile(scores[2], 0.99), rel=1e-5)
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert len(rows) == 18 and {r["task"] for r in rows} == {"0", "1", "2"}
    metrics = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert any(r.get("continual/image_auroc/texture") for r in metrics)
    assert any(r.get("continual/forgetting_image_auroc") for r in metrics)
    assert not list(tmp_path.rglob("*.tmp"))


def test_final_average_and_forgetting_on_constructed_matrices():
    from adtrain.continual.metrics import final_average, forgetting, forgetting_per_task, summarize

    R = [[0.9, None, None],
         [0.8, 0.95, None],
         [0.6, 0.9, 0.7]]
    assert final_average(R) == pytest.approx((0.6 + 0.9 + 0.7) / 3)
    # task 0: best before the end 0.9 (t=0), now 0.6 -> 0.3; task 1: 0.95 -> 0.9 -> 0.05
    assert forgetting_per_task(R) == pytest.approx([0.3, 0.05])
    assert forgetting(R) == pytest.approx(0.175)

    # the best earlier value is not always the diagonal; improvements give negative terms
    R4 = [[0.5, None, None, None],
          [0.7, 0.8, None, None],
          [0.9, 0.6, 0.7, None],
          [0.6, 0.9, 0.65, 0.9]]
    assert forgetting_per_task(R4) == pytest.approx([0.3, -0.1, 0.05])
    assert forgetting(R4) == pytest.approx(0.25 / 3)
    assert final_average(R4) == pytest.approx(0.7625)

    # undefined entries are skipped; one row (joint baseline) has no forgetting
    assert forgetting([[0.9, None], [None, 0.8]]) is None
    assert final_average([[0.9, None], [None, 0.8]]) == pytest.approx(0.8)
    assert forgetting([[0.7, 0.9, 0.8]]) is None and final_average([[0.7, 0.9, 0.8]]) == pytest.approx(0.8)
    assert final_average([]) is None and forgetting([]) is None
    s = summarize({"image_auroc": R})
    assert s == {"final_image_auroc": pytest.approx(2.2 / 3), "forgetting_image_auroc": pytest.approx(0.175)}

    # numpy numbers are figures (not dropped as if missing); bools, NaN and None are not
    import numpy as np
    from adtrain.continual.runner import finite_mean

    Rn = [[np.float32(0.9), None, None], [np.float64(0.8), 0.95, None], [0.6, np.float32(0.9), 0.7]]
    assert forgetting(Rn) == pytest.approx(0.175) and final_average(Rn) == pytest.approx(2.2 / 3, rel=1e-6)
    assert finite_mean([np.float32(0.5), 1, True, float("nan"), None]) == pytest.approx(0.75)


def test_resume_after_crash_in_second_task(fast_cfg, tmp_path, monkeypatch):
    from adtrain.methods.stfpm import Stfpm
    from adtrain.run import run

    seen = _record_training(monkeypatch, crash_on="grid")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(fast_cfg(*TINY, "schedule=synthetic_3"), tmp_path)
    state = json.loads((tmp_path / "continual_state.json").read_text())
    assert state["finished"] == [0] and len(state["matrices"]["image_auroc"]) == 1
    assert (tmp_path / "tasks" / "0" / "model.ckpt").exists() and not (tmp_path / "results.json").exists()
    assert seen == ["texture", "grid"]

    # the resumed run starts task 1 from task 0's weights, and never trains task 0 again
    ckpt = torch.load(tmp_path / "tasks" / "0" / "model.ckpt", weights_only=False)["state_dict"]
    expected = sum(float(v.double().sum()) for k, v in ckpt.items() if "student" in k)
    at_begin = {}

    def begin(self, t, cats):
        at_begin[t] = sum(float(v.double().sum()) for k, v in self.state_dict().items() if "student" in k)

    monkeypatch.setattr(Stfpm, "begin_task", begin)
    seen = _record_training(monkeypatch)
    res = run(fast_cfg(*TINY, "schedule=synthetic_3", "resume=true"), tmp_path)
    assert seen == ["grid", "stripes"] and sorted(at_begin) == [1, 2]
    assert at_begin[1] == pytest.approx(expected, rel=1e-9)
    R = res["matrices"]["image_auroc"]
    assert len(R) == 3 and R[2][0] is not None and R[2][2] is not None
    assert R[0] == state["matrices"]["image_auroc"][0]  # the finished task's row is kept as it was
    assert [p["task"] for p in res["per_task"]] == [0, 1, 2]

    # resuming with another schedule is refused, naming the key
    with pytest.raises(ConfigError, match="resume"):
        run(fast_cfg(*TINY, "schedule.tasks=[texture,grid]", "resume=true"), tmp_path)


def test_interrupted_task_resumes_from_its_last_checkpoint(fast_cfg, tmp_path, monkeypatch):
    from adtrain.methods.stfpm import Stfpm
    from adtrain.run import run

    original = Stfpm.training_step
    steps = []

    def step(self, batch, idx):
        steps.append((batch["category"][0], self.current_epoch))
        if crash and batch["category"][0] == "grid" and self.current_epoch == 1:
            raise RuntimeError("simulated crash")
        return original(self, batch, idx)

    monkeypatch.setattr(Stfpm, "training_step", step)
    overrides = [*TINY, "schedule.tasks=[texture,grid]", "trainer.max_epochs=2"]
    crash = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(fast_cfg(*overrides), tmp_path)
    assert (tmp_path / "tasks" / "1" / "checkpoints" / "last.ckpt").exists()
    crash, steps[:] = False, []
    res = run(fast_cfg(*overrides, "resume=true"), tmp_path)
    assert steps == [("grid", 1)]  # epoch 0 of task 1 and all of task 0 are not redone
    assert res["per_task"][1]["epochs_trained"] == 2 and len(res["matrices"]["image_auroc"]) == 2


def test_joint_baseline_has_one_row(fast_cfg, tmp_path, monkeypatch):
    from adtrain.run import run

    seen = _record_training(monkeypatch)
    res = run(fast_cfg(*TINY, "schedule=synthetic_3", "schedule.joint=true", "trainer.limit_train_batches=null"),
              tmp_path)
    assert set(seen) == {"texture", "grid", "stripes"}  # one training on the union
    for m in MATRIX_METRICS:
        R = res["matrices"][m]
        assert len(R) == 1 and len(R[0]) == 3 and all(v is not None for v in R[0])
        assert res["summary"][f"forgetting_{m}"] is None
    assert len(res["per_task"]) == 1 and res["per_task"][0]["num_train"] == 24
    assert res["per_task"][0]["threshold_tasks"] == [0, 1, 2]  # fitted on every task's held-out normals
    assert [e["num_test"] for e in res["per_task"][0]["evaluations"]] == [6, 6, 6]
    assert (tmp_path / "matrix_image_auroc.png").exists()


def test_user_defined_grouped_tasks_with_replay(fast_cfg, tmp_path, monkeypatch):
    from adtrain.run import run

    res = run(fast_cfg(*TINY, "schedule.tasks=[[texture,grid],stripes]", "schedule.replay=3"), tmp_path)
    assert res["tasks"] == [["texture", "grid"], ["stripes"]] and res["task_names"] == ["texture+grid", "stripes"]
    assert res["category"] == "custom"
    assert [len(r) for r in res["matrices"]["image_auroc"]] == [2, 2]
    first, second = res["per_task"]
    assert first["num_train"] == 16 and first["replay_images"] == 0
    assert second["num_train"] == 8 and second["replay_images"] == 3
    assert res["summary"]["replay_images_total"] == 3
    assert [e["num_test"] for e in second["evaluations"]] == [12, 6]
    # a grouped task's figure pools its categories (R[t][i]); each category's figures are kept too, and the
    # last row's mean over every category (IUF's figure: each class weighs the same), recomputed here
    from sklearn.metrics import roc_auc_score

    with open(tmp_path / "scores.csv") as f:
        rows = list(csv.DictReader(f))

    def auroc(cat):
        mine = [r for r in rows if r["category"] == cat]
        return roc_auc_score([int(r["label"]) for r in mine], [float(r["score"]) for r in mine])

    grouped = second["evaluations"][0]["by_category"]
    assert set(grouped) == {"texture", "grid", "mean"} and "by_category" not in second["evaluations"][1]
    for cat in ("texture", "grid"):
        assert grouped[cat]["image_auroc"] == pytest.approx(auroc(cat), abs=1e-9)
    final = res["final_by_category"]
    assert set(final) == {"texture", "grid", "stripes", "mean"}
    mean = sum(auroc(c) for c in ("texture", "grid", "stripes")) / 3
    assert final["mean"]["image_auroc"] == pytest.approx(mean, abs=1e-9)
    assert res["summary"]["final_category_mean_image_auroc"] == pytest.approx(mean, abs=1e-9)
    assert res["summary"]["final_image_auroc"] == pytest.approx(  # the pooled task figure, weighed per task
        (second["evaluations"][0]["image_auroc"] + auroc("stripes")) / 2, abs=1e-9)
    assert res["schedule"]["threshold"] == "seen" and res["schedule"]["routed_val"] == "last"


def test_replay_buffer_is_bounded_seeded_and_from_earlier_tasks_only():
    from adtrain.continual.runner import replay_buffer

    own = [[f"a{i}" for i in range(10)], [f"b{i}" for i in range(2)], [f"c{i}" for i in range(5)]]
    names = ["a", "b", "c"]
    buf = replay_buffer(own, 2, 4, seed=0, names=names)
    assert len(buf) == 6 and sum(x.startswith("a") for x in buf) == 4 and sum(x.startswith("b") for x in buf) == 2
    assert not any(x.startswith("c") for x in buf)
    assert buf == replay_buffer(own, 2, 4, seed=0, names=names)
    assert replay_buffer(own, 0, 4, seed=0, names=names) == []


def test_schedule_configs_and_errors(fast_cfg, base_cfg, tmp_path):
    from adtrain.continual.schedule import parse_tasks, read_schedule
    from adtrain.data.mvtec import MVTEC_CATEGORIES
    from adtrain.data.visa import VISA_CATEGORIES
    from adtrain.run import run
    from tests.conftest import compose

    mv = read_schedule(compose("data=mvtec", "schedule=mvtec_15"))
    assert [t[0] for t in mv.tasks] == sorted(MVTEC_CATEGORIES) and mv.name == "mvtec_15"
    sizes = {"mvtec_14_1": [14, 1], "mvtec_10_5": [10, 5], "mvtec_3x5": [3] * 5, "mvtec_10_1x5": [10] + [1] * 5,
             "visa_11_1": [11, 1], "visa_8_4": [8, 4], "visa_8_1x4": [8] + [1] * 4, "visa_12": [1] * 12}
    for name, want in sizes.items():
        s = read_schedule(compose(f"schedule={name}"))
        assert [len(t) for t in s.tasks] == want, name
        flat = [c for t in s.tasks for c in t]
        assert flat == sorted(VISA_CATEGORIES if name.startswith("visa") else MVTEC_CATEGORIES), name
    assert read_schedule(compose("schedule=elpv_mono_poly")).tasks == [["mono"], ["poly"]]
    assert compose().schedule.tasks is None  # the default stays a single run

    with pytest.raises(ConfigError, match="schedule.tasks.*texture.*task 0 and task 1"):
        parse_tasks(["texture", ["texture", "grid"]])
    with pytest.raises(ConfigError, match="schedule.tasks"):
        parse_tasks([[]])
    with pytest.raises(ConfigError, match="schedule.replay"):
        read_schedule(compose("schedule=synthetic_3", "schedule.replay=-1"))
    assert read_schedule(compose("schedule=synthetic_3")).routed_val == "last"
    assert read_schedule(compose("schedule=synthetic_3")).threshold == "seen"
    assert read_schedule(compose("schedule=synthetic_3", "schedule.threshold=task")).threshold == "task"
    with pytest.raises(ConfigError, match="schedule.threshold"):
        read_schedule(compose("schedule=synthetic_3", "schedule.threshold=all"))
    with pytest.raises(ConfigError, match="schedule.routed_val"):
        read_schedule(compose("schedule=synthetic_3", "schedule.routed_val=first"))
    # a category the data set does not have fails before any training, naming the task
    with pytest.raises(ConfigError, match=r"schedule.tasks.*task 1 \(bottle\)"):
        run(fast_cfg(*TINY, "schedule.tasks=[texture,bottle]"), tmp_path)
    assert not (tmp_path / "tasks").exists()
    # a schedule of another data set's categories on a folder data set: schedule.tasks named, not data.category
    from adtrain.data.testing import write_mvtec_tree

    root = write_mvtec_tree(tmp_path / "mvtec", "bottle", n_train=4, n_test_good=1, size=32)
    with pytest.raises(ConfigError, match=r"config key 'schedule.tasks': task 1 \(grid\) does not fit data=mvtec: "
                                          r".*grid: category folder not found"):
        run(base_cfg("data=mvtec", f"data.root={root}", "data.num_workers=0", "schedule.tasks=[bottle,grid]"),
            tmp_path / "mv")
    with pytest.raises(ConfigError, match="resume"):
        run(fast_cfg(*TINY, "schedule=synthetic_3", "resume=true"), tmp_path / "empty")


def test_task_router_picks_the_task_of_clustered_features():
    from adtrain.continual.routing import TaskRouter, select_by_score

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    router = TaskRouter(max_keys=20)
    for t in range(3):
        assert router.add_task(centres[t] + 0.5 * torch.randn(50, 16, generator=g)) == t
    assert len(router) == 3 and all(k.shape == (20, 16) for k in router.keys)
    truth = torch.tensor([2, 0, 1, 1, 0, 2])
    query = centres[truth][:, None, :] + 0.5 * torch.randn(6, 12, 16, generator=g)  # (B, P, D)
    assert torch.equal(router.route(query), truth)
    maps = query.transpose(1, 2).reshape(6, 16, 3, 4)  # (B, D, H, W) feature maps
    assert torch.equal(router.route(maps), truth)
    d = router.task_distances(query)
    assert d.shape == (6, 3) and bool((d.gather(1, truth[:, None]) < d).sum(1).eq(2).all())

    restored = TaskRouter()
    restored.load_state_dict(router.state_dict())
    assert torch.equal(restored.route(query), truth)

    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.4], [0.7, 0.8, 0.05]])  # (T=3, B=3)
    assert select_by_score(scores).tolist() == [1, 0, 2]
    with pytest.raises(Exception, match="dimension"):
        router.add_task(torch.randn(5, 8))


def test_wandb_gets_tables_line_plots_heatmaps_and_summary(tmp_path):
    import wandb

    from adtrain.continual.outputs import log_final, plot_matrix

    class FakeRun:
        id = "abc123"

        def __init__(self):
            self.logged, self.summary, self.artifacts = [], {}, []

        def log(self, payload):
            self.logged.append(payload)

        def log_artifact(self, art):
            self.artifacts.append(art)

    class WandbLogger:  # adtrain.loggers.is_wandb goes by the class name
        def __init__(self):
            self.experiment, self.scalars, self.saved = FakeRun(), [], 0

        def log_metrics(self, metrics, step=None):
            self.scalars.append(metrics)

        def save(self):
            self.saved += 1

    R = [[0.9, None], [0.7, 0.8]]
    results = {"task_names": ["a", "b"], "schedule": {"joint": False},
               "matrices": {"image_auroc": R, "pixel_aupro": [[None, None], [None, None]]},
               "summary": {"final_image_auroc": 0.75, "forgetting_image_auroc": 0.2, "final_pixel_aupro": None}}
    png = plot_matrix(R, ["a", "b"], "image_auroc", tmp_path / "m.png")
    logger = WandbLogger()
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights")
    records = [{"task": 0, "path": "x.png", "score": 1.5, "label": 1}, {"task": 1, "path": "y.png", "score": 0.2, "label": 0}]
    log_final(logger, results, {"image_auroc": png}, {"a": [png, png], "b": []}, records, ckpt)
    merged = {k: v for p in logger.experiment.logged for k, v in p.items()}
    heat = merged["continual/heatmaps/a"]  # the final row's test heatmaps, per task
    assert len(heat) == 2 and all(isinstance(im, wandb.Image) for im in heat) and "continual/heatmaps/b" not in merged
    scores = merged["continual/scores"]
    assert scores.columns == ["task", "path", "score", "label"] and scores.data[1] == [1, "y.png", 0.2, 0]
    (art,) = logger.experiment.artifacts
    assert art.name == "model-abc123" and art.type == "model" and art.metadata["continual/final_image_auroc"] == 0.75
    table = merged["continual/matrix/image_auroc"]
    assert isinstance(table, wandb.Table) and table.columns == ["after_task", "a", "b"]
    assert table.data[1][1:] == [0.7, 0.8]
    assert "continual/curve/image_auroc" in merged and "continual/heatmap/image_auroc" in merged
    assert "continual/curve/pixel_aupro" not in merged  # nothing defined to plot
    assert logger.experiment.summary == {"continual/final_image_auroc": 0.75, "continual/forgetting_image_auroc": 0.2}
    assert logger.scalars == [{"continual/final_image_auroc": 0.75, "continual/forgetting_image_auroc": 0.2}]
