"""`Detector`: score images in memory with a finished run's checkpoint or an export.

    from adtrain import Detector
    det = Detector.load("RUN/checkpoints/model.ckpt")        # or RUN/export/model.onnx / .pt / .xml
    pred = det.predict(["a.png", pil_image, uint8_array])   # paths, PIL images, uint8 arrays
    pred.scores, pred.maps, pred.decisions                   # (N,), (N,h,w) in [0,1], (N,) bool

A checkpoint is preprocessed by the run's own eval transform and scored by the method
(`AnomalyModule.predict_step`, what `trainer.predict` returns too); an export is fed uint8 images
resized as that transform resizes them (the rule recorded in its metadata, ``data.resize``), and
does the rest inside its graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from adtrain.data.dataset import WorkerDataError
from adtrain.errors import ConfigError, DataError
from adtrain.inference.graph import OUTPUTS, Preprocessing
from adtrain.inference.images import as_rgb, image_list

if TYPE_CHECKING:
    from adtrain.data.image_io import BitDepth


def resolve_device(device: str, key: str = "device", available: bool = True) -> torch.device:
    """'auto' | 'cpu' | 'cuda[:i]' -> a torch.device; ConfigError(key) when unusable. available=False
    checks the name only (a checkpoint made with cuda still loads on a CPU machine)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(key, f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(key, f"unsupported device {device!r}; use auto, cpu or cuda")
    if available and dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, f"{device} asked for, but no CUDA GPU is visible; use {key}=cpu or auto")
    return dev


@dataclass
class Prediction:
    """Per image: raw score, normalised score (0.5 = threshold), display map in [0,1] and decision."""

    scores: np.ndarray
    normalized_scores: np.ndarray
    maps: np.ndarray
    decisions: np.ndarray
    names: list[str] = field(default_factory=list)
    #: the images as the model saw them, (N,h,w,3) uint8 (only from `Detector.predict_batches`)
    inputs: np.ndarray | None = None
    #: each image's decision threshold (N,): a continual checkpoint's routed task's; None = the detector's
    thresholds: np.ndarray | None = None
    #: the model's own maps (N,h,w), before display normalisation, and each image's pixel decision
    #: threshold (N,) (a one-task checkpoint's; exports and routed models: None)
    raw_maps: np.ndarray | None = None
    pixel_thresholds: np.ndarray | None = None
    #: (name, error) of the batch's images that could not be read (``predict_batches(skip_unreadable=True)``)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def concat(cls, parts: list["Prediction"]) -> "Prediction":
        if not parts:
            raise DataError("images", "no images given")
        cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("scores", "normalized_scores", "maps", "decisions")}
        for key in ("thresholds", "raw_maps", "pixel_thresholds"):
            if all(getattr(p, key) is not None for p in parts):
                cat[key] = np.concatenate([getattr(p, key) for p in parts])
        return cls(**cat, names=[n for p in parts for n in p.names])


class _Items(Dataset):
    """Images (paths, PIL, arrays) -> {'image': transform(rgb), 'display': uint8 input, 'index'}."""

    def __init__(self, items: list, names: list[str], transform, display, skip_unreadable: bool = False,
                 bit_depth: BitDepth = None):
        self.items, self.names, self.transform, self.display = items, names, transform, display
        self.skip_unreadable, self.bit_depth = skip_unreadable, bit_depth

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        try:
            rgb = as_rgb(self.items[i], self.names[i], self.bit_depth)
        except DataError as e:
            if self.skip_unreadable:
                return {"error": str(e).removeprefix(f"{e.path}: "), "index": i}
            if get_worker_info() is not None:
                raise WorkerDataError(e.path, str(e).removeprefix(f"{e.path}: ")) from e
            raise
        image = self.transform(image=rgb)["image"]
        return {"image": image, "display": self.display(image), "index": i}


def _collate(batch: list[dict]) -> dict:
    read = [b for b in batch if "error" not in b]
    return {"image": [b["image"] for b in read],
            "display": np.stack([b["display"] for b in read]) if read else None,
            "index": [b["index"] for b in read], "skipped": [(b["index"], b["error"]) for b in batch if "error" in b]}


class Detector:
    """A trained detector (checkpoint or export); `predict` scores images, batched."""

    def __init__(self, source: Path, kind: str, pre: Preprocessing, threshold: float, device: torch.device,
                 batch_size: int, score, transform, display, max_batch: int | None = None, method=None):
        self.source, self.kind, self.pre, self.threshold = source, kind, pre, threshold
        self.device, self.batch_size, self.max_batch = device, batch_size, max_batch
        self.method = method  # the LightningModule for a checkpoint, else None
        #: the map level its display maps put at 0.5 where it is the pixel threshold, else None (the image threshold)
        self.map_threshold: float | None = None
        self._score, self._transform, self._display = score, transform, display

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str = "auto", batch_size: int = 16) -> "Detector":
        """A finished run's checkpoint (model.ckpt, read with weights_only) or an adtrain export."""
        from adtrain.export.formats import export_format

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", f"must be a whole number >= 1, got {batch_size!r}")
        dev = resolve_device(device)
        path = Path(path)
        if path.is_file() and export_format(path) is not None:
            found = cls._from_export(path, dev, batch_size)
        else:
            found = cls._from_checkpoint(path, dev, batch_size)
        if not np.isfinite(found.threshold):  # best.ckpt / last.ckpt, or val_split=0: every image was decided
            from adtrain.inference.graph import NO_THRESHOLD  # normal, without a word (the CLI refused already)

            raise DataError(path, NO_THRESHOLD)
        return found

    @classmethod
    def _from_checkpoint(cls, path: Path, dev: torch.device, batch_size: int) -> "Detector":
        from adtrain.loading import load_method
        from adtrain.inference.graph import run_preprocessing
        from adtrain.viz import denormalize

        method, cfg, _ = load_method(path)
        method.to(dev)
        pre, transform = run_preprocessing(cfg)

        def score(images: list) -> dict:
            res = method.predict_step(torch.stack(images).float().to(dev))
            return {k: v.numpy() for k, v in res.items()}

        found = cls(path, "checkpoint", pre, float(method.threshold), dev, batch_size, score, transform,
                    lambda t: denormalize(t, pre.mean, pre.std), method=method)
        found.map_threshold = method.map_threshold()
        return found

    @classmethod
    def _from_export(cls, path: Path, dev: torch.device, batch_size: int) -> "Detector":
        import albumentations as A

        from adtrain.data.resize import ImageResize
        from adtrain.export.formats import open_export

        meta, run = open_export(path, str(dev))
        pre = Preprocessing.from_dict(meta["preprocessing"])
        resize = A.Compose([ImageResize(*pre.image_size, pre.resize)])
        nchw = meta.get("layout") == "nchw"

        def score(images: list) -> dict:
            batch = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2) if nchw else np.stack(images))
            return run(batch)

        def display(image: np.ndarray) -> np.ndarray:
            if pre.center_crop is None:
                return image
            (h, w), (ch, cw) = pre.image_size, pre.center_crop
            return image[(h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]

        found = cls(path, meta["format"], pre, float(meta["threshold"]), dev, batch_size, score, resize, display,
                    max_batch=meta.get("max_batch"))
        found.map_threshold = meta.get("map_threshold")  # None: an export made before its maps took the pixel threshold
        return found

    # ------------------------------------------------------------------ scoring
    def predict_batches(self, images: Any, batch_size: int | None = None, num_workers: int = 0,
                        skip_unreadable: bool = False) -> Iterator[Prediction]:
        """`predict`, one batch at a time, each with the images as the model saw them (``inputs``).
        An image that cannot be read raises DataError naming it; with ``skip_unreadable`` it is left
        out of its batch instead and listed in that batch's ``skipped`` (name, error)."""
        items, names = image_list(images)
        size = batch_size or self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError("batch_size", f"must be a whole number >= 1, got {size!r}")
        size = min(size, self.max_batch or size)
        loader = DataLoader(_Items(items, names, self._transform, self._display, skip_unreadable, self.pre.bit_depth),
                            batch_size=size, num_workers=num_workers, collate_fn=_collate)
        for batch in loader:
            skipped = [(names[i], error) for i, error in batch["skipped"]]
            if not batch["image"]:  # every image of this batch unreadable
                empty = np.zeros(0, np.float32)
                yield Prediction(scores=empty, normalized_scores=empty, maps=np.zeros((0, 0, 0), np.float32),
                                 decisions=np.zeros(0, bool), skipped=skipped)
                continue
            out = self._score(batch["image"])
            yield Prediction(scores=out["score"].astype(np.float32),
                             normalized_scores=out["normalized_score"].astype(np.float32),
                             maps=out["map"].astype(np.float32), decisions=out["decision"].astype(bool),
                             names=[names[i] for i in batch["index"]], inputs=batch["display"],
                             thresholds=out["threshold"].astype(np.float32) if "threshold" in out else None,
                             raw_maps=out["raw_map"].astype(np.float32) if "raw_map" in out else None,
                             pixel_thresholds=out["pixel_threshold"].astype(np.float64)
                             if "pixel_threshold" in out else None, skipped=skipped)

    def predict(self, images: Any, batch_size: int | None = None) -> Prediction:
        """Scores, maps and decisions of one image or a list (paths, PIL images, uint8 arrays) or an
        (N,H,W,3) uint8 array, as numpy arrays in input order."""
        parts = list(self.predict_batches(images, batch_size))
        for p in parts:
            p.inputs = None
        return Prediction.concat(parts)

    def __repr__(self) -> str:
        return (f"Detector({self.kind}: {self.source}, input {list(self.pre.input_size)}, "
                f"threshold {self.threshold:.4g}, {self.device})")


__all__ = ["Detector", "Prediction", "OUTPUTS", "resolve_device"]
