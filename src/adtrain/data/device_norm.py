"""Normalisation on the device (``data.device_normalize``): the workers hand over uint8 images.

With ``data.device_normalize=auto`` (default) a dataset's transform stops after resize / crop (and
augmentation): the image leaves the DataLoader as uint8 (B,3,H,W), a quarter of the float32 bytes
through the worker queues, pinned memory and the host-to-device copy (non-blocking), and is
normalised on the model's device once per batch (``AnomalyModule.on_after_batch_transfer`` for
the Lightning loops, ``AnomalyModule.model_input`` for the methods' own passes). Training sets with
``data.augment`` keep the float path (albumentations runs on the CPU after its own normalisation
order). ``off``: every set is normalised by the workers, as before.

Bit-identical by construction: albumentations' ``Normalize`` maps a uint8 image through a
per-channel look-up table (albucore ``normalize_lut``: ``(v - mean*255) * 1/(std*255)`` in
float32 for v = 0..255). ``DeviceNormalize`` takes that table from ``A.Normalize`` itself (one
call on a ramp of the 256 values) and indexes it on the device (on a CPU with OpenCV's ``LUT``,
the very call albumentations makes), so each pixel gets the very float32 the CPU transform gave
(tests/test_device_norm.py), on any device and any albumentations version. A float batch is taken as already normalised and passed through unchanged.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch


MODES = ("auto", "off")


def device_norm_mode(value) -> str:
    """``data.device_normalize``: auto | off (YAML reads a bare off as false)."""
    from adtrain.cache_files import parse_mode

    return parse_mode(value, "data.device_normalize", MODES, "auto")


def normalize_lut(mean, std) -> torch.Tensor:
    """(C, 256) float32: what albumentations' Normalize makes of each uint8 value, per channel."""
    import albumentations as A

    channels = len(mean)
    ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(256, 1, 1), channels, axis=2)
    out = A.Normalize(mean=mean, std=std, max_pixel_value=255.0, p=1.0)(image=ramp)["image"]
    return torch.from_numpy(np.ascontiguousarray(np.asarray(out, dtype=np.float32)[:, 0, :].T))


class DeviceNormalize:
    """uint8 (..., C, H, W) on any device -> float32 normalised exactly as the CPU transform did."""

    def __init__(self, mean, std):
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.lut = normalize_lut(self.mean, self.std)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"DeviceNormalize(mean={self.mean}, std={self.std})"

    def __getstate__(self):
        return {**self.__dict__, "_on": {}}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            c = self.lut.shape[0]
            offsets = (torch.arange(c, dtype=torch.int32) * 256).view(c, 1, 1)
            self._on[device] = (self.lut.reshape(-1).to(device), offsets.to(device))
        return self._on[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        if images.ndim < 3 or images.shape[-3] != self.lut.shape[0]:
            raise ValueError(f"DeviceNormalize: expected uint8 (..., {self.lut.shape[0]}, H, W), "
                             f"got {tuple(images.shape)}")
        # on a CPU OpenCV's LUT, as albumentations (5x torch's gather there); elsewhere one gather
        return self._cpu(images) if images.device.type == "cpu" else self._gather(images)

    def _gather(self, images: torch.Tensor) -> torch.Tensor:
        flat, offsets = self._tables(images.device)
        index = images.to(torch.int32).add_(offsets)  # value + 256 * channel
        # one gather on the device: the table's float32, bit for bit
        return torch.index_select(flat, 0, index.reshape(-1)).view(images.shape)

    def _cpu(self, images: torch.Tensor) -> torch.Tensor:
        import cv2

        a = images.detach().contiguous().numpy()
        out = np.empty(a.shape, np.float32)
        if not a.size:
            return torch.from_numpy(out)
        lut = self.lut.numpy()
        for c in range(a.shape[-3]):
            plane = np.ascontiguousarray(a[..., c, :, :])
            out[..., c, :, :] = cv2.LUT(plane.reshape(-1, a.shape[-1]), lut[c]).reshape(plane.shape)
        return torch.from_numpy(out)


@lru_cache(maxsize=8)
def device_normalizer(mean=None, std=None) -> DeviceNormalize:
    """The (shared) normaliser of these statistics; ImageNet's by default."""
    from adtrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    return DeviceNormalize(IMAGENET_MEAN if mean is None else tuple(mean), IMAGENET_STD if std is None else tuple(std))


def normalize_batch(batch: Any, norm: DeviceNormalize) -> Any:
    """A batch (dict with ``image``, or an image tensor) with a uint8 image normalised where it lies."""
    if isinstance(batch, torch.Tensor):
        return norm(batch)
    if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor) and batch["image"].dtype == torch.uint8:
        return {**batch, "image": norm(batch["image"])}
    return batch
