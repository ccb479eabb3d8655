"""Streaming histogram with a fixed number of bins over an adaptive range.

The range starts from the first values seen. When a later value falls outside it, the width
doubles (towards that side) and adjacent bin pairs merge, so old bin edges stay edges and every
count stays exact to the current bin resolution. Several channels share the same edges.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from adtrain.errors import AdtrainError, ConfigError


class StreamingHistogram:
    """Fixed-size histogram: `counts[name]` arrays of length num_bins over [low, low + width)."""

    def __init__(self, num_bins: int = 65536, channels: dict[str, type] | None = None):
        if num_bins < 2 or num_bins % 2:
            raise ConfigError("num_bins", f"must be an even integer >= 2, got {num_bins}")
        self.num_bins = int(num_bins)
        self.channels = dict(channels or {"count": np.int64})
        self.reset()

    def reset(self) -> None:
        self.low: float | None = None
        self.width: float | None = None
        self.counts = {k: np.zeros(self.num_bins, dtype=t) for k, t in self.channels.items()}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.counts.values())

    @property
    def edges(self) -> np.ndarray:
        """num_bins + 1 bin edges (empty before the first update)."""
        if self.low is None:
            return np.zeros(0)
        return self.low + self.width * np.arange(self.num_bins + 1) / self.num_bins

    def _init_range(self, vmin: float, vmax: float) -> None:
        span = vmax - vmin
        if span <= 0:
            span = max(abs(vmin), 1.0) * 1e-6
        # one spare bin so that vmax falls strictly inside the half-open range
        self.low = vmin
        self.width = span * self.num_bins / (self.num_bins - 1)

    def _merge_pairs(self, into_upper_half: bool) -> None:
        half = self.num_bins // 2
        for key, c in self.counts.items():
            merged = c.reshape(half, 2).sum(axis=1)
            new = np.zeros_like(c)
            if into_upper_half:
                new[half:] = merged
            else:
                new[:half] = merged
            self.counts[key] = new

    def ensure_range(self, vmin: float, vmax: float) -> None:
        """Widen (doubling, merging bin pairs) until [vmin, vmax] lies inside the range."""
        if not (math.isfinite(vmin) and math.isfinite(vmax)):
            raise AdtrainError("anomaly map contains NaN or inf values; metrics need finite scores")
        if self.low is None:
            self._init_range(vmin, vmax)
            return
        while vmin < self.low:  # extend to the left: old bins move to the upper half
            self._merge_pairs(into_upper_half=True)
            self.low -= self.width
            self.width *= 2.0
        while vmax >= self.low + self.width:  # extend to the right
            self._merge_pairs(into_upper_half=False)
            self.width *= 2.0

    def bin_index(self, values: torch.Tensor) -> torch.Tensor:
        """Bin index (int64, same device) of values already inside the range."""
        if self.low is None:
            raise AdtrainError("StreamingHistogram.bin_index called before ensure_range")
        scale = self.num_bins / self.width
        idx = torch.floor((values - self.low) * scale).long()
        return idx.clamp_(0, self.num_bins - 1)

    def add_indices(self, key: str, idx, weights=None) -> None:
        """Add precomputed bin indices (tensor on any device, or numpy) to channel `key`."""
        if isinstance(idx, torch.Tensor) and weights is None:
            # unweighted bincount is deterministic on CUDA; only the counts come to the CPU
            binc = torch.bincount(idx.reshape(-1), minlength=self.num_bins).cpu().numpy()
        else:
            if isinstance(idx, torch.Tensor):
                idx = idx.cpu().numpy()
            idx = np.asarray(idx).reshape(-1)
            binc = np.bincount(idx, weights=weights, minlength=self.num_bins)
        self.counts[key] += binc.astype(self.counts[key].dtype, copy=False)

    def add(self, key: str, values: torch.Tensor, weights=None) -> None:
        """Widen as needed, then add values (optionally weighted) to channel `key`."""
        if values.numel() == 0:
            return
        vmin, vmax = (float(v) for v in torch.aminmax(values.reshape(-1)))
        self.ensure_range(vmin, vmax)
        self.add_indices(key, self.bin_index(values), weights)
