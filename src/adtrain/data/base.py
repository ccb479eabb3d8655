"""AnomalyDataModule: held-out split, few-shot, transforms and the three DataLoaders."""

from __future__ import annotations

import logging
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from adtrain import distributed
from adtrain.data.dataset import (AnomalyDataset, BitDepthLoader, Loaded, PredictDataset, Sample, collate,
                                  load_sample)
from adtrain.data.image_io import check_bit_depth, expand_image_paths
from adtrain.data.resize import DEFAULT as DEFAULT_RESIZE
from adtrain.data.resize import resize_rule
from adtrain.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, build_augment, build_transform, check_crop,
                                     instantiate_if_config, size_pair, to_plain)
from adtrain.errors import ConfigError, DataError, whole_number

log = logging.getLogger("adtrain")


#: data.val_split's value for a dataset's own validation split (MVTec LOCO AD, MVTec 3D-AD, MVTec AD 2)
OFFICIAL = "official"


def seeded_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on the seed and the given names (stable across runs)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF] + [zlib.crc32(k.encode()) for k in keys])


def split_by_fraction(items: Sequence, fraction: float, rng: np.random.Generator,
                      keep_one: bool = True) -> tuple[list, list]:
    """Shuffle with rng and return (rest, picked) where picked holds round(fraction * n) items.

    keep_one: when 0 < fraction < 1 and n >= 2, both parts get at least one item.
    """
    items = list(items)
    n = len(items)
    k = int(round(fraction * n))
    if keep_one and 0 < fraction < 1 and n >= 2:
        k = min(max(k, 1), n - 1)
    order = rng.permutation(n)
    picked = sorted(order[:k].tolist())
    rest = sorted(order[k:].tolist())
    return [items[i] for i in rest], [items[i] for i in picked]


def split_by_group(items: Sequence, groups: Sequence, fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """split_by_fraction over whole groups (groups[i]: item i's group, e.g. the physical sample that
    several camera views show): every item of a group lands on the same side, each side in item order."""
    _, held = split_by_fraction(sorted(set(groups)), fraction, rng)
    held = set(held)
    return ([x for x, g in zip(items, groups) if g not in held], [x for x, g in zip(items, groups) if g in held])


def warn_unmasked(samples: Sequence[Sample], source: object) -> None:
    """Log the anomalous test images of each category that have no mask (allowed: they count for the
    image metrics only), so that a mask folder or file list that misses some does not pass unseen."""
    for cat, group in group_by_category(s for s in samples if s.label == 1).items():
        lacking = [s.path for s in group if not s.mask_path]
        if lacking:
            log.warning("%s, category %s: %d of %d anomalous test image(s) have no mask and count for the image "
                        "metrics only, not the pixel metrics: %s%s", source, cat, len(lacking), len(group),
                        ", ".join(lacking[:3]), " ..." if len(lacking) > 3 else "")


def group_by_category(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: (s.category, s.path)):
        groups[s.category].append(s)
    return dict(groups)


class AnomalyDataModule(LightningDataModule):
    """Common data handling; subclasses implement _train_samples() and _test_samples().

    category: one name, or a list (a task grouping several categories).
    val_split: fraction of the training normals held out (seeded, per category) for model
    selection, thresholds and normalisation; never the test set. "official": the dataset's own
    validation normals instead (``_official_val_samples``), every training normal kept.
    shots: keep k training normals per category (seeded), chosen after the held-out split.
    resize: how images are resized to image_size (``adtrain.data.resize``): pil_bilinear (default,
    torchvision's Resize of a PIL image, antialiased), pil_lanczos, cv2_linear (OpenCV bilinear,
    not antialiased; adtrain's rule before the key existed). Masks: nearest, whatever the rule.
    bit_depth: null = a 16-bit image's full range (0-65535) maps onto 0-255; N (8-16) = its values
    use N bits (a 12-bit camera's 0-4095 in 16-bit files: 12), larger ones clipped; [low, high] = the
    values of any image wider than 8 bits (16-bit, 32-bit, float) from low to high map onto 0-255,
    those outside clipped (an X-ray window, a thermal camera's kelvin). 8-bit images are read as they
    are either way (``adtrain.data.image_io.check_bit_depth``).
    cache: auto = decoded, resized images kept in ``cache_dir`` (adtrain.data.image_cache) and
    shared by epochs, jobs and tasks; off = decoded every time.
    augment: albumentations transforms (objects or `_target_` dicts), training images only.
    synthetic_anomaly: callable(image_uint8, rng) -> (image, mask), training images only.
    device_normalize: auto = the datasets hand over uint8 images (resized, cropped), normalised on
    the model's device once per batch (``adtrain.data.device_norm``; bit-identical); training sets
    with ``augment`` keep the float path. off = normalised float32 from the workers.
    val_anomalies: synthetic anomalies made from the held-out normals for validation
    (``adtrain.data.validation.ValAnomalies``: families, per_normal); null = normals only.

    The test set is listed only when first asked for (``test_samples``, at test time): fitting,
    selection and thresholds never open a test image or read a test label.
    """

    def __init__(self, category: str | list[str], image_size: Sequence[int] | int = (256, 256),
                 center_crop: Sequence[int] | int | None = None, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 0, val_split: float = 0.2,
                 seed: int = 0, shots: int | None = None, augment: list | None = None,
                 synthetic_anomaly: object | None = None, val_anomalies: object | None = None,
                 cache: str | bool = "off", cache_dir: str | None = None, cache_max_gb: float = 20.0,
                 device_normalize: str | bool = "auto", resize: str = DEFAULT_RESIZE,
                 bit_depth=None):
        super().__init__()
        category = to_plain(category)
        if isinstance(category, (list, tuple)):
            if not category:
                raise ConfigError("data.category", "empty list of categories")
            self.categories = [str(c) for c in category]
            twice = sorted({c for c in self.categories if self.categories.count(c) > 1})
            if twice:  # every split would hold its images twice (and count them twice)
                raise ConfigError("data.category", f"names {', '.join(twice)} twice: each category once")
        else:
            self.categories = [str(category)]
        self.category = category if isinstance(category, str) else list(self.categories)
        if image_size is None:
            raise ConfigError("data.image_size", "is null: set [height, width]")
        self.image_size = size_pair(image_size, "data.image_size")
        self.center_crop = size_pair(center_crop, "data.center_crop")
        self.resize = resize_rule(resize)
        self.bit_depth = check_bit_depth(to_plain(bit_depth))
        check_crop(self.center_crop, self.image_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("data.batch_size", "must be >= 1")
        self.num_workers = int(num_workers)
        if val_split == OFFICIAL:
            if not self.has_official_val:
                raise ConfigError("data.val_split", f"'{OFFICIAL}' needs a dataset released with its own "
                                  "validation normals (mvtec_loco, mvtec_3d, mvtec_ad2); use a fraction of the "
                                  "training normals, e.g. 0.2")
            self.val_split = OFFICIAL
        else:
            try:
                ok = 0.0 <= float(val_split) < 1.0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError("data.val_split", f"must be a fraction in [0, 1) or '{OFFICIAL}', got {val_split!r}")
            self.val_split = float(val_split)
        self.seed = int(seed)
        self.shots = whole_number(shots, "data.shots", least=1, none_ok=True)
        self.augment = build_augment(augment)
        self.synthetic_anomaly = instantiate_if_config(synthetic_anomaly, "data.synthetic_anomaly")
        if self.synthetic_anomaly is not None and not callable(self.synthetic_anomaly):
            raise ConfigError("data.synthetic_anomaly", "must be callable(image_uint8, rng) -> (image, mask)")
        from adtrain.data.validation import ValAnomalies

        self.val_anomalies = ValAnomalies.from_any(to_plain(val_anomalies))
        from adtrain.data.image_cache import ImageCache, cache_mode

        if cache_mode(cache) != "off" and not cache_dir:
            raise ConfigError("data.cache_dir", "missing: where data.cache=auto keeps decoded images")
        self.image_cache = ImageCache(cache_dir or ".", cache, cache_max_gb)
        from adtrain.data.device_norm import device_norm_mode

        self.device_normalize = device_norm_mode(device_normalize)
        self._train: list[Sample] | None = None
        self._val: list[Sample] | None = None
        self._test: list[Sample] | None = None
        self._val_dataset = None  # (key, ValidationDataset): made once, its anomalies kept across loaders
        #: seconds spent making validation anomalies in this process (``Selection`` counts them as validation)
        self.val_prep_seconds = 0.0

    # ----- hooks for subclasses -------------------------------------------------------------
    def _train_samples(self) -> list[Sample]:
        """All training normals of self.categories (before the held-out split)."""
        raise NotImplementedError

    def _test_samples(self) -> list[Sample]:
        """All test samples of self.categories."""
        raise NotImplementedError

    def sample_group(self, path: str) -> str | None:
        """The physical sample a test image shows, where a dataset photographs each from several
        views (Real-IAD): results.json's sample_auroc scores a sample by its views' highest score.
        None: every image its own sample."""
        return None

    #: does the dataset come with its own validation normals (data.val_split=official)?
    has_official_val: bool = False

    def _official_val_samples(self) -> list[Sample]:
        """The dataset's own validation normals (data.val_split=official; see has_official_val)."""
        raise NotImplementedError

    def spro_regions(self) -> Callable | None:
        """Picklable Sample -> ground-truth regions with saturation fractions, or None where a sample
        has none (adtrain.data.regions), for the test's AU-sPRO (MVTec LOCO AD); None: no dataset
        support (the default)."""
        return None

    def spro_groups(self) -> dict[str, list[str]]:
        """{category: its defect types} AU-sPRO is computed for: the test set's defect types with
        ground-truth folders, in the categories ``spro_regions`` reads ({} without it)."""
        return {}

    def sample_loader(self) -> Callable[[Sample], Loaded]:
        """Picklable callable Sample -> (image uint8 HxWx3, mask {0,1} HxW or None)."""
        return load_sample if self.bit_depth is None else BitDepthLoader(self.bit_depth)

    # ----- setup ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        train_all = self._train_samples()
        if not train_all:
            raise DataError(self._describe(), f"no training images for category {self.category}")
        if any(s.label != 0 for s in train_all):
            raise DataError(self._describe(), "training samples must all be normal (label 0)")
        official = group_by_category(self._official_val_samples()) if self.val_split == OFFICIAL else None
        train, val = [], []
        for cat, group in group_by_category(train_all).items():
            if official is not None:
                rest, held = group, official.get(cat, [])
            else:
                rng = seeded_rng(self.seed, "val_split", cat)
                views = [self.sample_group(s.path) for s in group]  # several images of one physical sample:
                rest, held = (split_by_fraction(group, self.val_split, rng) if None in views  # held out together
                              else split_by_group(group, views, self.val_split, rng))
            if self.shots is not None:
                if self.shots > len(rest):
                    raise ConfigError("data.shots", f"{self.shots} shots requested but category '{cat}' has "
                                      f"only {len(rest)} training normals after the held-out split")
                rest = [rest[i] for i in sorted(seeded_rng(self.seed, "shots", cat)
                                                .choice(len(rest), self.shots, replace=False).tolist())]
            train += rest
            val += held
        self._train, self._val = train, val

    def _describe(self) -> str:
        """What to name in errors about this data source (subclasses: the root folder)."""
        return type(self).__name__

    def _require_setup(self) -> None:
        if self._train is None:
            self.setup()

    @property
    def train_samples(self) -> list[Sample]:
        self._require_setup()
        return self._train

    @property
    def val_samples(self) -> list[Sample]:
        self._require_setup()
        return self._val

    @property
    def test_samples(self) -> list[Sample]:
        """The test set, listed on first use (testing): nothing before it reads test files or labels."""
        self._require_setup()
        if self._test is None:
            self._test = list(self._test_samples())
        return self._test

    @property
    def mean(self) -> tuple[float, float, float]:
        return IMAGENET_MEAN

    @property
    def std(self) -> tuple[float, float, float]:
        return IMAGENET_STD

    @property
    def input_normalizer(self):
        """Normalises the uint8 batches of this module's datasets on their device (device_norm)."""
        from adtrain.data.device_norm import device_normalizer

        return device_normalizer(tuple(self.mean), tuple(self.std))

    def uint8_images(self, train: bool = False) -> bool:
        """Do this module's (train or eval) datasets hand over uint8 images (data.device_normalize)?
        Not a training set with albumentations augmentation: that stays on the float path."""
        return self.device_normalize == "auto" and not (train and self.augment)

    # ----- transforms, datasets, loaders ----------------------------------------------------
    def eval_transform(self, normalize: bool = True):
        """normalize=False: uint8 (C,H,W) tensors (self.input_normalizer finishes them)."""
        return build_transform(self.image_size, self.center_crop, None, self.mean, self.std, normalize, self.resize)

    def train_transform(self, normalize: bool = True):
        return build_transform(self.image_size, self.center_crop, self.augment, self.mean, self.std, normalize,
                               self.resize)

    def make_dataset(self, samples: Sequence[Sample], train: bool = False, regions: bool = False,
                     source_truth: bool = False) -> AnomalyDataset:
        """train=True: augment and synthetic anomalies apply; False: the eval transform. The image is
        uint8 where ``uint8_images(train)`` (normalised later on the device), else float32. regions:
        items carry their ground-truth regions too, where the dataset has them (``spro_regions``);
        source_truth: and their ground truth at the image's own size (metrics.resolution=source)."""
        normalize = not self.uint8_images(train)
        ds = AnomalyDataset(samples, self.train_transform(normalize) if train else self.eval_transform(normalize),
                            loader=self.sample_loader(), train=train,
                            synthetic_anomaly=self.synthetic_anomaly if train else None,
                            regions=self.spro_regions() if regions and not train else None,
                            source_truth=source_truth and not train)
        if ds.cacheable:
            ds.cached = self.image_cache.entry(ds, self.image_size, self.num_workers, self.resize)
        elif self.image_cache.mode != "off":
            self.image_cache.events.append("skip")
        return ds

    def make_dataloader(self, samples: Sequence[Sample], train: bool = False, shuffle: bool = False,
                        batch_size: int | None = None, regions: bool = False,
                        source_truth: bool = False) -> DataLoader:
        """A DataLoader over any samples (e.g. training normals with the eval transform)."""
        return self._loader(self.make_dataset(samples, train=train, regions=regions, source_truth=source_truth), shuffle,
                            batch_size or (self.batch_size if train else self.eval_batch_size))

    def _loader(self, dataset, shuffle: bool, batch_size: int, sampler=None, num_workers: int | None = None) -> DataLoader:
        from adtrain.data.sampling import EpochShard, EpochShuffle, loader_generator, next_epoch

        workers = self.num_workers if num_workers is None else int(num_workers)
        if shuffle and sampler is None:
            # (seed, epoch) alone choose the order and each item's draws: not the global RNG nor a
            # worker's (adtrain.data.sampling); under DDP each rank takes its shard of that order
            world, epoch = distributed.world_size(), next_epoch(self.trainer)
            sampler = EpochShuffle(len(dataset), self.seed, epoch) if world == 1 else \
                EpochShard(len(dataset), self.seed, distributed.rank(), world, epoch)
            shuffle = False
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=False,
                          num_workers=workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=workers > 0, generator=loader_generator(self.seed),
                          collate_fn=collate if getattr(dataset, "source_truth", False) else None)

    #: False for training-free methods (set by adtrain.engine): their one pass sees the samples in
    #: index order, so a DDP run's gathered memory is the single-process one (adtrain.distributed)
    shuffle_train: bool = True

    def train_dataloader(self) -> DataLoader:
        if self.shuffle_train or distributed.world_size() == 1:
            return self.make_dataloader(self.train_samples, train=True, shuffle=self.shuffle_train)
        from torch.utils.data import DistributedSampler  # Lightning's own would shuffle a training set

        dataset = self.make_dataset(self.train_samples, train=True)
        return self._loader(dataset, False, self.batch_size, sampler=DistributedSampler(dataset, shuffle=False))

    def validation_dataset(self):
        """Held-out normals + synthetic anomalies made from them (``data.val_anomalies``): one dataset
        per held-out split, so anomalies made for one pass are not made again for the next."""
        from adtrain.data.validation import ValidationDataset

        key = (tuple((s.category, str(s.path)) for s in self.val_samples), self.seed, self.image_size,
               self.center_crop, self.resize, self.device_normalize)
        if self._val_dataset is None or self._val_dataset[0] != key:
            items = self.val_anomalies.plan(self.val_samples, self.seed)
            self._val_dataset = (key, ValidationDataset(self.make_dataset(self.val_samples, train=False), items,
                                                        self.val_anomalies, self.seed))
        return self._val_dataset[1]

    def val_dataloader(self) -> DataLoader:
        """The validation set: held-out training normals and their synthetic anomalies (eval transform).
        Its items are made once, here (``ValidationDataset.hold``), and every pass reads them from
        memory without loader workers; a set over ``data.val_anomalies.cache_mb`` keeps the anomalies
        alone (made once, inherited by the workers) or, past that too, makes them in the workers."""
        dataset = self.validation_dataset()
        t0 = time.perf_counter()
        held = dataset.hold()
        self.val_prep_seconds += time.perf_counter() - t0
        return self._loader(dataset, False, self.eval_batch_size, num_workers=0 if held else None)

    def val_normal_dataloader(self) -> DataLoader:
        """Held-out training normals only (eval transform): thresholds and score normalisation."""
        return self.make_dataloader(self.val_samples, train=False)

    #: the test's items carry their ground-truth regions (``spro_regions``; set by adtrain.engine while a
    #: test computes AU-sPRO)
    test_regions: bool = False
    #: the test's items carry their ground truth at the image's own size (metrics.resolution=source;
    #: set by adtrain.engine while such a test runs)
    test_source_truth: bool = False

    def test_dataloader(self) -> DataLoader:
        return self.make_dataloader(self.test_samples, train=False, regions=self.test_regions,
                                    source_truth=self.test_source_truth)

    def predict_dataset(self, paths) -> PredictDataset:
        """Images only ({'image', 'path'}) with the eval transform (normalised float32, for callers
        outside a trainer); paths: list, folder or glob."""
        if isinstance(paths, (str, Path)):
            paths = expand_image_paths(paths)
        return PredictDataset(list(paths), self.eval_transform(), self.bit_depth)
