"""Conversion of tensors / arrays / lists to CPU numpy arrays."""

from __future__ import annotations

import numpy as np
import torch

from adtrain.errors import AdtrainError


def to_numpy(values, dtype=np.float64) -> np.ndarray:
    """Any tensor (any device, fp16/bf16 included), array or list -> numpy array of dtype."""
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.is_floating_point() and values.dtype != torch.float64:  # fp16/bf16 widened; float64 kept
            values = values.float()
        values = values.cpu().numpy()
    return np.asarray(values, dtype=dtype)


def check_finite(values: np.ndarray, name: str) -> None:
    """Raise a clear error when scores contain NaN or inf."""
    if not np.all(np.isfinite(values)):
        raise AdtrainError(f"{name} contains NaN or inf values; metrics need finite scores")
