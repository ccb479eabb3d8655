"""What `Detector.predict` accepts as images, as RGB uint8 (H,W,3) arrays."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adtrain.errors import DataError

if TYPE_CHECKING:
    from adtrain.data.image_io import BitDepth


def _from_array(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise DataError(where, f"image arrays must be uint8 (0-255), got {arr.dtype}")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return np.ascontiguousarray(arr[:, :, :3])
    if arr.ndim == 3 and arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    raise DataError(where, f"expected an (H,W), (H,W,3) or (H,W,4) image, got shape {arr.shape}")


def as_rgb(image: Any, where: str, bit_depth: BitDepth = None) -> np.ndarray:
    """A path, PIL image or uint8 array -> RGB uint8 (H,W,3) (16-bit files and PIL images read as
    ``bit_depth``-bit values: adtrain.data.image_io.image_to_rgb; a PIL image of a 16-bit colour
    file from its file, as Pillow keeps 8 bits of it); DataError naming it otherwise."""
    from PIL import Image

    from adtrain.data.image_io import _READ_ERRORS, _wide_colour, image_to_rgb, read_error, read_image

    if isinstance(image, (str, Path)):
        return read_image(image, bit_depth)
    if isinstance(image, Image.Image):
        if _wide_colour(image):  # Pillow holds a 16-bit colour file's high bytes alone: read its file
            path = getattr(image, "filename", "")
            if not path or not Path(path).is_file():
                raise DataError(where, "a PIL image of a 16-bit colour file, whose 8-bit copy Pillow holds (each "
                                "value's high byte): give its path instead, so its 16 bits are read")
            return read_image(path, bit_depth)
        try:  # a lazily opened file is decoded here: a truncated one raises
            rgb = image_to_rgb(image, bit_depth)
        except _READ_ERRORS as e:
            raise read_error(where, e) from None
    elif isinstance(image, np.ndarray):
        rgb = _from_array(image, where)
    else:
        raise DataError(where, f"not an image: give a path, a PIL image or a uint8 array, got {type(image).__name__}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:  # it would be scored as a blank image of the run's size
        raise DataError(where, f"empty image ({rgb.shape[1]}x{rgb.shape[0]} pixels)")
    return rgb


def image_list(images: Any) -> tuple[list[Any], list[str]]:
    """(items, names) from one image, a list of them, or an (N,H,W,C) uint8 batch array (a 2-D or 3-D
    array is one image, grey (H,W) or colour (H,W,3), never a batch)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    names = [str(x) if isinstance(x, (str, Path)) else f"images[{i}]" for i, x in enumerate(items)]
    return items, names
