"""The validation set (held-out normals + synthetic anomalies), selection on it, and the test set
kept closed until testing."""

import json

import numpy as np
import pytest
import torch

from adtrain.errors import ConfigError

TINY = ["data.num_train=20", "data.num_test_normal=4", "data.num_test_anomalous=4", "data.size=64"]


def _dm(cfg):
    from adtrain.build import build_datamodule

    return build_datamodule(cfg)


def _batches(loader):
    return [{k: v.clone() if isinstance(v, torch.Tensor) else list(v) for k, v in b.items()} for b in loader]


def test_validation_set_is_identical_across_epochs_and_methods(fast_cfg):
    a = _dm(fast_cfg(*TINY, "method=stfpm"))
    b = _dm(fast_cfg(*TINY, "method=patchcore", "method.image_size=[48,48]"))
    va, vb = a.validation_dataset(), b.validation_dataset()
    n = len(a.val_samples)
    assert n >= 2 and len(va) == len(vb) == 2 * n and va.num_anomalies == n
    assert [(s.path, f, c) for s, f, c in va.items] == [(s.path, f, c) for s, f, c in vb.items]
    assert {f for _, f, _ in va.items[n:]} == {"cutpaste", "perlin"}
    for i in range(n, len(va)):  # the same anomalous image and mask, before each method's resize
        (ia, ma), (ib, mb) = va._anomaly(i), vb._anomaly(i)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb) and ma.any()
    first, second = _batches(a.val_dataloader()), _batches(a.val_dataloader())  # two "epochs"
    for x, y in zip(first, second):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    labels = torch.cat([x["label"] for x in first])
    assert int(labels.sum()) == n and int(labels[:n].sum()) == 0
    masks = torch.cat([x["mask"] for x in first])
    assert masks[:n].sum() == 0 and all(masks[i].sum() > 0 for i in range(n, 2 * n))
    # another seed: another held-out split and other anomalies
    c = _dm(fast_cfg(*TINY, "method=stfpm", "seed=1")).validation_dataset()
    assert [s.path for s, _, _ in c.items] != [s.path for s, _, _ in va.items] or not np.array_equal(
        c._anomaly(n)[0], va._anomaly(n)[0])


def test_validation_items_are_made_once_per_split_and_served_from_memory(fast_cfg):
    """val_dataloader makes every item once (threads in the main process) and, when they fit in
    cache_mb, serves them from memory with no loader workers: the same batches as items made one by
    one, one dataset for every pass, the seconds it took reported once. Over the budget the anomalies
    alone are kept (the workers inherit them), and past that too, nothing."""
    from adtrain.selection import _prep_seconds

    dm = _dm(fast_cfg(*TINY, "method=stfpm", "data.num_workers=1"))
    loader = dm.val_dataloader()
    ds = dm.validation_dataset()
    n = len(dm.val_samples)
    assert ds.held and loader.num_workers == 0 and ds._cache == {} and len(ds._held) == 2 * n
    first = _batches(loader)
    kept = dict(ds._held)
    second = _batches(dm.val_dataloader())  # a second pass makes nothing again
    assert ds is dm.validation_dataset() and all(ds._held[i] is kept[i] for i in kept)
    assert _prep_seconds(dm) > 0.0 and _prep_seconds(dm) == 0.0  # counted once, as validation time

    tight = _dm(fast_cfg(*TINY, "method=stfpm", "data.num_workers=1"))
    ds = tight.validation_dataset()
    ds.prefill()
    assert set(ds._cache) == set(range(n, 2 * n))
    ds.spec.cache_mb = (ds._cached_bytes + 1) / 2**20  # the anomalies fit, the served items do not
    loader = tight.val_dataloader()
    assert not ds.held and loader.num_workers == 1 and set(ds._cache) == set(range(n, 2 * n))
    one_by_one = [ds._item(i) for i in range(2 * n)]
    for batches in (first, second, _batches(loader)):
        items = [{k: v[j] for k, v in b.items()}
                 for b in batches for j in range(len(b["label"]))]
        assert len(items) == 2 * n
        for x, y in zip(items, one_by_one):
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
            assert torch.equal(x["label"], y["label"]) and x["defect"] == y["defect"] and x["path"] == y["path"]
    none = _dm(fast_cfg(*TINY, "method=stfpm", "data.num_workers=1", "data.val_anomalies.cache_mb=0"))
    assert not none.validation_dataset().hold()  # over the budget: nothing kept, the workers make them
    assert none.validation_dataset()._cache == {} and none.val_dataloader().num_workers == 1


def test_validation_anomalies_made_in_threads_are_the_ones_made_one_by_one(fast_cfg):
    """prefill's threads draw each item from its own seeded generator: the same bytes for any count,
    and the budget still stops it at the first anomaly that does not fit."""
    made = {}
    for threads in (1, 3):
        ds = _dm(fast_cfg(*TINY, "method=stfpm", "data.num_workers=0")).validation_dataset()
        ds.prefill(threads=threads)
        made[threads] = ds._cache
    assert made[1] and made[1].keys() == made[3].keys()
    for i in made[1]:
        assert np.array_equal(made[1][i][0], made[3][i][0]) and np.array_equal(made[1][i][1], made[3][i][1])
    one = next(iter(made[1].values()))
    budget = 2.5 * (one[0].nbytes + one[1].nbytes) / 2**20  # room for two of them
    tight = _dm(fast_cfg(*TINY, "method=stfpm", "data.num_workers=0", f"data.val_anomalies.cache_mb={budget}"))
    ds = tight.validation_dataset()
    ds.prefill(threads=2)
    assert len(ds._cache) == 2 and sorted(ds._cache) == sorted(made[1])[:2]


def test_validation_set_does_not_depend_on_the_install_location(tmp_path):
    """The same data in two folders gives the same validation anomalies (seeded by the path below
    the data root, not the absolute path)."""
    from adtrain.data.mvtec import MVTecDataModule
    from adtrain.data.testing import write_mvtec_tree

    sets = []
    for where in ("a", "elsewhere/b"):
        root = write_mvtec_tree(tmp_path / where / "mvtec", n_train=12, size=48)
        dm = MVTecDataModule(root=str(root), category="widget", image_size=[48, 48], val_split=0.5,
                             val_anomalies={"families": ["cutpaste", "perlin"]})
        dm.setup("fit")
        sets.append(dm.validation_dataset())
    a, b = sets
    n = len(a.items) // 2
    assert n >= 2 and a.num_anomalies == b.num_anomalies == n
    for i in range(n, 2 * n):
        (ia, ma), (ib, mb) = a._anomaly(i), b._anomaly(i)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)


def test_by_category_overrides_one_category_and_leaves_the_others_identical(tmp_path):
    """``by_category`` merges its options over the family's for that category only: the other
    category's anomalies are bit-identical, the overridden one's change (here: the Perlin opacity)."""
    from adtrain.data.mvtec import MVTecDataModule
    from adtrain.data.testing import write_mvtec_tree

    root = tmp_path / "mvtec"
    for i, cat in enumerate(("widget", "gadget")):
        write_mvtec_tree(root, category=cat, n_train=8, size=48, seed=i)

    def val_set(**extra):
        dm = MVTecDataModule(root=str(root), category=["widget", "gadget"], image_size=[48, 48], val_split=0.5,
                             val_anomalies={"families": ["perlin"], "perlin": {"beta": [0.9, 0.95]}, **extra})
        dm.setup("fit")
        return dm.validation_dataset()

    base, over = val_set(), val_set(by_category={"gadget": {"perlin": {"beta": [0.0, 0.05]}}})
    assert over.spec.generator("perlin", "gadget").config.beta == (0.0, 0.05)
    assert over.spec.generator("perlin", "widget").config.beta == (0.9, 0.95)
    assert over.spec.generator("perlin", "gadget").config.area_ratio == base.spec.generators["perlin"].config.area_ratio
    n = len(base.items) // 2
    cats = set()
    for i in range(n, 2 * n):
        (ia, ma), (ib, mb) = base._anomaly(i), over._anomaly(i)
        cat = base.items[i][0].category
        cats.add(cat)
        assert np.array_equal(ma, mb)  # same rng: the same mask, only the blend differs
        if cat == "widget":
            assert np.array_equal(ia, ib)
        else:  # 5-10 % of the image left inside the mask instead of 90-95 %: a visibly stronger anomaly
            inside = ma.astype(bool)
            orig = base.base._load(base.items[i][0])[0][inside].astype(np.float32)
            assert np.abs(ib[inside] - orig).mean() > 3 * np.abs(ia[inside] - orig).mean()
    assert cats == {"widget", "gadget"}
    for bad, key in (({"gadget": {"gan": {}}}, "by_category.gadget"), ([1], "by_category"),
                     ({"gadget": {"perlin": {"beta": [2, 3]}}}, "perlin.beta")):
        with pytest.raises(ConfigError, match=key):
            val_set(by_category=bad)


def test_a_categorys_validation_anomalies_do_not_depend_on_the_other_categories_of_its_task():
    """One family order over every category's normals gave texture other families (so other anomalies
    and masks) beside grid than alone: a joint baseline or a multi-category task was selected on
    another validation set than the same category's own run. Each category now draws its own."""
    from adtrain.data.synthetic import SyntheticDataModule

    def anomalies(category):
        dm = SyntheticDataModule(category=category, num_train=20, num_test_normal=2, num_test_anomalous=2, size=64,
                                 image_size=(64, 64), val_split=0.25, seed=3,
                                 val_anomalies={"families": ["cutpaste", "perlin"], "per_normal": 1})
        dm.setup()
        ds = dm.validation_dataset()
        return {it["path"]: it["mask"] for it in (ds[i] for i in range(len(ds)))
                if it["category"] == "texture" and it["label"] == 1}

    alone, beside = anomalies("texture"), anomalies(["grid", "texture"])
    assert len(alone) == 5 and {p.rsplit("#", 1)[1][:-1] for p in alone} == {"cutpaste", "perlin"}
    assert sorted(alone) == sorted(beside)  # the same items: image, family and copy
    assert all(torch.equal(alone[p], beside[p]) for p in alone)


def test_threshold_uses_normals_only(fast_cfg):
    dm = _dm(fast_cfg(*TINY))
    labels = torch.cat([b["label"] for b in dm.val_normal_dataloader()])
    assert len(labels) == len(dm.val_samples) and int(labels.sum()) == 0


def test_no_test_image_or_label_is_read_before_testing(base_cfg, tmp_path, monkeypatch):
    """The test files raise when decoded until testing. The pre-flight check (adtrain.data.file_checks) may
    list the test set to read file headers, but may use nothing of a test sample but its paths: no
    label, no pixels; with test=false it does not even list it."""
    import adtrain.data.dataset as dataset
    import adtrain.engine as engine
    import adtrain.run as run_mod
    from adtrain.data.mvtec import MVTecDataModule
    from adtrain.data.testing import write_mvtec_tree

    root = write_mvtec_tree(tmp_path / "mvtec", n_train=10, n_test_good=3, defects={"crack": 3}, size=48)
    state = {"testing": False, "listed_before": False, "read_before": set()}

    def guard(fn):
        def wrapped(path, *args, **kwargs):
            if not state["testing"] and ("/test/" in str(path) or "ground_truth" in str(path)):
                raise AssertionError(f"test file opened before testing: {path}")
            return fn(path, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(dataset, "read_image", guard(dataset.read_image))
    monkeypatch.setattr(dataset, "read_mask", guard(dataset.read_mask))
    list_test = MVTecDataModule._test_samples

    class Watched:
        """A listed test sample that records which of its fields are read before testing."""

        def __init__(self, sample):
            self._sample = sample

        def __getattr__(self, name):
            if not state["testing"]:
                state["read_before"].add(name)
            return getattr(self._sample, name)

    def listing(self):
        state["listed_before"] |= not state["testing"]
        return [Watched(s) for s in list_test(self)]

    monkeypatch.setattr(MVTecDataModule, "_test_samples", listing)
    evaluate = engine.evaluate_method

    def evaluate_opened(*args, **kwargs):
        state["testing"] = True
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate_method", evaluate_opened)
    over = ["data=mvtec", f"data.root={root}", "data.category=widget", "data.num_workers=0",
            "method=dfm", "method.rounds=1", "method.stage1_epochs=1", "method.stage2_epochs=1",
            "trainer.max_epochs=2", "method.memory_size=16", "test_start=true"]
    res = run_mod.run(base_cfg(*over, "test=false"), tmp_path / "no_test")
    assert not state["testing"] and not state["listed_before"]
    assert res["tested"] is False and res["image_auroc"] is None and res["val_image_auroc"] is not None
    assert not (tmp_path / "no_test" / "scores.csv").exists()
    res = run_mod.run(base_cfg(*over), tmp_path / "tested")
    assert state["testing"] and state["listed_before"]  # listed by the pre-flight header check...
    assert "path" in state["read_before"] <= {"path", "mask_path"}  # ...which used the paths only, never a label
    assert res["num_test"] == 6 and res["image_auroc"] is not None and "start_test" in res


def test_untrained_start_is_selected_when_training_hurts(fast_cfg, tmp_path, monkeypatch):
    """Training that inverts the scores: selection keeps DFM's untrained host; `last` does not."""
    from adtrain.methods.dfm import Dfm
    from adtrain.run import run

    original = Dfm.training_step

    def wreck(self, batch, idx):
        out = original(self, batch, idx)
        with torch.no_grad():
            self.model.fmn.patch_scale.fill_(-1.0)  # every score negated: anomalies rank lowest
        return out

    monkeypatch.setattr(Dfm, "training_step", wreck)
    over = [*TINY, "method=dfm", "method.rounds=1", "method.stage1_epochs=0", "method.stage2_epochs=2",
            "trainer.max_epochs=2", "method.memory_size=32", "test_start=true"]
    # the pixel AUROC: on this tiny random-init set the start's image AUROC is at chance, its maps are not
    res = run(fast_cfg(*over, "selection.monitor=val_pixel_auroc"), tmp_path / "val")
    sel = res["selection"]
    assert sel["monitor"] == "val_pixel_auroc"
    assert {"val/image_auroc_cutpaste", "val/image_auroc_perlin"} <= set(sel["start"])
    assert sel["selected"] == "start" and res["selected_checkpoint"] == "start.ckpt"
    assert res["val_pixel_auroc"] == sel["start"]["val/pixel_auroc"] == sel["value"]
    assert all(h["metrics"]["val/pixel_auroc"] < sel["value"] - 0.1 for h in sel["history"])
    assert res["image_auroc"] == pytest.approx(res["start_test"]["image_auroc"])
    last = run(fast_cfg(*over, "selection.monitor=last"), tmp_path / "last")
    assert last["selection"]["selected"] == "last" and last["selection"]["epoch"] == 1
    wrecked = last["selection"]["history"][-1]["metrics"]
    assert wrecked["val/pixel_auroc"] < sel["start"]["val/pixel_auroc"] - 0.1  # the maps inverted


def test_best_epoch_is_selected_and_reloaded(fast_cfg, tmp_path, monkeypatch):
    """STFPM on val_image_auroc: the kept state is the best validated epoch's, reloaded from
    best.ckpt before thresholding, testing and model.ckpt."""
    from adtrain.run import run

    res = run(fast_cfg(*TINY, "method=stfpm", "trainer.max_epochs=3", "selection.monitor=val_image_auroc",
                       "selection.every_n_epochs=2"), tmp_path)
    sel = res["selection"]
    values = [h["metrics"]["val/image_auroc"] for h in sel["history"]]
    assert [h["epoch"] for h in sel["history"]] == [1, 2]  # every 2nd epoch, and the last
    assert sel["selected"] == "epoch"
    assert sel["epoch"] == sel["history"][int(np.argmax(values))]["epoch"] and sel["value"] == max(values)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["val_image_auroc"] == max(values) and saved["val_seconds"] > 0
    from adtrain.loading import read_checkpoint

    best = read_checkpoint(tmp_path / "checkpoints" / "best.ckpt")["state_dict"]
    kept = read_checkpoint(tmp_path / "checkpoints" / "model.ckpt")["state_dict"]
    student = [k for k in best if ".student." in k and torch.is_tensor(best[k])]
    assert student and all(torch.equal(best[k], kept[k]) for k in student)


def test_selection_errors_name_the_key(fast_cfg, tmp_path):
    from adtrain.run import run

    with pytest.raises(ConfigError, match="selection.monitor"):
        run(fast_cfg(*TINY, "selection.monitor=test_auroc"), tmp_path / "a")
    with pytest.raises(ConfigError, match="selection.monitor"):
        run(fast_cfg(*TINY, "selection.monitor=val_image_auroc", "data.val_anomalies=null"), tmp_path / "b")
    with pytest.raises(ConfigError, match="data.val_anomalies.families"):
        _dm(fast_cfg(*TINY, "data.val_anomalies.families=[gan]"))
    with pytest.raises(ConfigError, match="data.val_split=0 holds out no training normal"):
        run(fast_cfg(*TINY, "data.val_split=0", "selection.monitor=normal_score"), tmp_path / "c")


class _Toy(torch.nn.Module):
    """Scores an image by the distance of its mean to the current 'memory' value."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bank", torch.tensor(0.0))

    def forward(self, images):
        from adtrain.methods.output import AnomalyOutput

        s = (images.mean(dim=(1, 2, 3)) - self.bank).abs()
        return AnomalyOutput(s.view(-1, 1, 1, 1).expand(-1, 1, *images.shape[-2:]), s)


def test_a_task_in_training_is_scored_with_its_own_memory_not_routed():
    """With 3+ tasks the memory being built must be the one validated and thresholded (the old
    rule routed among the finished tasks' memories only, so task 2's model was never scored)."""
    from adtrain.methods.base import AnomalyModule
    from adtrain.methods.memory_module import TaskMemoryMixin

    class Toy(TaskMemoryMixin, AnomalyModule):
        def __init__(self):
            super().__init__()
            self._init_task_memory("per_task")
            self.model = _Toy()

        def reset_memory(self):
            self.model.bank.fill_(float("nan"))

        def memory_state(self):
            return {"bank": self.model.bank}

        def load_memory_state(self, state):
            self.model.bank.copy_(state["bank"])

    m = Toy()
    for t, value in enumerate([0.0, 10.0]):
        m.begin_task(t, [str(t)])
        m.model.bank.fill_(value)
        m.end_task(t, [str(t)])
    m.begin_task(2, ["2"])
    m.model.bank.fill_(20.0)
    x = torch.full((2, 3, 4, 4), 20.0)
    assert torch.allclose(m.anomaly_output(x).pred_score, torch.zeros(2))  # task 2's own memory
    m.end_task(2, ["2"])
    m.model.bank.fill_(5.0)
    assert torch.allclose(m.anomaly_output(x).pred_score, torch.zeros(2))  # routed: nearest of 3 tasks
    assert m.last_routed_tasks.tolist() == [2, 2]
