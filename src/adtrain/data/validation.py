"""The validation set: held-out training normals plus synthetic anomalies made from *them*.

Nothing here reads a test image or a test label. Each held-out normal gives ``per_normal``
anomalous copies, the families taken in turn from ``families`` (a seeded order, so both families
cover the normals evenly):

* ``cutpaste``: a patch of the image pasted elsewhere in it (Li et al., CVPR 2021), or a thin
  rotated "scar" (``adtrain.data.cutpaste.CutPaste``);
* ``perlin``: a Perlin-noise mask filled with a foreign texture blended into the image (DRAEM,
  Zavrtanik et al., ICCV 2021; ``adtrain.data.perlin.PerlinAnomaly``): a different shape and
  appearance family (irregular blobs of foreign material instead of displaced own content).

``by_category`` overrides a family's options for one category (e.g. a stronger Perlin opacity
where a category's own texture hides a faint one: ELPV poly, README "Data").

Each anomaly is drawn from a generator seeded by (seed, family, copy, category and the last three
parts of the image path, so not the install location) on the image
at its stored resolution, before any resize: the validation set is the same for every epoch and
for every method, backbone and input size that runs on the same data with the same seed. Made
images are cached in memory (bounded by ``cache_mb`` per process) so epochs do not redo them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from adtrain.data.dataset import AnomalyDataset, Sample, _binarise, image_tensor
from adtrain.errors import ConfigError, whole_number

FAMILIES = ("cutpaste", "perlin")


def _generator(family: str, options: Mapping | None, where: str = "data.val_anomalies", own=()):
    """The family's generator from ``options``; a bad option is named where it is set: under ``where``
    (a by_category entry) if it is one of ``own`` (that entry's options), else under data.val_anomalies."""
    opts = dict(options or {})

    def named(opt: str) -> str:
        return f"{where if opt.split('.')[0] in own else 'data.val_anomalies'}.{family}.{opt}"

    if "p" in opts:  # every validation anomaly is made (per_normal of them per held-out normal)
        raise ConfigError(named("p"), "is not an option here: each held-out normal gets "
                          "data.val_anomalies.per_normal anomalies; set that instead")
    try:
        if family == "cutpaste":
            from adtrain.data.cutpaste import CutPaste

            return CutPaste(p=1.0, **opts)
        from adtrain.data.perlin import PerlinAnomaly

        return PerlinAnomaly(p=1.0, **opts)
    except ConfigError as err:  # named by the generator's own keys (cutpaste.area_ratio): said where it is set
        raise ConfigError(named(err.key.removeprefix(f"{family}.")), err.detail) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}.{family}", str(err)) from None


@dataclass
class ValAnomalies:
    """``data.val_anomalies``: which synthetic anomalies join the held-out normals."""

    families: Sequence[str] = ("cutpaste", "perlin")
    per_normal: int = 1
    cache_mb: float = 512.0
    cutpaste: dict = field(default_factory=dict)
    perlin: dict = field(default_factory=dict)
    by_category: dict = field(default_factory=dict)

    def __post_init__(self):
        fams = [self.families] if isinstance(self.families, str) else list(self.families or [])
        bad = [f for f in fams if f not in FAMILIES]
        if bad:
            raise ConfigError("data.val_anomalies.families", f"unknown {bad}; choose from {list(FAMILIES)}")
        self.families = tuple(fams)
        whole_number(self.per_normal, "data.val_anomalies.per_normal")
        if isinstance(self.cache_mb, bool) or not isinstance(self.cache_mb, (int, float)) or not self.cache_mb >= 0:
            raise ConfigError("data.val_anomalies.cache_mb", f"must be a number >= 0 (0 = off), got {self.cache_mb!r}")
        self.per_normal = int(self.per_normal) if self.families else 0
        self.generators = {f: _generator(f, getattr(self, f)) for f in self.families}
        self.category_generators: dict[str, dict] = {}
        if not isinstance(self.by_category or {}, Mapping):
            raise ConfigError("data.val_anomalies.by_category",
                              f"expected a mapping category -> {{family: options}}, got {self.by_category!r}")
        for cat, over in dict(self.by_category or {}).items():
            key = f"data.val_anomalies.by_category.{cat}"
            if not isinstance(over, Mapping):
                raise ConfigError(key, f"expected a mapping family -> options, got {over!r}")
            bad = [f for f in over if f not in FAMILIES]
            if bad:
                raise ConfigError(key, f"unknown families {bad}; choose from {list(FAMILIES)}")
            self.category_generators[str(cat)] = {
                f: _generator(f, {**dict(getattr(self, f) or {}), **dict(over[f] or {})}, key, set(over[f] or {}))
                if f in over
                else self.generators[f] for f in self.families}

    def generator(self, family: str, category: str):
        """The generator of ``family`` for an image of ``category`` (``by_category`` options merged
        over the family's own, key by key)."""
        return self.category_generators.get(str(category), self.generators)[family]

    @classmethod
    def from_any(cls, cfg) -> "ValAnomalies":
        if cfg is None or cfg is False:
            return cls(families=(), per_normal=0)
        if isinstance(cfg, cls):
            return cfg
        try:
            return cls(**dict(cfg))
        except TypeError as err:
            raise ConfigError("data.val_anomalies", str(err)) from None

    def plan(self, normals: Sequence[Sample], seed: int) -> list[tuple[Sample, str | None, int]]:
        """(sample, family or None for the normal itself, copy index) for every validation item."""
        from adtrain.data.base import seeded_rng

        items: list[tuple[Sample, str | None, int]] = [(s, None, 0) for s in normals]
        if not self.per_normal or not normals:
            return items
        # each category's normals on their own (the same stream for each): a category's anomalies are
        # those it has alone, whatever else the task holds (one order over all categories gave texture
        # other families, so other anomalies, beside grid than alone); one category: as before
        by_category: dict[str, list[int]] = {}
        for i, s in enumerate(normals):
            by_category.setdefault(str(s.category), []).append(i)
        f = len(self.families)
        for members in by_category.values():
            order = seeded_rng(seed, "val_anomaly_order").permutation(len(members))
            for rank, j in enumerate(order.tolist()):
                for copy in range(self.per_normal):
                    items.append((normals[members[j]], self.families[(rank * self.per_normal + copy) % f], copy))
        items[len(normals):] = sorted(items[len(normals):], key=lambda it: (it[0].category, it[0].path, it[2]))
        return items


def sample_key(sample: Sample) -> str:
    """The category and the last three parts of the image path: the same wherever the data is
    installed (an absolute path would make the validation set depend on the install location)."""
    from pathlib import PurePath

    return f"{sample.category}:{'/'.join(PurePath(str(sample.path)).parts[-3:])}"


class ValidationDataset(Dataset):
    """Held-out normals and their synthetic anomalies, in the batch contract of AnomalyDataset.

    ``base`` is the eval-transform dataset of the normals; ``items`` (from ``ValAnomalies.plan``)
    starts with those normals in the same order."""

    def __init__(self, base: AnomalyDataset, items: Sequence[tuple[Sample, str | None, int]],
                 spec: ValAnomalies, seed: int):
        if [s for s, fam, _ in items if fam is None] != list(base.samples):
            raise ValueError("ValidationDataset: the items must start with the base dataset's normals")
        self.base, self.items, self.spec, self.seed = base, list(items), spec, int(seed)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cached_bytes = 0
        self._held: dict[int, dict] = {}  # every item as __getitem__ gives it (``hold``)
        self._too_large: float | None = None  # the cache_mb a hold did not fit in

    @property
    def held(self) -> bool:
        """True when every item is kept as it is served (``hold``): a pass reads memory alone."""
        return len(self._held) == len(self.items) > 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_anomalies(self) -> int:
        return sum(1 for _, fam, _ in self.items if fam is not None)

    def _make(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index``'s anomaly (image, mask), from its own seeded generator: any thread, any order."""
        from adtrain.data.base import seeded_rng

        sample, family, copy = self.items[index]
        image, _ = self.base._load(sample)
        rng = seeded_rng(self.seed, "val_anomaly", family, str(copy), sample_key(sample))
        image, mask = self.spec.generator(family, sample.category)(image, rng)
        return np.ascontiguousarray(image, dtype=np.uint8), _binarise(mask)

    def _keep(self, index: int, out: tuple[np.ndarray, np.ndarray]) -> bool:
        """Cache ``out`` if it fits in ``cache_mb``; False if it does not."""
        size = out[0].nbytes + out[1].nbytes
        if self._cached_bytes + size > self.spec.cache_mb * 2**20:
            return False
        self._cache[index] = out
        self._cached_bytes += size
        return True

    def _anomaly(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cache:
            return self._cache[index]
        out = self._make(index)
        self._keep(index, out)
        return out

    def prefill(self, threads: int | None = None) -> None:
        """Make every anomaly now (in this process) while they fit in ``cache_mb``: DataLoader
        workers then inherit them, and a later pass's workers do not make them again. ``threads``
        (default: the cores this process may use, at most 8) make them side by side (decoding and numpy release the GIL); each
        item draws from its own seeded generator, so the anomalies are the same for any count."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [i for i, (_, family, _) in enumerate(self.items) if family is not None and i not in self._cache]
        threads = _threads(threads, len(todo))
        if threads == 1:
            for index in todo:
                if not self._keep(index, self._make(index)):
                    return  # over the budget: the rest are made by the workers
            return
        with ThreadPoolExecutor(threads) as pool:
            step = 4 * threads  # a few rounds at a time: none is made past the first that does not fit
            for start in range(0, len(todo), step):
                part = todo[start:start + step]
                for index, out in zip(part, pool.map(self._make, part)):
                    if not self._keep(index, out):
                        return

    def hold(self, threads: int | None = None) -> bool:
        """Make every item once, as ``__getitem__`` serves it (the eval transform applied, the same
        tensors), and keep them all if they fit in ``cache_mb`` (the anomalies' untransformed copies
        are then let go): every later pass, of any epoch, task or routed validation, reads memory,
        in the loading process (the loader needs no workers). False if they do not all fit: then
        the anomalies alone are kept, as ``prefill`` keeps them (or none, past the budget too), and
        later calls with the same budget answer at once."""
        from concurrent.futures import ThreadPoolExecutor

        if self.held:
            return True
        if self._too_large == self.spec.cache_mb:
            return False
        self._too_large = self.spec.cache_mb  # until every item is kept
        self.prefill(threads)
        if not self.items or any(fam is not None and i not in self._cache for i, (_, fam, _) in enumerate(self.items)):
            return False  # the anomalies alone outgrow the budget
        first = self._item(0)
        if _nbytes(first) * len(self.items) > self.spec.cache_mb * 2**20:
            return False  # (items share one size after the eval transform)
        with ThreadPoolExecutor(_threads(threads, len(self.items))) as pool:
            held = {0: first, **dict(zip(range(1, len(self.items)), pool.map(self._item, range(1, len(self.items)))))}
        size = sum(_nbytes(item) for item in held.values())
        if size > self.spec.cache_mb * 2**20:
            return False
        self._held, self._cache, self._cached_bytes, self._too_large = held, {}, size, None
        return True

    def __getitem__(self, index: int) -> dict:
        held = self._held.get(index)
        return dict(held) if held is not None else self._item(index)

    def _item(self, index: int) -> dict:
        sample, family, _ = self.items[index]
        if family is None:
            return self.base[index]  # the normals come first, in the base dataset's order
        image, mask = self._anomaly(index)
        out = self.base.transform(image=image, mask=mask)
        m = (torch.as_tensor(out["mask"]) > 0.5).to(torch.uint8).unsqueeze(0)
        anomalous = bool(m.any())  # a centre crop can cut a pasted region away: then it is normal
        return {
            "image": image_tensor(out["image"]),
            "label": torch.tensor(int(anomalous), dtype=torch.int64),
            "mask": m,
            "has_mask": torch.tensor(True),
            "category": sample.category,
            "defect": f"synthetic_{family}" if anomalous else "good",
            "path": f"{sample.path}#{family}{self.items[index][2]}",
            "source_size": torch.tensor(image.shape[:2], dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }


def _threads(threads: int | None, todo: int) -> int:
    """``threads``, or the cores this process may use (at most 8), and no more than the work."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(todo, int(threads or min(8, cores))))


def _nbytes(item: dict) -> int:
    return sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))
