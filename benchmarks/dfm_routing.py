"""Continual DFM's task routing on ELPV mono -> poly: which items go to the wrong task, per rule.

    .venv/bin/python -m adtrain method=dfm data=elpv schedule=elpv_mono_poly seed=0 hydra.run.dir=RUN
    .venv/bin/python benchmarks/dfm_routing.py RUN/tasks/1/model.ckpt

For the validation set (held-out normals + their synthetic anomalies) and the test set of each
task, prints how many normal and anomalous items each rule sends to the other task:

- ``key_<stat>``: UCAD's nearest-key rule (adtrain's), the per-patch distance to the task's
  nearest key reduced over the patches by mean (the rule in use), median, lower quartile or a
  trimmed mean (the 80 % or 50 % smallest);
- ``score``: the lowest image score, each task state's score in units of its held-out normals
  (the per-task calibration), as the memory methods route.

A diagnostic only: nothing is chosen with it (the test rows read task membership, not labels, but
are printed for reading, never for a default).
"""

from __future__ import annotations

import argparse

import torch

from adtrain.build import build_datamodule
from adtrain.loading import load_method
from adtrain.methods.dfm.continual import DfmContinualMixin

STATS = {
    "key_mean": lambda d: d.mean(-1),
    "key_median": lambda d: d.median(-1).values,
    "key_q25": lambda d: d.quantile(0.25, dim=-1),
    "key_trim20": lambda d: d.sort(-1).values[..., : int(d.shape[-1] * 0.8)].mean(-1),
    "key_trim50": lambda d: d.sort(-1).values[..., : int(d.shape[-1] * 0.5)].mean(-1),
}


@torch.no_grad()
def per_task(method, images):
    """(per-patch nearest-key distances (B, T, P), calibrated image scores (B, T))."""
    x = method.model_input(images)
    q = method.model.key_features(x).float().flatten(2).transpose(1, 2)
    b, p, d = q.shape
    keys = torch.stack([torch.cdist(q.reshape(b * p, d), k.float()).min(1).values.view(b, p)
                        for k in method.router.keys], 1)
    current, scores = method.trainable_state(), []
    try:
        for t, state in enumerate(method.task_states):
            method.load_trainable_state(state)
            s = super(DfmContinualMixin, method).anomaly_output(x).pred_score  # this task's state, no routing
            c = method.task_calibration[t]
            scores.append((s - c["center"]) / c["scale"] if c else s)
    finally:
        method.load_trainable_state(current)
    return keys, torch.stack(scores, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    args = ap.parse_args()
    method, cfg, _ = load_method(args.checkpoint)
    tasks = list(cfg.schedule.tasks)
    print("| split | task | rule | normal items routed elsewhere | anomalous items routed elsewhere |")
    print("|---|---|---|---|---|")
    for split in ("val", "test"):
        for t, cat in enumerate(tasks):
            c = cfg.copy()
            c.data.category = cat
            dm = build_datamodule(c, num_workers=0)
            dm.setup("fit")
            loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
            keys, scores, labels = [], [], []
            for batch in loader:
                k, s = per_task(method, batch["image"])
                keys.append(k)
                scores.append(s)
                labels.append(batch["label"])
            keys, scores, labels = torch.cat(keys), torch.cat(scores), torch.cat(labels)
            rules = {name: f(keys).argmin(1) for name, f in STATS.items()}
            rules["score"] = scores.argmin(1)
            for name, routed in rules.items():
                wrong = routed != t
                n, a = labels == 0, labels == 1
                print(f"| {split} | {cat} | {name} | {int(wrong[n].sum())} of {int(n.sum())} | "
                      f"{int(wrong[a].sum())} of {int(a.sum())} |", flush=True)


if __name__ == "__main__":
    main()
