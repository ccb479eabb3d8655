"""Anomaly maps as files, in the layout a benchmark's evaluation server takes (MVTec AD 2's private
test sets, whose labels are not released): for each image, at the image's own size,

    OUT/anomaly_images/<relative path>.tiff               raw anomaly map, float16, one channel
    OUT/anomaly_images_thresholded/<relative path>.png    decision mask: 255 where the raw map is
                                                           above the pixel threshold, else 0

The pixel threshold is fitted with the image threshold, on held-out normals: the same quantile
(threshold.quantile) of their maps' maxima (results.json ``pixel_threshold``), so a pixel is
flagged where it scores above what 99 % of normal images' maps reach anywhere. No test image or
label chooses it. ``adtrain.predict ... anomaly_maps=true relative_to=ROOT`` writes them, named after each
image's path below ROOT (MVTec AD 2: ``can/test_private/000_regular``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adtrain.errors import AdtrainError, DataError
from adtrain.inference.graph import Preprocessing
from adtrain.metrics.source_resolution import maps_to_source

#: the two folders, in the server's names
MAP_FOLDERS = ("anomaly_images", "anomaly_images_thresholded")
#: the largest finite float16
FLOAT16_MAX = float(np.finfo(np.float16).max)


def to_source_size(raw: np.ndarray, pre: Preprocessing, source_hw: tuple[int, int]) -> np.ndarray:
    """A raw map at the model's input size -> the source image's (H, W): a centre-cropped map goes
    back to its place in the resized frame (the border the crop cut off at the map's lowest value),
    and the frame is resized bilinearly to the source's size (every ``data.resize`` rule stretches
    the image to the run's size, so this undoes it). The test's ``metrics.resolution=source`` takes
    its pixel metrics on the same maps (adtrain.metrics.source_resolution)."""
    maps = torch.from_numpy(np.ascontiguousarray(raw, np.float32))[None]
    return maps_to_source(maps, pre.image_size, pre.center_crop, source_hw)[0].numpy()


def relative_names(files: list[str], relative_to: str | Path | None) -> list[Path]:
    """Each image's path below ``relative_to`` (default: the parent of the images' common folder),
    without its suffix; an image outside ``relative_to`` -> DataError naming it."""
    resolved = [Path(os.path.abspath(f)) for f in files]  # not resolve(): a linked file keeps its place
    if relative_to is None:
        parents = [str(p.parent) for p in resolved]
        common = Path(os.path.commonpath(parents))
        relative_to = common.parent if len(set(parents)) == 1 else common
    base = Path(os.path.abspath(relative_to))
    names, taken = [], {}
    for f, p in zip(files, resolved):
        try:
            name = p.relative_to(base).with_suffix("")
        except ValueError:
            raise DataError(f, f"is not below relative_to={relative_to}") from None
        if name in taken:  # the layout names a map by the image's path without its suffix
            raise DataError(f, f"its anomaly map would overwrite that of {taken[name]} (both {name}.tiff): the "
                            "map files are named without the image's suffix; score such images in separate calls")
        taken[name] = f
        names.append(name)
    return names


def write_map_files(out_dir: Path, name: Path, raw: np.ndarray, threshold: float) -> tuple[Path, Path]:
    """The two files of one image (raw: its map at the source's size); each written atomically."""
    tiff = out_dir / MAP_FOLDERS[0] / name.parent / f"{name.name}.tiff"
    png = out_dir / MAP_FOLDERS[1] / name.parent / f"{name.name}.png"
    peak = float(np.abs(raw).max()) if raw.size else 0.0
    if not np.isfinite(peak) or peak > FLOAT16_MAX:
        raise AdtrainError(f"{tiff}: the anomaly map reaches {peak:.4g}, beyond float16 (the format's type, "
                           f"largest {FLOAT16_MAX:g}); this method's raw scores do not fit it")
    import tifffile

    for path in (tiff, png):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tiff.with_name(f".{tiff.name}.tmp")
    tifffile.imwrite(tmp, raw.astype(np.float16))
    os.replace(tmp, tiff)
    tmp = png.with_name(f".{png.name}.tmp")
    Image.fromarray(np.where(raw > threshold, 255, 0).astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, png)
    return tiff, png
