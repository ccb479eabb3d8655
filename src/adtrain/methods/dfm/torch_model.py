"""DFM (Wu et al., CVPR 2025): a frozen backbone with identity-initialised adapters, a host's patch
descriptor (PatchCore: local aggregation; CFA: + CoordConv descriptor) and a Feature Matching
Network whose memory and modulate layers are trained (docs/methods/dfm.md)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from adtrain.backbones.extractor import layer_names
from adtrain.errors import AdtrainError, ConfigError
from adtrain.memory import MemoryBank, greedy_coreset
from adtrain.memory.ram import check_room
from adtrain.methods.cfa.torch_model import CoordConv1x1
from adtrain.methods.dfm.adapters import build_adapters
from adtrain.methods.dfm.fmn import FeatureMatchingNetwork, distance_volume
from adtrain.methods.output import AnomalyOutput
from adtrain.methods.patch_features import check_blur_mode, check_pool_size, pooled_concat, reduced_map, upsampled_map

HOSTS = ("patchcore", "cfa")
DEFAULT_LAYERS = {"patchcore": ("layer2", "layer3"), "cfa": ("layer1", "layer2", "layer3")}
_REF_ROWS = 16384  # patches used to measure the typical nearest distance


def _plain(cfg) -> dict:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B,D,h,w) -> (B*h*w, D)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class DfmModel(nn.Module):
    """Eval ``forward`` -> AnomalyOutput; training-mode ``forward`` -> (patch scores (B,h,w), image
    scores (B,)). ``build_memory(batches)`` (re)initialises the FMN memory from adapted features."""

    def __init__(
        self,
        backbone: Mapping | None = None,
        host: str = "patchcore",
        layers: Sequence[str] | None = None,
        adapter_layers: Sequence[str] | None = None,
        pool_size: int = 3,
        blur_sigma: float = 4.0,
        blur_mode: str = "reflect",
        cfa_gamma_d: int = 1,
        memory_size: int | None = 196,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        max_memory_features: int | None = None,
        ram_check: bool = True,
        num_keys: int = 196,
        candidates: int = 8,
        row_chunk: int = 8192,
        mem_chunk: int = 4096,
        seed: int = 0,
        extractor: nn.Module | None = None,
    ):
        super().__init__()
        if host not in HOSTS:
            raise ConfigError("method.host", f"must be one of {HOSTS}, got {host!r}")
        check_pool_size(pool_size)
        if memory_size is not None and int(memory_size) < 1:
            raise ConfigError("method.memory_size", f"must be >= 1 or null, got {memory_size}")
        if not 0.0 < float(coreset_ratio) <= 1.0:
            raise ConfigError("method.coreset_ratio", f"must be in (0, 1], got {coreset_ratio}")
        if max_memory_features is not None and int(max_memory_features) < 1:
            raise ConfigError("method.max_memory_features", f"must be >= 1 or null, got {max_memory_features}")
        if int(cfa_gamma_d) < 1:
            raise ConfigError("method.cfa_gamma_d", f"must be >= 1, got {cfa_gamma_d}")
        bcfg = _plain(backbone)
        if layers is None:
            if bcfg.get("kind") == "vit":
                raise ConfigError("method.layers", "give the ViT block(s) to read, e.g. [block6]")
            layers = DEFAULT_LAYERS[host]
        self.host = host
        self.layers = layer_names(layers)
        self.pool_size, self.blur_sigma = int(pool_size), float(blur_sigma)
        self.blur_mode = check_blur_mode(blur_mode)
        #: (h, w) -> reduced map size, or None: full-size maps (``reduced_maps``)
        self.map_size_rule = None
        self.memory_size = None if memory_size is None else int(memory_size)
        self.coreset_ratio, self.projection_dim = float(coreset_ratio), int(projection_dim)
        self.max_memory_features = None if max_memory_features is None else int(max_memory_features)
        if not isinstance(ram_check, bool):
            raise ConfigError("method.ram_check", f"must be true or false, got {ram_check!r}")
        self.ram_check = ram_check
        self.num_keys, self.seed = int(num_keys), int(seed)
        if extractor is None:
            if not bcfg:
                raise ConfigError("backbone", "missing (give a backbone config node or an extractor)")
            from adtrain.backbones import build_extractor

            extractor = build_extractor(bcfg, self.layers, frozen=True)
        self.extractor = extractor
        self.extractor.requires_grad_(False)
        self.adapters = build_adapters(self.extractor, self.layers, adapter_layers, bcfg.get("stages"))
        in_dim = int(sum(int(self.extractor.channels[n]) for n in self.layers))
        if host == "cfa":
            if in_dim // int(cfa_gamma_d) < 1:
                raise ConfigError("method.cfa_gamma_d", f"{cfa_gamma_d} leaves no channel of {in_dim}")
            self.head = CoordConv1x1(in_dim, in_dim // int(cfa_gamma_d))
            out_dim = in_dim // int(cfa_gamma_d)
        else:
            self.head = nn.Identity()
            out_dim = in_dim
        self.feature_dim = in_dim
        self.fmn = FeatureMatchingNetwork(out_dim, candidates, row_chunk, mem_chunk)

    # ------------------------------------------------------------------ features
    def features(self, images: torch.Tensor, adapt: bool = True) -> torch.Tensor:
        """Locally aggregated (adapted) backbone features before the host's head, (B,D0,h,w) fp32."""
        if self.adapters.inside:  # ViT: adapters act inside the blocks; gradients pass the frozen blocks
            with self.adapters.enabled(adapt):
                feats = self.extractor(images)
            return pooled_concat(feats, self.layers, self.pool_size)
        return self.aggregate(self.extract(images), adapt)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen extractor's per-layer features (CNN backbones: the adapters act after it)."""
        if self.adapters.inside:
            raise AdtrainError("DFM.extract: a ViT's adapters act inside the blocks; use features()")
        return self.extractor(images)

    def aggregate(self, feats: dict[str, torch.Tensor], adapt: bool = True) -> torch.Tensor:
        """``features`` from the extractor's output: adapters (adapt=True), then local aggregation."""
        if adapt:
            feats = self.adapters(feats)
        return pooled_concat(feats, self.layers, self.pool_size)

    def output_from(self, feats: dict[str, torch.Tensor], size) -> AnomalyOutput:
        """Eval-mode output from the extractor's features (CNN backbones): what ``forward`` gives
        for the images they came from, with maps of ``size``."""
        maps, scores = self.fmn(self.head(self.aggregate(feats)))
        return AnomalyOutput(self.anomaly_map(maps, size), scores)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features P the FMN matches, (B,D,h,w)."""
        return self.head(self.features(images))

    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fmn(self.embed(images))

    def anomaly_map(self, patch_scores: torch.Tensor, size) -> torch.Tensor:
        """Patch scores resized to ``size`` (bilinear), blurred; inside ``reduced_maps`` area-averaged
        to the rule's size straight from the patch scores (``reduced_map``)."""
        out = None if self.map_size_rule is None else tuple(self.map_size_rule(*size))
        if out is not None and out != tuple(size):
            return reduced_map(patch_scores, size, self.blur_sigma, out, self.blur_mode)
        return upsampled_map(patch_scores, size, self.blur_sigma, self.blur_mode)

    @contextmanager
    def reduced_maps(self, size_rule):
        """Maps area-averaged to ``size_rule(h, w)`` (validation: ``methods.val_maps.coarse_size``)."""
        before, self.map_size_rule = self.map_size_rule, size_rule
        try:
            yield self
        finally:
            self.map_size_rule = before

    def train(self, mode: bool = True):
        super().train(mode)
        self.extractor.eval()  # frozen: batch-norm statistics fixed
        return self

    def forward(self, images: torch.Tensor):
        maps, scores = self.score(images)
        if self.training:
            return maps, scores
        return AnomalyOutput(self.anomaly_map(maps, images.shape[-2:]), scores)

    # ------------------------------------------------------------------ memory
    @torch.no_grad()
    def build_memory(self, batches: Iterable[torch.Tensor], with_keys: bool = False,
                     reset_patch: bool = False, expected_batches: int | None = None) -> dict:
        """(Re)build the FMN memory from the current adapted features of ``batches`` (image tensors):
        PatchCore host: greedy coreset (memory_size items, or coreset_ratio of all patches) on the
        shared MemoryBank; CFA host: CFA's bank (equal-weight running mean over batches of the
        batch-mean descriptor per position), reduced by greedy coreset to memory_size if smaller.
        The memory modulate is reset to identity. with_keys: also a coreset (num_keys) of the frozen
        backbone's features, the task key for continual routing (returned as ``keys``).
        expected_batches: the number of batches, so that after the first a collection the host
        memory cannot hold is refused (``ram_check``, adtrain.memory.ram)."""
        identity = self.adapters.is_identity()
        cap = self.max_memory_features
        bank = MemoryBank(backend="torch", max_features=cap, seed=self.seed)
        keys = MemoryBank(backend="torch", max_features=cap, seed=self.seed + 1) if with_keys else None
        mean, n_batches, grid, sample, device, n_seen = None, 0, None, None, None, 0
        for images in batches:
            pre = self.features(images)
            emb = self.head(pre).float()
            grid, device = tuple(emb.shape[-2:]), emb.device
            if sample is None:
                sample = _rows(emb)[:_REF_ROWS].clone()
            if self.host == "patchcore":
                bank.add(_rows(emb))
            else:
                n_batches += 1
                m = emb.mean(dim=0)
                if mean is None:
                    mean = m
                elif mean.shape != m.shape:
                    raise AdtrainError(f"DFM memory (CFA host): grid {tuple(m.shape[1:])} != {tuple(mean.shape[1:])}")
                else:
                    mean += (m - mean) / n_batches
            if keys is not None:
                base = pre if identity else self.features(images, adapt=False)
                keys.add(_rows(base))
            if expected_batches and n_seen == 0:
                self._check_room([b for b in (bank, keys) if b is not None and b.num_added], expected_batches)
            n_seen += 1
        if sample is None:
            raise AdtrainError("DFM memory: no training images were seen")
        if self.host == "patchcore":
            n_all = min(bank.num_added, cap) if cap else bank.num_added
            memory = self._coreset(bank, n_all, self.memory_size, self.coreset_ratio, device)
        else:
            memory = mean.flatten(1).t().contiguous()
            if self.memory_size is not None and self.memory_size < memory.shape[0]:
                memory = memory[greedy_coreset(memory, n=self.memory_size, projection_dim=self.projection_dim,
                                               seed=self.seed)]
        memory = memory.to(device)
        ref = float(distance_volume(sample, memory).min(dim=1).values.mean())
        self.fmn.set_memory(memory, grid=grid, dist_ref=ref, reset_patch=reset_patch)
        info = {"memory_size": int(memory.shape[0]), "grid": grid, "dist_ref": ref}
        if keys is not None:
            n_all = min(keys.num_added, cap) if cap else keys.num_added
            info["keys"] = self._coreset(keys, n_all, self.num_keys, None, device).cpu()
        return info

    def _check_room(self, banks: list[MemoryBank], batches: int) -> None:
        """After the first of ``batches`` batches: refuse a collection the host memory cannot hold."""
        if not self.ram_check or not banks:
            return
        rows = banks[0].capped(banks[0].num_added * batches)  # every bank: a row per patch
        row_bytes = sum(b.row_bytes(self.projection_dim) for b in banks)
        check_room(rows, row_bytes, banks[0].held_rows, "method.max_memory_features",
                   "DFM's memory build (the training patches' features)", "method.ram_check")

    def _coreset(self, bank: MemoryBank, n_all: int, size: int | None, ratio: float | None, device) -> torch.Tensor:
        if size is not None:
            ratio = min(1.0, (int(size) + 0.5) / max(1, n_all))  # int(n_all * ratio) == size
        ratio = None if ratio is None or ratio >= 1.0 else ratio
        bank.build(coreset_ratio=ratio, projection_dim=self.projection_dim, seed=self.seed, device=device)
        return bank.bank

    @torch.no_grad()
    def key_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's aggregated features (adapters off), for task routing."""
        return self.features(images, adapt=False)

    # ------------------------------------------------------------------ parameter groups
    def adapter_parameters(self) -> list[nn.Parameter]:
        """Stage 1: the adapters (and, with the CFA host, CFA's descriptor)."""
        return list(self.adapters.parameters()) + list(self.head.parameters())

    def fmn_parameters(self) -> list[nn.Parameter]:
        """Stage 2: the memory and the modulate layers."""
        return list(self.fmn.parameters())
