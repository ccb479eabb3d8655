"""``threshold.mode=val_f1``: the image threshold of the largest F1 on the validation set.

The validation set is made from training images alone (held-out normals and the synthetic anomalies
``data.val_anomalies`` makes from them), so the test set is never read. The default,
``threshold.mode=quantile``, uses the held-out normals alone (``AnomalyModule.fit_threshold``).
"""

from __future__ import annotations

import torch

from adtrain.metrics.image import f1_max_threshold

MODES = ("quantile", "val_f1")


@torch.no_grad()
def val_f1_threshold(module, dataloader) -> dict:
    """Score the validation set with ``module`` (eval) and return the threshold of the largest F1
    (deciding score > threshold), that F1 and the counts; ``{"threshold": None}`` where the set holds
    no synthetic anomaly or no normal."""
    module.eval()
    scores, labels = [], []
    for batch in dataloader:
        out = module.anomaly_output(module.model_input(batch["image"]))
        scores.append(out.pred_score.float().cpu())
        labels.append(batch["label"].cpu())
    if not scores:
        return {"threshold": None}
    s, y = torch.cat(scores), torch.cat(labels)
    anomalies = int(y.sum())
    if anomalies == 0 or anomalies == y.numel():
        return {"threshold": None}
    cut, f1 = f1_max_threshold(s.numpy(), y.numpy())
    return {"threshold": cut, "threshold_val_f1": f1, "num_threshold_anomalies": anomalies,
            "num_threshold_normals": int(y.numel()) - anomalies}
