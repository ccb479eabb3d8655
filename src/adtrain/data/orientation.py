"""EXIF orientation: a camera or phone that stores its pixels sideways writes tag 0x0112 and every
viewer and labelling tool shows the image turned upright; masks are drawn on that upright image.
adtrain turns images and masks the same way (``image_io.read_image``, ``image_io.mask_values``), and
``file_checks.header_size`` reports the upright size, so training, the image cache, predict and the
exports all see what the user sees, and a mask drawn on the upright image fits it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112


def orientation(im: Image.Image) -> int:
    """The image's EXIF orientation, 1-8 (1: stored upright; a missing, unknown or unreadable tag is 1).
    Read from what the header holds, without decoding the pixels (Pillow's PNG reader would decode
    the whole image to look for an eXIf chunk after the pixel data), so a header and a decoded image
    of the same file always agree."""
    try:
        value = Image.Image.getexif(im).get(ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block: the pixels are still good, read them as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def still_to_turn(im: Image.Image, before: int) -> int:
    """The turn left to apply to ``im`` once its pixels are decoded (``before``: ``orientation`` of the
    file as opened). Pillow's TIFF reader turns the pixels itself as it decodes them and drops the
    tag: nothing is left then; JPEG, PNG and WebP pixels come as stored."""
    return before if orientation(im) == before else 1


def shown_size(im: Image.Image) -> tuple[int, int]:
    """(W, H) as shown, from the header: orientations 5-8 turn the image a quarter, so width and
    height trade places (Pillow's TIFF reader, which turns the pixels itself, reports that size already)."""
    if orientation(im) >= 5 and im.format != "TIFF":
        return im.size[::-1]
    return im.size


def upright(arr: np.ndarray, value: int) -> np.ndarray:
    """(H,W[,C]) as stored -> as shown (what ``PIL.ImageOps.exif_transpose`` does, on any dtype)."""
    if value == 2:
        arr = arr[:, ::-1]
    elif value == 3:
        arr = arr[::-1, ::-1]
    elif value == 4:
        arr = arr[::-1]
    elif value == 5:
        arr = arr.swapaxes(0, 1)
    elif value == 6:
        arr = np.rot90(arr, -1)
    elif value == 7:
        arr = np.rot90(arr, 2).swapaxes(0, 1)
    elif value == 8:
        arr = np.rot90(arr, 1)
    else:
        return arr
    return np.ascontiguousarray(arr)
