"""PatchCore (Roth et al., CVPR 2022): a coreset memory of locally aggregated patch features;
score = distance to the nearest memory item, image score reweighted as in the paper."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adtrain.backbones.extractor import layer_names
from adtrain.errors import ConfigError
from adtrain.memory import MemoryBank, bank_distances, nearest_distances
from adtrain.memory.graph_knn import logsumexp
from adtrain.methods.output import AnomalyOutput
from adtrain.methods.patchcore.mean_mapper import check_embed_dims, mean_mapped
from adtrain.methods.patch_features import (check_blur_mode, check_pool_size, frozen_extractor, pooled_concat,
                                           upsampled_map)


class PatchcoreModel(nn.Module):
    """Fit: ``add_batch(images)`` over the normal training set, then ``build()``."""

    def __init__(
        self,
        backbone: Mapping | None = None,
        layers: Sequence[str] = ("layer2", "layer3"),
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        pool_size: int = 3,
        projection_dim: int = 128,
        memory: Mapping | None = None,
        extractor: nn.Module | None = None,
        blur_sigma: float = 4.0,
        seed: int = 0,
        blur_mode: str = "reflect",
        embed_dims: Sequence[int] | None = None,
        squared_scores: bool = False,
    ):
        super().__init__()
        if not 0.0 < float(coreset_ratio) <= 1.0:
            raise ConfigError("coreset_ratio", f"must be in (0, 1], got {coreset_ratio}")
        if int(num_neighbors) < 1:
            raise ConfigError("num_neighbors", f"must be >= 1, got {num_neighbors}")
        check_pool_size(pool_size)
        self.layers = layer_names(layers)
        self.coreset_ratio = float(coreset_ratio)
        self.num_neighbors = int(num_neighbors)
        self.pool_size = int(pool_size)
        self.embed_dims = check_embed_dims(embed_dims)
        if not isinstance(squared_scores, bool):
            raise ConfigError("squared_scores", f"must be true or false, got {squared_scores!r}")
        self.squared_scores = squared_scores
        self.projection_dim = int(projection_dim)
        self.blur_sigma, self.blur_mode = float(blur_sigma), check_blur_mode(blur_mode)
        self.seed = int(seed)
        self.extractor = frozen_extractor(backbone, self.layers, extractor)
        self.memory = MemoryBank(**dict(memory or {}))
        self.nested_cache = None  # memory.nested.NestedCache (method.nested_cache): a sweep's shared work

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features (B, D, h, w) at the first layer's grid: each layer averaged
        over pool_size x pool_size and concatenated, or (``embed_dims``) the official code's
        descriptor (``mean_mapper``)."""
        feats = self.extractor(images)
        if self.embed_dims is not None:
            return mean_mapped(feats, self.layers, self.pool_size, self.embed_dims)
        return pooled_concat(feats, self.layers, self.pool_size)

    @torch.no_grad()
    def add_batch(self, images: torch.Tensor) -> None:
        emb = self.embed(images)
        self.memory.add(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))

    @torch.no_grad()
    def build(self, device: torch.device | str | None = None) -> None:
        """Greedy coreset of the collected patches (on ``device``, default this module's)."""
        ratio = self.coreset_ratio if self.coreset_ratio < 1.0 else None
        coreset = self.nested_cache.coreset if self.nested_cache is not None else None
        self.memory.build(coreset_ratio=ratio, projection_dim=self.projection_dim, seed=self.seed, device=device,
                          coreset=coreset)

    def patch_distances(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance of every patch to its nearest memory item and that item's index, (B,h,w)
        each. Differentiable w.r.t. the embedding (and the bank if it requires grad)."""
        b, dim, h, w = embedding.shape
        flat = embedding.permute(0, 2, 3, 1).reshape(-1, dim)
        idx = self.nested_cache.nearest(flat, self.memory) if self.nested_cache is not None else None
        if idx is None:
            d, idx = nearest_distances(flat, self.memory, 1)
        else:  # the same neighbours from the sweep's cached near-records (memory.nested)
            idx = idx.unsqueeze(1)
            d = bank_distances(flat, self.memory, idx)
        return d.reshape(b, h, w), idx.reshape(b, h, w)

    def reweight(self, query: torch.Tensor, nn_dist: torch.Tensor, nn_index: torch.Tensor) -> torch.Tensor:
        """Paper's weight w = 1 - exp(||q - m*||) / sum_{m in N_b(m*)} exp(||q - m||), (B,):
        N_b(m*) = the b = num_neighbors nearest bank items of m* (m* itself among them)."""
        b = min(self.num_neighbors, len(self.memory))
        if b <= 1:
            return torch.ones_like(nn_dist)
        _, support = self.memory.search(self.memory.gather(nn_index), b)
        support_dist = bank_distances(query, self.memory, support).to(nn_dist.device)
        return 1.0 - torch.exp(nn_dist - logsumexp(support_dist, dim=1))

    def image_score(self, embedding: torch.Tensor, dist: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Reweighted max patch distance, (B,)."""
        b = dist.shape[0]
        flat_d = dist.reshape(b, -1)
        max_d, pos = flat_d.max(dim=1)
        rows = torch.arange(b, device=dist.device)
        query = embedding.flatten(2)[rows, :, pos]  # (B, D)
        nn_index = index.reshape(b, -1)[rows, pos]
        return self.reweight(query, max_d, nn_index) * max_d

    def anomaly_map(self, dist: torch.Tensor, size) -> torch.Tensor:
        """Patch distances resized to ``size`` (bilinear) and blurred (Gaussian, ``blur_sigma``)."""
        return upsampled_map(dist, size, self.blur_sigma, self.blur_mode)

    def train(self, mode: bool = True):
        """The frozen extractor always stays in eval mode (fixed batch-norm statistics)."""
        super().train(mode)
        self.extractor.eval()
        return self

    def forward(self, images: torch.Tensor):
        """Eval: AnomalyOutput. Training mode: the patch embedding (B, D, h, w)."""
        emb = self.embed(images)
        if self.training:
            return emb
        return self.output_from(emb, images.shape[-2:])

    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """What does not depend on the memory (the patch embedding): one pass serves every task's bank."""
        return self.embed(images)

    def output_from(self, emb: torch.Tensor, size) -> AnomalyOutput:
        """Eval output from ``frozen_features``, with maps of ``size``: what ``forward`` gives."""
        dist, index = self.patch_distances(emb)
        score = self.image_score(emb, dist, index)
        if self.squared_scores:  # the official code's scores: FAISS IndexFlatL2's squared distances
            dist, score = dist.square(), score.square()
        return AnomalyOutput(anomaly_map=self.anomaly_map(dist, size), pred_score=score)
