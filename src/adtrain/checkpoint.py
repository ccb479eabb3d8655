"""Load a finished run's model.ckpt back into a method, without the training data."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from adtrain.errors import DataError


def load_run_config(checkpoint: str | Path):
    path = Path(checkpoint)
    if not path.exists():
        raise DataError(path, "checkpoint not found (a run writes <run dir>/checkpoints/model.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(path, f"cannot read checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or not ckpt.get("adtrain_config"):
        raise DataError(path, "not an adtrain checkpoint (no adtrain_config inside)")
    return ckpt, OmegaConf.create(ckpt["adtrain_config"])


def load_method(checkpoint: str | Path):
    """(method in eval mode, config, raw checkpoint). Backbone weights come from the checkpoint,
    so no pretrained weights are looked up."""
    from adtrain.build import build_method

    ckpt, cfg = load_run_config(checkpoint)
    for node in (cfg.backbone, cfg.method.get("backbone")):
        if node is not None:
            node.pretrained = False
    method = build_method(cfg)
    method.load_state_dict(ckpt["state_dict"])
    method.adtrain_config = ckpt["adtrain_config"]
    return method.eval(), cfg, ckpt


def save_method(method, path: str | Path, extra: dict | None = None) -> Path:
    from adtrain.io import torch_save

    return torch_save({"state_dict": method.state_dict(), "adtrain_config": method.adtrain_config, **(extra or {})}, path)
