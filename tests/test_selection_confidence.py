"""selection.start_confidence: a trained state replaces the untrained start only when the
validation set is confident it ranks better (paired bootstrap), not on a noise-sized gain."""

from types import SimpleNamespace

import numpy as np
import pytest

from adtrain.errors import ConfigError
from adtrain.metrics.bootstrap import paired_auroc_confidence
from adtrain.selection import Selection


def _items(scores, labels, family="perlin"):
    return {"scores": [float(s) for s in scores], "defects": ["good" if l == 0 else f"synthetic_{family}" for l in labels]}


def _auroc(scores, labels):
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


class _Trainer(SimpleNamespace):
    def save_checkpoint(self, path, weights_only=True):
        self.saved.append(self.current_epoch)


def _validate(sel, trainer, epoch, scores, labels):
    trainer.current_epoch = epoch
    module = SimpleNamespace(validating_now=lambda: True, last_val_items=_items(scores, labels),
                             last_val_metrics={"val/image_auroc_perlin": _auroc(scores, labels)})
    sel.on_validation_end(trainer, module)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(70, int), np.ones(35, int)]
    start = rng.normal(size=105) + 1.2 * labels
    return labels, start


def test_bootstrap_confidence_orders_detectors(data):
    labels, start = data
    assert paired_auroc_confidence(start, start, labels) == 0.5
    assert paired_auroc_confidence(start + 2.0 * labels, start, labels) == 1.0
    assert paired_auroc_confidence(start - 2.0 * labels, start, labels) == 0.0
    with pytest.raises(ValueError, match="normal and anomalous"):
        paired_auroc_confidence(start[:70], start[:70], labels[:70])


def _noise_gain(start, labels):
    """The start with the lowest-scoring anomaly nudged just above one normal: a gain of one pair."""
    a = np.where(labels == 1)[0][np.argmin(start[labels == 1])]
    above = start[(labels == 0) & (start > start[a])]
    nudged = start.copy()
    nudged[a] = np.sort(above)[0] + 1e-6
    assert _auroc(nudged, labels) > _auroc(start, labels)
    return nudged


@pytest.mark.parametrize("need, kept", [(0.0, "epoch"), (0.9, "start")])
def test_a_noise_sized_gain_does_not_replace_the_start(tmp_path, data, need, kept):
    labels, start = data
    sel = Selection("val_image_auroc_perlin", tmp_path, start_confidence=need)
    sel.start = {"metrics": {}, "value": _auroc(start, labels), "items": _items(start, labels)}
    trainer = _Trainer(sanity_checking=False, state=SimpleNamespace(fn="fit"), saved=[], current_epoch=0)
    _validate(sel, trainer, 0, _noise_gain(start, labels), labels)
    choice = sel.choose()
    assert choice["selected"] == kept
    conf = sel.history[0].get("confidence_vs_start")
    assert (conf is None) == (need == 0.0) and (conf is None or conf < 0.9)


def test_a_clear_gain_replaces_the_start(tmp_path, data):
    labels, start = data
    sel = Selection("val_image_auroc_perlin", tmp_path, start_confidence=0.9)
    sel.start = {"metrics": {}, "value": _auroc(start, labels), "items": _items(start, labels)}
    trainer = _Trainer(sanity_checking=False, state=SimpleNamespace(fn="fit"), saved=[], current_epoch=0)
    _validate(sel, trainer, 0, _noise_gain(start, labels), labels)  # noise: not a candidate
    _validate(sel, trainer, 1, start + 0.8 * labels, labels)  # a real gain
    choice = sel.choose()
    assert choice["selected"] == "epoch" and choice["epoch"] == 1 and trainer.saved == [1]
    assert sel.history[1]["confidence_vs_start"] >= 0.9


def test_start_confidence_out_of_range_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="selection.start_confidence"):
        Selection("val_image_auroc", tmp_path, start_confidence=1.0)


@pytest.mark.parametrize("monitor", ["normal_score", "val_image_auroc"])
def test_an_undefined_start_gives_way_to_a_trained_state_with_a_figure(tmp_path, monitor):
    """A NaN start figure won against every trained one (`not better(0.9, nan)`), and the log said
    no trained state did better while naming 0.9; between epochs a NaN already gave way."""
    s = Selection(monitor, tmp_path)
    s.start = {"metrics": {s.key: float("nan")}, "value": float("nan"), "seconds": 0, "items": {}}
    s.history = [{"epoch": 0, "metrics": {s.key: 0.9}}]
    s.best = {"epoch": 0, "value": 0.9}
    assert s.choose()["selected"] == "epoch" and s.choose()["value"] == 0.9
    s.best, s.history = None, []  # nothing trained has a figure: the start is what there is
    assert s.choose()["selected"] == "start"
