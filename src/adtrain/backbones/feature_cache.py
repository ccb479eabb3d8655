"""The feature cache of frozen backbones (``feature_cache=on``; off by default).

A frozen extractor's output depends only on its weights, the layers asked for and the exact input
batch: the jobs of a sweep over, say, ``method.coreset_ratio`` feed the same batches through the
same backbone and can reuse each other's features. Each lookup is keyed on a SHA-256 of the
weights (hashed once per extractor), the extractor's settings (name, kind, layers and the stage
indices they are taken at, the network's structure and timm kwargs, channels-last, batch-norm
folding, pre-/post-activation taps, the input statistics' values), the input batch's shape, dtype
and bytes, the device, the autocast state and the torch version; a hit returns the stored tensors, bit for bit what the extractor returned when
they were stored. Entries are single files written atomically (temp + rename), so concurrent jobs
are safe; the folder is kept under ``feature_cache_max_gb`` by deleting the least recently used
entries (a hit refreshes an entry's time).

It is off by default because it could mislead: features computed on another machine's kernels
(the same device type and torch version) would be served as if computed here. Only frozen
extractors (``FeatureExtractor(frozen=True)``) use it; results.json says ``feature_cache``:
off | hit (every lookup served from the cache) | miss (at least one computed), with the counts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from adtrain.errors import ConfigError

log = logging.getLogger("adtrain")

SUFFIX = ".feat.pt"


#: errors after which the folder takes no entry for the rest of the run
_FOR_GOOD = (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EROFS, errno.ENOENT, errno.EISDIR)


def feature_cache_enabled(value) -> bool:
    """``feature_cache``: on | off (YAML reads bare on/off as true/false)."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    v = str(value).lower()
    if v not in ("on", "off", "true", "false"):
        raise ConfigError("feature_cache", f"{value!r}; choose on or off")
    return v in ("on", "true")


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def settings_digest(extractor) -> str:
    """Everything besides the weights that shapes the features: the network's structure (its repr:
    strides, dilations, what timm kwargs such as ``output_stride`` changed), the timm kwargs, the
    stage index each layer is taken at and the input statistics' conversion (values, not only
    whether there is one: the conversion's buffers are not in the state dict)."""
    renorm = ([tensor_bytes(extractor._scale).hex(), tensor_bytes(extractor._shift).hex()]
              if extractor._renorm else None)
    head = {"structure": hashlib.sha256(repr(extractor.model).encode()).hexdigest(),
            "timm_kwargs": repr(sorted(getattr(extractor, "timm_kwargs", {}).items())),
            "index": sorted((str(k), int(v)) for k, v in extractor._index.items()), "renorm": renorm}
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()


def _holds_layers(obj, layers) -> bool:
    """What _store writes: a tensor for each layer asked for (a damaged entry may hold anything)."""
    return (isinstance(obj, dict) and set(obj) == set(layers)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


class FeatureCache:
    """A folder of feature entries with an LRU disk budget, and what this process did with it."""

    def __init__(self, root: str | os.PathLike, max_gb: float = 10.0):
        if isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not max_gb > 0:
            raise ConfigError("feature_cache_max_gb", f"must be a number > 0, got {max_gb!r}")
        self.root = Path(os.path.expanduser(str(root)))
        self.max_bytes = int(float(max_gb) * 2**30)
        self.hits = 0
        self.misses = 0
        self.unwritable: str | None = None  # why the folder takes no entry (said once, not per batch)
        self._warned = False

    def state(self) -> str:
        if not self.hits and not self.misses:
            return "off"
        if self.unwritable is not None and not self.hits:
            return "unwritable"  # computed every time: nothing was or could be stored
        return "miss" if self.misses else "hit"

    def key(self, extractor, x: torch.Tensor) -> str:
        if getattr(extractor, "_weights_digest", None) is None:  # once per extractor (weights frozen)
            extractor._weights_digest = weights_digest(extractor)
            extractor._settings_digest = settings_digest(extractor)
        dev = x.device
        autocast = torch.is_autocast_enabled(dev.type) if dev.type in ("cpu", "cuda") else False
        head = {"weights": extractor._weights_digest, "settings": extractor._settings_digest,
                "name": extractor.name, "kind": extractor.kind,
                "layers": list(extractor.layers), "channels_last": extractor.channels_last,
                "fuse_batchnorm": bool(getattr(extractor, "fuse_batchnorm", False)),
                "pre_activation": bool(getattr(extractor, "pre_activation", False)),
                "renorm": bool(extractor._renorm), "shape": list(x.shape), "dtype": str(x.dtype),
                "device": str(dev), "autocast": [autocast, str(torch.get_autocast_dtype(dev.type)) if autocast else None],
                "torch": torch.__version__}
        h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
        h.update(tensor_bytes(x))
        return h.hexdigest()

    def __call__(self, extractor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The extractor's output for x: from the cache, or computed (``extractor.extract``) and stored."""
        from adtrain.cache_files import load_entry

        path = self.root / (self.key(extractor, x) + SUFFIX)
        # a damaged entry is warned about, deleted and computed again (load_entry)
        feats = load_entry(path, "feature cache entry", x.device, lambda obj: _holds_layers(obj, extractor.layers))
        if feats is not None:
            self.hits += 1
            return feats
        feats = extractor.extract(x)
        self.misses += 1
        self._store(path, {k: v.detach() for k, v in feats.items()})
        return feats

    def _store(self, path: Path, feats: dict[str, torch.Tensor]) -> None:
        from adtrain.io import torch_save

        if self.unwritable is not None:
            return
        try:
            torch_save({k: v.cpu() for k, v in feats.items()}, path)
            self.evict()
        except OSError as e:
            if e.errno in _FOR_GOOD:  # the folder will not take an entry this run: said once, not tried per batch
                self.unwritable = str(e)
                log.warning("feature_cache_dir=%s: cannot store features (%s); this run computes them without "
                            "the cache", self.root, e)
            elif not self._warned:  # a full disk may have room after an eviction: tried again, said once
                log.warning("feature_cache_dir=%s: cannot store features (%s); computed without the cache",
                            self.root, e)
            self._warned = True

    def evict(self) -> int:
        """Delete the least recently used entries until the folder fits the budget; returns how many."""
        from adtrain.cache_files import evict_lru
        from adtrain.io import remove_dead_temps

        if not getattr(self, "_temps_swept", False):  # once per cache, not after every stored batch
            remove_dead_temps(self.root, recursive=False)  # writes killed midway: nothing else removes them
            self._temps_swept = True
        return evict_lru(self.root.glob("*" + SUFFIX), self.max_bytes)


def attach_feature_cache(method: torch.nn.Module, cfg) -> FeatureCache | None:
    """Give every frozen FeatureExtractor in ``method`` the cache when ``feature_cache=on``."""
    from adtrain.backbones.extractor import FeatureExtractor

    if not feature_cache_enabled(cfg.get("feature_cache", False)):
        return None
    root = cfg.get("feature_cache_dir")
    if not root:
        raise ConfigError("feature_cache_dir", "missing: where feature_cache=on keeps features")
    cache = FeatureCache(root, cfg.get("feature_cache_max_gb", 10.0))
    # an extractor with trainable parameters inside (DFM's ViT adapters) changes as it trains: never cached
    frozen = [m for m in method.modules() if isinstance(m, FeatureExtractor) and m.frozen
              and not any(p.requires_grad for p in m.parameters())]
    for m in frozen:
        m.feature_cache = cache
    if not frozen:
        log.info("feature_cache=on: %s has no frozen backbone, nothing to cache", type(method).__name__)
    return cache
