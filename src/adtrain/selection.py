"""Model selection on the validation set (held-out training normals + synthetic anomalies).

``selection.monitor`` (or the method's ``method.selection``) picks what decides:

| monitor | logged key | better |
|---|---|---|
| ``val_image_auroc`` | ``val/image_auroc`` | higher |
| ``val_pixel_auroc`` | ``val/pixel_auroc`` | higher |
| ``val_image_auroc_perlin`` (``_cutpaste``) | normals against one synthetic family only | higher |
| ``normal_score`` | ``val/normal_score`` (mean image score of held-out normals) | lower |
| ``normal_map_mean`` | ``val/normal_map_mean`` (mean of held-out normals' anomaly maps, every pixel: STFPM's official figure) | lower |
| ``last`` | - | the final state is kept |

The untrained start is a candidate where it already detects anomalies (DFM's round 0 is its
host; CFA's start is its memory of the untrained descriptor): it is validated before training and
kept unless a trained state validates strictly better. With ``start_confidence`` c > 0 (image
AUROC monitors), a trained state must also beat the start in a share >= c of paired bootstrap
resamples of the validation items (``adtrain.metrics.bootstrap``): a gain of a few thousandths on
~100 items is noise, and replacing a working start on noise is how training loses to it. Test
data play no part.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lightning.pytorch import Callback

from adtrain.errors import ConfigError, DataError, TrainingError

log = logging.getLogger("adtrain")

MONITORS = {
    "val_image_auroc": ("val/image_auroc", "max"),
    "val_pixel_auroc": ("val/pixel_auroc", "max"),
    "val_image_auroc_cutpaste": ("val/image_auroc_cutpaste", "max"),
    "val_image_auroc_perlin": ("val/image_auroc_perlin", "max"),
    "normal_score": ("val/normal_score", "min"),
    "normal_map_mean": ("val/normal_map_mean", "min"),
    "last": (None, None),
}


def resolve_monitor(cfg) -> str:
    """selection.monitor, else method.selection, else last; validated."""
    sel = cfg.get("selection") or {}
    name = sel.get("monitor") if hasattr(sel, "get") else None
    key = "selection.monitor"
    if not name:
        name, key = cfg.method.get("selection") or "last", "method.selection"
    if name not in MONITORS:
        raise ConfigError(key, f"must be one of {list(MONITORS)}, got {name!r}")
    return str(name)


def _better(value: float, best: float, mode: str) -> bool:
    return value > best if mode == "max" else value < best


class Selection(Callback):
    """Records every validation epoch of a fit, keeps the best state in ``best.ckpt`` (atomic,
    weights only) and the untrained start in ``start.ckpt``; its record travels in ``last.ckpt``,
    so a resumed run selects as an uninterrupted one would."""

    def __init__(self, monitor: str, dirpath: str | Path, start_confidence: float = 0.0):
        if not 0.0 <= float(start_confidence) < 1.0:
            raise ConfigError("selection.start_confidence", f"must be in [0, 1), got {start_confidence}")
        self.start_confidence = float(start_confidence)
        self.monitor = monitor
        self.key, self.mode = MONITORS[monitor]
        self.dirpath = Path(dirpath)
        self.history: list[dict] = []
        self.best: dict | None = None  # {"epoch", "value"}
        self.start: dict | None = None  # {"metrics", "value", "seconds"}
        self.val_seconds = 0.0
        self._t0: float | None = None

    @property
    def best_path(self) -> Path:
        return self.dirpath / "best.ckpt"

    @property
    def start_path(self) -> Path:
        return self.dirpath / "start.ckpt"

    # ------------------------------------------------------------------ the untrained start
    def validate_start(self, trainer, method, datamodule) -> None:
        """Validate the untrained start and keep it as the first candidate."""
        from adtrain.io import torch_save

        self._t0 = None
        trainer.validate(method, datamodule=datamodule, verbose=False)
        seconds = time.perf_counter() - self._t0 if self._t0 is not None else 0.0  # from the first batch
        seconds += _prep_seconds(datamodule)
        self._t0 = None
        metrics = dict(getattr(method, "last_val_metrics", {}) or {})
        self.start = {"metrics": metrics, "value": metrics.get(self.key) if self.key else None,
                      "seconds": round(seconds, 3), "items": dict(getattr(method, "last_val_items", {}) or {})}
        torch_save({"state_dict": method.state_dict()}, self.start_path)
        log.info("Untrained start: %s", _fmt(metrics))

    # ------------------------------------------------------------------ each validation of the fit
    def _fitting(self, trainer) -> bool:
        return not trainer.sanity_checking and trainer.state.fn == "fit"

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        # from the first batch: a memory built or finalised at validation start is fitting, not validating
        if (self._fitting(trainer) or trainer.state.fn == "validate") and self._t0 is None:
            self._t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._fitting(trainer):
            return
        if self._t0 is not None:  # skipped epochs still load their batches: counted too
            self.val_seconds += time.perf_counter() - self._t0
            self._t0 = None
        self.val_seconds += _prep_seconds(getattr(trainer, "datamodule", None))
        if not pl_module.validating_now():  # an epoch between candidates
            return
        metrics = dict(getattr(pl_module, "last_val_metrics", {}) or {})
        epoch = int(trainer.current_epoch)
        entry = {"epoch": epoch, **_stage_of(pl_module, epoch), "metrics": metrics}
        self.history.append(entry)
        if self.key is None:
            return
        value = metrics.get(self.key)
        if value is None:
            raise TrainingError(f"selection.monitor={self.monitor} needs {self.key}, which validation did not "
                                "produce (no synthetic anomalies in the validation set? see data.val_anomalies)")
        confidence = self._confidence(getattr(pl_module, "last_val_items", None))
        if confidence is not None:
            entry["confidence_vs_start"] = round(confidence, 4)
        if confidence is not None and confidence < self.start_confidence:
            return  # not confidently better than the start: not a candidate
        best_nan = self.best is not None and self.best["value"] != self.best["value"]
        if self.best is None or (best_nan and value == value) or _better(value, self.best["value"], self.mode):
            trainer.save_checkpoint(self.best_path, weights_only=True)
            self.best = {"epoch": epoch, "value": float(value)}

    def _confidence(self, items: dict | None) -> float | None:
        """Share of paired bootstrap resamples of the validation items in which this state's image
        AUROC (on the monitor's items) beats the start's; None where it does not apply."""
        if not self.start_confidence or not self.key or not self.key.startswith("val/image_auroc"):
            return None
        start = (self.start or {}).get("items") or {}
        if not items or not start or start.get("defects") != items.get("defects"):
            return None
        family = self.key.removeprefix("val/image_auroc").removeprefix("_")
        keep = [i for i, d in enumerate(items["defects"]) if d == "good" or not family or d == f"synthetic_{family}"]
        labels = [int(items["defects"][i] != "good") for i in keep]
        if not keep or len(set(labels)) < 2:
            return None
        from adtrain.metrics.bootstrap import paired_auroc_confidence

        return paired_auroc_confidence([items["scores"][i] for i in keep], [start["scores"][i] for i in keep], labels)

    # ------------------------------------------------------------------ the choice
    def choose(self) -> dict:
        """{"selected": start|epoch|last, "epoch", "value", "metrics"} of the state to keep."""
        if self.key is not None:
            start_v = None if self.start is None else self.start.get("value")
            # a start whose figure is undefined (NaN) gives way to any trained state that has one
            if start_v is not None and (self.best is None
                                        or (start_v == start_v and not _better(self.best["value"], start_v, self.mode))):
                return {"selected": "start", "epoch": None, "value": start_v, "metrics": self.start["metrics"]}
            if self.best is not None:
                entry = next(h for h in self.history if h["epoch"] == self.best["epoch"])
                return {"selected": "epoch", "value": self.best["value"], **entry}
        if not self.history:
            return {"selected": "last", "epoch": None, "metrics": (self.start or {}).get("metrics", {})}
        return {"selected": "last", **self.history[-1]}

    def restore(self, method, choice: dict) -> None:
        """Load the chosen state into ``method`` (the last state needs nothing)."""
        path = {"start": self.start_path, "epoch": self.best_path}.get(choice["selected"])
        if path is None:
            return
        if not path.exists():
            raise TrainingError(f"{path}: the selected checkpoint is missing (deleted?); the run cannot keep "
                                "that state: overwrite=true trains it again from the start")
        from adtrain.loading import load_weights, read_checkpoint

        ckpt = read_checkpoint(path)
        if not isinstance(ckpt.get("state_dict"), dict):
            raise DataError(path, "not a checkpoint of this run (no state_dict inside); overwrite=true trains it again")
        load_weights(method, ckpt["state_dict"], path)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"monitor": self.monitor, "history": self.history, "best": self.best, "start": self.start,
                "val_seconds": self.val_seconds}

    def load_state_dict(self, state: dict) -> None:
        if state.get("monitor") not in (None, self.monitor):
            raise ConfigError("selection.monitor", f"the interrupted run selected on {state.get('monitor')}, "
                              f"this one on {self.monitor}; resume with the same monitor")
        self.history = list(state.get("history") or [])
        self.best, self.start = state.get("best"), state.get("start")
        self.val_seconds = float(state.get("val_seconds") or 0.0)


def _stage_of(method, epoch: int) -> dict:
    schedule = getattr(method, "schedule", None)
    if callable(schedule):
        rnd, stage, _ = schedule(epoch)
        return {"round": int(rnd), "stage": int(stage)}
    return {}


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())) or "no validation figures"


def _value(v) -> str:
    return "undefined (nan)" if v is None or v != v else f"{v:.4f}"


def _not_confident(selector: Selection) -> str:
    """Why no trained state became a candidate although some were validated."""
    conf = [(h["confidence_vs_start"], h["epoch"]) for h in selector.history if "confidence_vs_start" in h]
    n = len(selector.history)
    if not conf:
        return f"none of the {n} validated trained state{'s' if n != 1 else ''} was better"
    top, epoch = max(conf)
    return (f"none of the {n} validated trained state{'s' if n != 1 else ''} beat it in "
            f"{selector.start_confidence:.0%} of paired bootstrap resamples (selection.start_confidence; "
            f"the most confident, epoch {epoch}: {top:.0%})")


def describe(choice: dict, monitor: str, selector: Selection | None, epochs: int, last_file: str = "last.ckpt") -> str:
    """One line: which state is kept, its file, and why (what it was compared with). last_file: where the last
    state is (model.ckpt for a one-pass method, which takes no optimiser step and so leaves no last.ckpt)."""
    key = MONITORS[monitor][0]
    n = len(selector.history) if selector is not None else 0
    if choice["selected"] == "start":
        best = selector.best if selector is not None else None
        if best:
            beaten = f"no trained state did better (best: epoch {best['epoch']}, {_value(best['value'])})"
        elif selector is not None and selector.history:
            beaten = _not_confident(selector)
        else:
            beaten = "no trained state was validated"
        return (f"Kept the untrained start (start.ckpt): its {key} {_value(choice.get('value'))} on the "
                f"validation set; {beaten}")
    if choice["selected"] == "epoch":
        start = (selector.start or {}).get("value") if selector is not None else None
        vs = f"; the untrained start had {_value(start)}" if start is not None else ""
        return (f"Selected epoch {choice.get('epoch')} (best.ckpt): the best {key} of {n} validated "
                f"state{'s' if n != 1 else ''}, {_value(choice.get('value'))}{vs}")
    if selector is None:
        why = "no validation set (data.val_split=0)"
    elif key is None:
        why = "selection.monitor=last" + (" (one pass: nothing to select)" if epochs <= 1 else "")
    else:
        why = f"no validation produced {key}"
    return f"Kept the last state ({last_file}, after {epochs} epoch{'s' if epochs != 1 else ''}): {why}"


def summary(choice: dict, monitor: str, selector: Selection | None) -> dict:
    """The selection block of results.json."""
    out = {"monitor": monitor, **{k: v for k, v in choice.items() if k != "metrics"}}
    if selector is not None:
        if selector.start is not None:
            out["start"] = selector.start["metrics"]
        out["history"] = selector.history
    return out


def _prep_seconds(datamodule) -> float:
    """Seconds the data module spent making validation anomalies since the last call (then reset)."""
    seconds = float(getattr(datamodule, "val_prep_seconds", 0.0) or 0.0)
    if seconds:
        datamodule.val_prep_seconds = 0.0
    return seconds
