"""Sample records, the torch Dataset that yields the batch contract, and the default file loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from adtrain.data.image_io import BitDepth, read_image, read_mask
from adtrain.data.regions import pack_regions
from adtrain.data.resize import resize_mask
from adtrain.data.sampling import Draw
from adtrain.errors import AdtrainError, DataError

# image uint8 (H,W,3), mask {0,1} uint8 (H,W) or None when no ground truth exists
Loaded = tuple[np.ndarray, "np.ndarray | None"]


@dataclass(frozen=True)
class Sample:
    """One image: label 0 normal / 1 anomalous; mask_path None when no ground-truth file."""

    path: str
    label: int
    mask_path: str | None
    category: str
    defect: str


def load_sample(sample: Sample, bit_depth: BitDepth = None) -> Loaded:
    """Default loader: image from sample.path, mask from sample.mask_path (size checked)."""
    image = read_image(sample.path, bit_depth)
    if sample.mask_path is None:
        return image, None
    mask = read_mask(sample.mask_path, (image.shape[1], image.shape[0]), image_path=sample.path)
    return image, mask


class BitDepthLoader:
    """``load_sample`` reading images wider than 8 bits by ``data.bit_depth`` (bits, or a [low, high]
    range); its repr enters the image cache's key, so images cached at another bit depth are not served."""

    def __init__(self, bit_depth: BitDepth):
        self.bit_depth = bit_depth  # as image_io.check_bit_depth returned it (the data module's)

    def __call__(self, sample: Sample) -> Loaded:
        return load_sample(sample, self.bit_depth)

    def __repr__(self) -> str:
        b = self.bit_depth
        return f"BitDepthLoader(bit_depth={list(b) if isinstance(b, tuple) else b})"


def reads_files(loader) -> bool:
    """Does this sample loader read the samples' files (load_sample, at any bit depth)?"""
    return loader is load_sample or isinstance(loader, BitDepthLoader)


def image_tensor(image) -> torch.Tensor:
    """The transform's image as the batch carries it: uint8 stays uint8 (normalised later, on the
    device: adtrain.data.device_norm), anything else float32 (already normalised)."""
    image = torch.as_tensor(image)
    return image.contiguous() if image.dtype == torch.uint8 else image.float()


class WorkerDataError(DataError):
    """A DataError that torch can rebuild from its message when it re-raises a worker's error."""

    def __init__(self, path, message: str | None = None):
        if message is None:  # rebuilt by the DataLoader from the worker's formatted traceback
            text = _worker_message(str(path))
            AdtrainError.__init__(self, text)
            self.path = text.split(": ", 1)[0] if ": " in text else "<DataLoader worker>"
        else:
            super().__init__(path, message)


def _worker_message(text: str) -> str:
    """The worker's own one-line message out of torch's 'Caught ... Original Traceback ...' text
    (its last line reads 'adtrain.data.dataset.WorkerDataError: PATH: what')."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines or "Traceback" not in text:
        return text
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.endswith("Error") and " " not in head else last


def _binarise(mask) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.dtype == np.bool_:
        return m.astype(np.uint8)
    if np.issubdtype(m.dtype, np.floating):
        return (m > 0.5).astype(np.uint8)
    return (m > (127 if m.size and m.max() > 1 else 0)).astype(np.uint8)


class AnomalyDataset(Dataset):
    """Samples -> batch-contract dicts (image, label, mask, has_mask, category, defect, path).

    train=True: augmentation and synthetic anomalies draw from a generator per item, seeded by the
    key's seed where the key is an `adtrain.data.sampling.Draw` (a function of seed, epoch and index:
    the same whatever the worker count or a resume), else from torch's RNG (the worker's, or the
    global one without workers).
    """

    def __init__(self, samples: Sequence[Sample], transform, loader: Callable[[Sample], Loaded] = load_sample,
                 train: bool = False, synthetic_anomaly: Callable | None = None, regions: Callable | None = None,
                 source_truth: bool = False):
        self.samples = list(samples)
        self.transform = transform
        self.loader = loader
        self.train = train
        self.synthetic_anomaly = synthetic_anomaly
        self.cached = None  # adtrain.data.image_cache.CachedImages: resized images decoded once
        #: Sample -> ground-truth regions with saturation fractions, or None (adtrain.data.regions):
        #: where set (a test set of MVTec LOCO AD), items carry spro_code and spro_fraction too
        self.regions = regions
        #: items carry the ground truth at the image's own size too (``source_mask``, and with
        #: regions ``source_spro_code`` in place of ``spro_code``): metrics.resolution=source
        self.source_truth = bool(source_truth)

    @property
    def cacheable(self) -> bool:
        """Synthetic training anomalies are drawn on the full-resolution image: those sets are not cached."""
        return not (self.train and self.synthetic_anomaly is not None)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, sample: Sample) -> Loaded:
        return self._guard(self.loader, sample)

    def _guard(self, read: Callable, sample: Sample):
        """read(sample), its DataError made one a DataLoader worker can hand back."""
        try:
            return read(sample)
        except DataError as e:
            if get_worker_info() is not None and not isinstance(e, WorkerDataError):
                raise WorkerDataError(e.path, str(e).removeprefix(f"{e.path}: ")) from e
            raise

    def __getitem__(self, key: int | Draw) -> dict:
        index, draw = (key.index, key.seed) if isinstance(key, Draw) else (key, None)
        sample = self.samples[index]
        label, defect = int(sample.label), sample.defect
        if self.cached is not None:  # already resized: the transform's Resize is then an identity
            image, mask, source, has = self.cached.get(index)
            has_mask = has or label == 0
            truth = self._source_mask(sample, source) if self.source_truth else None
        else:
            image, mask = self._load(sample)
            source = image.shape[:2]
            has_mask = mask is not None or label == 0
            mask = np.zeros(image.shape[:2], np.uint8) if mask is None else _binarise(mask)
            truth = mask
        if self.train:
            rng = np.random.default_rng(draw if draw is not None else int(torch.randint(0, 2**62, (1,)).item()))
            if self.synthetic_anomaly is not None:
                image, synth = self.synthetic_anomaly(image, rng)
                image = np.ascontiguousarray(image, dtype=np.uint8)
                synth = _binarise(synth)
                if synth.any():
                    mask = np.maximum(mask, synth)
                    label, defect, has_mask = 1, "synthetic", True
            if hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(int(rng.integers(0, 2**31 - 1)))
        source_size = torch.tensor(tuple(source), dtype=torch.int64)  # (h, w) before resizing: heatmaps' aspect
        regions = self._guard(self.regions, sample) if self.regions is not None else None
        at_source = self.source_truth and not self.train
        if regions and not at_source:  # each region through the same geometry as the mask (from the image's size: a cached one's)
            out = self.transform(image=image, mask=mask, masks=[m if m.shape == image.shape[:2] else
                                                               resize_mask(m, image.shape[:2]) for m, _ in regions])
        else:
            out = self.transform(image=image, mask=mask)
        item = {
            "image": image_tensor(out["image"]),
            "label": torch.tensor(label, dtype=torch.int64),
            "mask": (torch.as_tensor(out["mask"]) > 0.5).to(torch.uint8).unsqueeze(0),  # {0, 1}: 1/4 of float32
            "has_mask": torch.tensor(bool(has_mask)),
            "category": sample.category,
            "defect": defect,
            "path": sample.path,
            "source_size": source_size,
            "index": torch.tensor(index, dtype=torch.int64),  # the sample's place: DDP restores the order
        }
        if at_source:  # the ground truth as the files have it (metrics.resolution=source)
            item["source_mask"] = torch.from_numpy(np.ascontiguousarray(truth, np.uint8))
        if self.regions is not None and at_source:
            shape = tuple(source)
            packed = pack_regions([m if m.shape == shape else resize_mask(m, shape) for m, _ in regions or []],
                                  [f for _, f in regions or []], shape)
            item.update(source_spro_code=packed["spro_code"], spro_fraction=packed["spro_fraction"])
        elif self.regions is not None:
            item.update(pack_regions(out["masks"] if regions else [], [f for _, f in regions or []],
                                     tuple(item["mask"].shape[-2:])))
        return item

    def _source_mask(self, sample: Sample, source) -> np.ndarray:
        """A cached item's ground truth at the image's own (H, W), read from its file (the default
        loader) or from the dataset's own loader (which decodes the image too)."""
        height, width = (int(v) for v in source)
        if self.loader is not load_sample:  # e.g. drawn with the image (data=synthetic)
            mask = self._load(sample)[1]
        elif sample.mask_path is None:
            mask = None
        else:
            mask = self._guard(lambda s: read_mask(s.mask_path, (width, height), image_path=s.path), sample)
        return np.zeros((height, width), np.uint8) if mask is None else _binarise(mask)


#: batch keys whose tensors differ in size from image to image (the source's): kept as lists
SOURCE_KEYS = ("source_mask", "source_spro_code")


def collate(items: list[dict]) -> dict:
    """torch's default collation, with ``SOURCE_KEYS`` kept as lists of tensors."""
    batch = default_collate([{k: v for k, v in it.items() if k not in SOURCE_KEYS} for it in items])
    for key in SOURCE_KEYS:
        if key in items[0]:
            batch[key] = [it[key] for it in items]
    return batch


class PredictDataset(Dataset):
    """Images only (no labels): yields {'image', 'path'} with the eval transform."""

    def __init__(self, paths: Sequence[str | Path], transform, bit_depth: BitDepth = None):
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.bit_depth = bit_depth

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            image = read_image(path, self.bit_depth)
        except DataError as e:
            if get_worker_info() is not None:
                raise WorkerDataError(e.path, str(e).removeprefix(f"{e.path}: ")) from e
            raise
        return {"image": self.transform(image=image)["image"].float(), "path": path}
