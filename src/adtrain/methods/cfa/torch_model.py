"""CFA (Lee et al., IEEE Access 2022): coupled-hypersphere feature adaptation.

A frozen backbone's layer1..3 features (3x3 avg-pooled, resized to layer1's grid,
concatenated) pass through a trainable CoordConv 1x1 descriptor; the memory bank holds the
untrained descriptor's mean feature per position (optionally k-means-compressed) and is frozen.
Loss (official code): with d^2 the squared distances to the K+J nearest memory items and r the
radius (learned by default, as in the official code; the official loss uses r**2),
L_att = (1/nu) mean relu(d^2_{1..K} - r^2), L_rep = (1/nu) mean relu(r^2 - d^2_{K+1..K+J} - alpha).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adtrain.backbones.extractor import layer_names
from adtrain.errors import AdtrainError, ConfigError
from adtrain.memory import MemoryBank, kmeans, nearest_distances
from adtrain.methods.output import AnomalyOutput
from adtrain.methods.patch_features import (check_blur_mode, check_pool_size, frozen_extractor, pooled_concat,
                                           upsampled_map)


class CoordConv1x1(nn.Module):
    """1x1 conv over the input plus two coordinate channels (row, column) in [-1, 1]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        yy = ys.view(1, 1, h, 1).expand(b, 1, h, w)
        xx = xs.view(1, 1, 1, w).expand(b, 1, h, w)
        return self.conv(torch.cat([x, yy, xx], dim=1))


def _feature_dim(extractor: nn.Module, layers: Sequence[str]) -> int:
    channels = getattr(extractor, "channels", None)
    if isinstance(channels, Mapping) and all(name in channels for name in layers):
        return int(sum(channels[name] for name in layers))
    param = next(extractor.parameters(), None)
    dev = param.device if param is not None else None
    with torch.no_grad():
        feats = extractor(torch.zeros(1, 3, 64, 64, device=dev))
    return int(sum(feats[name].shape[1] for name in layers))


class CfaModel(nn.Module):
    """Memory: ``init_memory(batches)`` (or ``update_memory_mean`` per batch + ``finalize_memory``)
    before training; then ``loss(images)`` per step; eval ``forward`` -> AnomalyOutput."""

    def __init__(
        self,
        backbone: Mapping | None = None,
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        gamma_d: int = 1,
        gamma_c: int = 1,
        num_nearest: int = 3,
        num_hard_negatives: int = 3,
        nu: float = 1e-3,
        alpha: float = 0.1,
        radius: float = 1e-5,
        learn_radius: bool = True,
        pool_size: int = 3,
        blur_sigma: float = 4.0,
        blur_mode: str = "reflect",
        kmeans_niter: int = 100,
        memory: Mapping | None = None,
        extractor: nn.Module | None = None,
        seed: int = 0,
    ):
        super().__init__()
        for key, val in (("gamma_d", gamma_d), ("gamma_c", gamma_c), ("num_nearest", num_nearest)):
            if int(val) < 1:
                raise ConfigError(key, f"must be >= 1, got {val}")
        if int(num_hard_negatives) < 0:
            raise ConfigError("num_hard_negatives", f"must be >= 0, got {num_hard_negatives}")
        if float(nu) <= 0:
            raise ConfigError("nu", f"must be > 0, got {nu}")
        self.layers = layer_names(layers)
        self.gamma_d, self.gamma_c = int(gamma_d), int(gamma_c)
        self.K, self.J = int(num_nearest), int(num_hard_negatives)
        self.nu, self.alpha = float(nu), float(alpha)
        self.pool_size, self.blur_sigma = check_pool_size(pool_size), float(blur_sigma)
        self.blur_mode = check_blur_mode(blur_mode)
        self.kmeans_niter, self.seed = int(kmeans_niter), int(seed)
        self.extractor = frozen_extractor(backbone, self.layers, extractor)
        self.extractor.requires_grad_(False)
        dim = _feature_dim(self.extractor, self.layers)
        if dim // self.gamma_d < 1:
            raise ConfigError("gamma_d", f"{gamma_d} leaves no channel of {dim}")
        self.descriptor = CoordConv1x1(dim, dim // self.gamma_d)
        self.memory = MemoryBank(**dict(memory or {}))
        r = torch.tensor(float(radius))
        if learn_radius:
            self.radius = nn.Parameter(r)
        else:
            self.register_buffer("radius", r)
        self._mean: torch.Tensor | None = None
        self._batches = 0

    # ------------------------------------------------------------------ features
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen backbone features, pooled, resized to layer1's grid, concatenated (B,D,H,W)."""
        with torch.no_grad():
            return pooled_concat(self.extractor(images), self.layers, self.pool_size)

    def descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """Adapted patch descriptors phi (B, D', H, W)."""
        return self.descriptor(self.features(images))

    # ------------------------------------------------------------------ memory
    @torch.no_grad()
    def update_memory_mean(self, images: torch.Tensor) -> None:
        """Running equal-weight mean over batches of the batch-mean descriptor per position."""
        phi = self.descriptors(images).float().mean(dim=0)
        self._batches += 1
        if self._mean is None:
            self._mean = phi
        elif self._mean.shape != phi.shape:
            raise AdtrainError(f"CFA memory init: grid {tuple(phi.shape[1:])} != {tuple(self._mean.shape[1:])}")
        else:
            self._mean += (phi - self._mean) / self._batches

    @torch.no_grad()
    def finalize_memory(self) -> None:
        """Bank C = the mean map as (H*W, D'); k-means to H*W // gamma_c centres if gamma_c > 1."""
        if self._mean is None:
            raise AdtrainError("CFA memory init: no batch was seen")
        bank = self._mean.flatten(1).t().contiguous()
        if self.gamma_c > 1:
            k = max(1, bank.shape[0] // self.gamma_c)
            bank = kmeans(bank, k, niter=self.kmeans_niter, seed=self.seed)
        if bank.shape[0] < self.K + self.J:
            raise ConfigError("gamma_c", f"memory of {bank.shape[0]} items < K+J = {self.K + self.J}")
        self.memory.set_bank(bank)
        self._mean, self._batches = None, 0

    def init_memory(self, batches: Iterable) -> None:
        """Memory from an iterable of image tensors or batch dicts (key ``image``)."""
        for batch in batches:
            images = batch["image"] if isinstance(batch, Mapping) else batch
            param = next(self.descriptor.parameters())
            self.update_memory_mean(images.to(param.device))
        self.finalize_memory()

    # ------------------------------------------------------------------ train / score
    def loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        phi = self.descriptors(images)
        q = phi.permute(0, 2, 3, 1).reshape(-1, phi.shape[1])
        d2, _ = nearest_distances(q, self.memory, self.K + self.J, squared=True)
        r2 = self.radius.float() ** 2
        att = F.relu(d2[:, : self.K] - r2).mean() / self.nu
        if self.J > 0:
            rep = F.relu(r2 - d2[:, self.K : self.K + self.J] - self.alpha).mean() / self.nu
        else:
            rep = torch.zeros_like(att)
        return {"loss": att + rep, "att": att, "rep": rep}

    def score_map(self, images: torch.Tensor) -> torch.Tensor:
        """softmin(d_1..K)[0] * d_1 per position at the feature grid, (B,1,H,W)."""
        return self._score_map(self.descriptors(images))

    def _score_map(self, phi: torch.Tensor) -> torch.Tensor:
        b, dim, h, w = phi.shape
        d, _ = self.memory.search(phi.permute(0, 2, 3, 1).reshape(-1, dim), self.K)
        score = F.softmin(d, dim=-1)[:, 0] * d[:, 0]
        return score.reshape(b, 1, h, w)

    def train(self, mode: bool = True):
        """The frozen extractor always stays in eval mode (fixed batch-norm statistics)."""
        super().train(mode)
        self.extractor.eval()
        return self

    def forward(self, images: torch.Tensor):
        """Eval: AnomalyOutput. Training mode: the loss dict."""
        if self.training:
            return self.loss(images)
        return self.output_from(self.features(images), images.shape[-2:])

    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """What does not depend on a task's memory (the frozen backbone's pooled features; the
        descriptor and the bank are per task): one pass serves every task's state."""
        return self.features(images)

    def output_from(self, feats: torch.Tensor, size) -> AnomalyOutput:
        """Eval output from ``frozen_features``, with maps of ``size``: what ``forward`` gives."""
        amap = upsampled_map(self._score_map(self.descriptor(feats)), size, self.blur_sigma, self.blur_mode)
        return AnomalyOutput(anomaly_map=amap, pred_score=amap.flatten(1).amax(dim=1))
