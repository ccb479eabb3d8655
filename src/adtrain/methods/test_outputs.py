"""TestOutputs: a test epoch's per-image outputs, kept batched (on their device) until its end.

`test_step` appends one batch (scores and labels stay tensors on the device, no host sync; the
batch's strings are list-extended); at epoch end `tensors()` / `meta` are what a multi-process
run gathers, and `records()` builds the per-image rows (scores.csv) once, from one host copy.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

META_KEYS = ("path", "category", "defect")


class TestOutputs:
    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._calibration: list[torch.Tensor | None] = []  # per batch: (B, 2) threshold, score centre
        self.meta: dict[str, list[str]] = {k: [] for k in META_KEYS}

    def add(self, batch: dict, pred_score: torch.Tensor, calibration=None) -> None:
        """One test batch: its (B,) scores (any device) and the batch's labels and strings;
        ``calibration`` (threshold, score centre), each (B,): the images' own (a routed model's
        tasks, adtrain.methods.calibration), else None (the module's)."""
        self._scores.append(pred_score.detach().float().reshape(-1))
        self._calibration.append(None if calibration is None else torch.stack([c.float() for c in calibration], 1))
        self._labels.append(torch.as_tensor(batch["label"]).detach().reshape(-1))
        for key in META_KEYS:
            self.meta[key].extend(batch[key])

    def __len__(self) -> int:
        return len(self.meta["path"])

    def tensors(self) -> dict[str, torch.Tensor]:
        """``score`` (N,) float32 and ``label`` (N,) int64, concatenated on the first batch's device."""
        if not self._scores:
            return {"score": torch.empty(0), "label": torch.empty(0, dtype=torch.long)}
        dev = self._scores[0].device
        out = {"score": torch.cat([s.to(dev) for s in self._scores]),
               "label": torch.cat([l.to(dev) for l in self._labels]).long()}
        if self._calibration and all(c is not None for c in self._calibration):  # every image its own
            out["calibration"] = torch.cat([c.to(dev) for c in self._calibration])
        return out

    def set(self, tensors: dict[str, torch.Tensor], meta: dict[str, list[str]]) -> None:
        """Replace the contents (e.g. by outputs gathered from every process)."""
        self._scores, self._labels = [tensors["score"]], [tensors["label"]]
        self._calibration = [tensors.get("calibration")]
        self.meta = {k: list(meta[k]) for k in META_KEYS}


def build_records(scores: torch.Tensor, labels: torch.Tensor, meta: dict[str, list[str]],
                  normalize: Callable[[torch.Tensor], torch.Tensor], threshold: float,
                  calibration: torch.Tensor | None = None) -> list[dict]:
    """The scores.csv rows, one host copy of each column: path, category, defect, label, score,
    normalized_score, prediction (score > threshold; None without a threshold). ``calibration``
    (N, 2): each image's own threshold and score centre (a routed model's tasks) instead."""
    from adtrain.methods.calibration import normalize_with

    score_l = scores.float().cpu().tolist()
    label_l = labels.long().cpu().tolist()
    if calibration is not None:
        cal = calibration.float().to(scores.device)
        norm_l = normalize_with(scores.float(), cal[:, 1], cal[:, 0]).cpu().tolist()
        thr_l = cal[:, 0].cpu().tolist()
    else:
        norm_l = normalize(scores.float()).cpu().tolist()
        thr_l = [threshold] * len(score_l)
    return [{"path": p, "category": c, "defect": d, "label": lab, "score": s, "normalized_score": n,
             "prediction": int(s > thr) if math.isfinite(thr) else None}
            for p, c, d, lab, s, n, thr in zip(meta["path"], meta["category"], meta["defect"], label_l, score_l,
                                              norm_l, thr_l)]
