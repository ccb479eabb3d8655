"""Reading images and masks: every image becomes RGB uint8 (H,W,3), every mask {0,1} uint8 (H,W)."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from adtrain.data.image_files import (IMAGE_EXTENSIONS, check_name, expand_image_paths,  # noqa: F401
                                      find_file, is_image_file, list_images)
from adtrain.data.orientation import orientation, still_to_turn, upright
from adtrain.errors import ConfigError, DataError

_READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


class ValueRangeError(ValueError):
    """Decoded, but its values cannot be read as brightness (a float image beyond 0..255)."""


def read_error(where: str | Path, err: BaseException) -> DataError:
    """The DataError for a file or image that could not be read: a decoder's own error by type and
    message, adtrain's ValueRangeError by its message alone."""
    why = str(err) if isinstance(err, ValueRangeError) else f"{type(err).__name__}: {err}"
    if isinstance(err, Image.DecompressionBombError):  # a large line-scan frame: say what can be done
        why = (f"{why} (Pillow's guard against decompression bombs; an image this large is better cut into "
               "tiles; a script that trusts its files may raise PIL.Image.MAX_IMAGE_PIXELS)")
    return DataError(where, f"cannot read image: {why}")


def _open(path: str | Path) -> Image.Image:
    """The file opened, its header read (not yet its pixels: ``_load``). A TIFF turned a quarter
    (EXIF orientation 5-8) is opened from its bytes: opened by name, Pillow memory-maps an
    uncompressed one at the turned size and scrambles its pixels."""
    try:
        im = Image.open(path)
        if im.format == "TIFF" and orientation(im) >= 5:
            data = Path(path).read_bytes()
            im.close()
            im = Image.open(io.BytesIO(data))
        return im
    except FileNotFoundError:
        raise DataError(path, "cannot read image: file not found") from None
    except _READ_ERRORS as e:
        raise read_error(path, e) from None


def _load(im: Image.Image, path: str | Path) -> Image.Image:
    """The pixels decoded; a truncated or corrupt file raises DataError naming it."""
    try:
        im.load()
        return im
    except _READ_ERRORS as e:
        raise read_error(path, e) from None


#: ``data.bit_depth``: None (a 16-bit image's full range), the bits its values use, or the (low, high)
#: range of values read as 0-255 (any image wider than 8 bits: 16-bit, 32-bit integer, float)
BitDepth = Union[int, tuple[float, float], None]


def check_bit_depth(bit_depth, key: str = "data.bit_depth") -> BitDepth:
    """None (a 16-bit file's full 0-65535 range), the bits its values use, 8-16 (a 12-bit camera's
    0-4095 stored in a 16-bit PNG or TIFF: bit_depth=12), or [low, high]: the values of an image wider
    than 8 bits from low to high read as 0-255, those outside clipped (an X-ray's window of its 16-bit
    values, a thermal camera's float kelvin: [290, 310])."""
    if bit_depth is None:
        return None
    if isinstance(bit_depth, (list, tuple)):
        if len(bit_depth) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                                       for v in bit_depth) and bit_depth[0] < bit_depth[1]:
            return float(bit_depth[0]), float(bit_depth[1])
        raise ConfigError(key, f"as a range must be [low, high], two numbers with low < high (the values read as "
                          f"black and white), got {list(bit_depth)!r}")
    if isinstance(bit_depth, bool) or not isinstance(bit_depth, int) or not 8 <= bit_depth <= 16:
        raise ConfigError(key, f"must be null (16-bit files use their full range), a whole number of bits from 8 "
                          f"to 16 (e.g. 12 for a 12-bit camera's images in 16-bit files) or a range [low, high] "
                          f"of values read as 0-255, got {bit_depth!r}")
    return bit_depth


def _to_uint8(arr: np.ndarray, mode: str, bit_depth: BitDepth = None) -> np.ndarray:
    """Scale a high bit depth or float single-channel array to uint8: with a (low, high) range, every
    value over low..high, those outside clipped; else 16-bit values over 0..2**bit_depth - 1
    (bit_depth None: 16), larger values clipped; float values over 0..1 when none exceeds 1, else over
    0..255, and a ValueRangeError (read_image: a DataError naming the file) when any lies outside
    0..255, rather than a clipped image."""
    if arr.dtype == np.uint8:
        return arr
    if isinstance(bit_depth, tuple):
        low, high = bit_depth
        a = np.nan_to_num(arr.astype(np.float64), nan=low)
        return np.round((np.clip(a, low, high) - low) * (255.0 / (high - low))).astype(np.uint8)
    top = float(2 ** (bit_depth or 16) - 1)
    if mode.startswith("I;16") or arr.dtype in (np.uint16, np.int16):  # I;16S: negative values are 0
        return np.round(np.clip(arr.astype(np.float64), 0, top) * (255.0 / top)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        a = np.nan_to_num(arr.astype(np.float64))
        low, high = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if low < 0.0 or high > 255.0:  # clipped, a thermal frame in kelvin would read all white
            raise ValueRangeError(f"a 32-bit float image with values from {low:.6g} to {high:.6g}: float images are "
                             "read as brightness from 0 to 1 (or 0 to 255), not clipped to it; a run reads them "
                             "with data.bit_depth=[low, high] (the values read as black and white, one range for "
                             "the whole dataset), and its model, predict and exports then read them so too")
        if high <= 1.0:
            a = a * 255.0
        return np.clip(np.round(a), 0, 255).astype(np.uint8)
    # 32-bit integer ("I"): Pillow uses it for 16-bit data in some formats and versions (16-bit grey
    # PNGs before Pillow 11). Read as 16-bit values whatever this image holds: a dark frame whose
    # values all lie below 256 is scaled as a bright one of the same camera is, not read as 8-bit.
    return np.round(np.clip(arr.astype(np.float64), 0, top) * (255.0 / top)).astype(np.uint8)


def image_to_rgb(im: Image.Image, bit_depth: BitDepth = None, turn: int | None = None) -> np.ndarray:
    """A PIL image of any mode -> RGB uint8 (H,W,3), upright (its EXIF orientation applied:
    adtrain.data.orientation; ``turn`` None: read from ``im``); alpha is dropped. A 16-bit (or 32-bit
    integer, or float) image's values are read by ``bit_depth`` (``check_bit_depth``); 8-bit images are
    as they are."""
    if turn is None:  # a PIL image given as it is (adtrain.Detector)
        before = orientation(im)
        im.load()
        turn = still_to_turn(im, before)
    mode = im.mode
    if mode == "RGB":
        arr = np.asarray(im)
    elif mode in ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA", "1"):
        arr = np.asarray(im.convert("RGB"))
    elif mode in ("L", "LA", "La"):
        arr = np.asarray(im.getchannel(0))
    else:  # I;16*, I, F: single channel with a wider range
        arr = _to_uint8(np.asarray(im), mode, bit_depth)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    arr = upright(arr, turn)
    # writable: np.asarray of a PIL image is read-only, and torch warns when such an array (an image
    # already at the run's size passes the resize untouched) becomes a tensor
    return np.require(arr, np.uint8, ("C", "W"))


def is_wide(im: Image.Image) -> bool:
    """Are an opened image's values wider than 8 bits (16-bit, 32-bit integer, float; grey or colour)?
    From its header: what ``data.bit_depth`` applies to."""
    return im.mode.startswith(("I", "F")) or _wide_colour(im)


def _wide_colour(im: Image.Image) -> bool:
    """A colour file of 16 bits per channel (PNG, TIFF): Pillow decodes it as 8-bit RGB(A), keeping
    each value's high byte, which would ignore ``bit_depth`` (a planar TIFF, one plane per channel,
    it reads as garbage: its BitsPerSample says what its planes' raw modes do not)."""
    if im.mode not in ("RGB", "RGBA"):
        return False
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258)  # BitsPerSample
        if any(isinstance(b, int) and b > 8 for b in (bits if isinstance(bits, tuple) else (bits,))):
            return True
    for tile in getattr(im, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def _wide_rgb(path: str | Path, turn: int = 1, by_tifffile: bool = False) -> np.ndarray:
    """A 16-bit-per-channel colour file's RGB values (H,W,3) uint16, through OpenCV (which keeps the
    16 bits), upright (``turn``: its EXIF orientation); alpha dropped. ``by_tifffile``
    (``needs_tifffile``: a TIFF that must be turned, or is planar) with tifffile: OpenCV turns some
    turned TIFFs itself, fails on others, and reads a planar one's first plane as every channel."""
    if by_tifffile:
        return upright(_stored_tiff_rgb(path), turn)
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # a PNG's eXIf orientation is not applied
    if arr is None or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(path, "cannot read image: a 16-bit colour file that OpenCV cannot decode")
    return upright(np.ascontiguousarray(arr[:, :, 2::-1]), turn)  # BGR(A) -> RGB


def _stored_tiff_rgb(path: str | Path) -> np.ndarray:
    import tifffile

    try:
        arr = tifffile.imread(str(path), key=0)
    except Exception as e:  # tifffile raises its own types, and ValueError / KeyError for codecs it lacks
        if "imagecodecs" in str(e):
            raise DataError(path, "cannot read image: a 16-bit colour TIFF, turned (EXIF orientation) or "
                            f"planar, whose compression needs the imagecodecs package ({e}): pip install "
                            "imagecodecs, or save it uncompressed") from None
        raise read_error(path, e) from None
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):  # planar
        arr = np.moveaxis(arr, 0, 2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(path, f"cannot read image: a 16-bit colour TIFF of shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3])


def _planar(im: Image.Image) -> bool:
    """A TIFF stored one plane per channel (PlanarConfiguration 2)?"""
    return im.format == "TIFF" and getattr(im, "tag_v2", {}).get(284) == 2


def needs_tifffile(im: Image.Image) -> bool:
    """Is an opened file read with tifffile (``_wide_rgb``): a 16-bit colour TIFF turned by its
    EXIF orientation, or planar?"""
    return im.format == "TIFF" and _wide_colour(im) and (orientation(im) != 1 or _planar(im))


def _read_wide_colour(path: str | Path, bit_depth: BitDepth, turn: int, im: Image.Image) -> np.ndarray:
    """A 16-bit colour file scaled to uint8 as a 16-bit grey image is, upright."""
    arr = _wide_rgb(path, turn, needs_tifffile(im))
    return np.require(_to_uint8(arr, "RGB;16", bit_depth), np.uint8, ("C", "W"))


_SAID_PAGES: set[str] = set()


def _say_pages(im: Image.Image, path: str | Path) -> None:
    """A multi-page TIFF or an animated PNG/WebP/GIF: its first page is the image (said once per file
    and process, not left silent: a stack of lightings or focus planes is not one picture)."""
    try:
        pages = int(getattr(im, "n_frames", 1) or 1)
    except _READ_ERRORS:  # a damaged later page: the first is read (or refused) as before
        return
    if pages > 1 and str(path) not in _SAID_PAGES:
        _SAID_PAGES.add(str(path))
        logging.getLogger("adtrain").warning("%s holds %d pages (frames): only the first is read", path, pages)


def read_image(path: str | Path, bit_depth: BitDepth = None) -> np.ndarray:
    """Read any image as RGB uint8 (H,W,3) (``bit_depth``: image_to_rgb; 16-bit colour files too).
    Raises DataError(path, 'cannot read image: ...')."""
    with _open(path) as im:
        turn = orientation(im)  # from the header, as file_checks.header_size reads it
        _say_pages(im, path)
        if _wide_colour(im):
            return _read_wide_colour(path, bit_depth, turn, im)
        try:
            _load(im, path)
            return image_to_rgb(im, bit_depth, still_to_turn(im, turn))
        except _READ_ERRORS as e:
            raise read_error(path, e) from None


def mask_from_array(arr: np.ndarray) -> np.ndarray:
    """Any mask array -> {0,1} uint8 (H,W); a pixel > 0 in any colour channel is defect."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[:, :, : min(arr.shape[2], 3)].max(axis=2)
    return (arr > 0).astype(np.uint8)


def mask_files(mask_path: str | Path) -> list[Path]:
    """The files of a ground-truth mask: the file itself, or every image in a mask folder (MVTec
    LOCO keeps one file per defect region in ``ground_truth/<defect>/<stem>/``)."""
    p = Path(mask_path)
    if not p.is_dir():
        return [p]
    files = list_images(p)
    if not files:
        raise DataError(p, "mask folder holds no mask image")
    return files


def mask_values(path: str | Path) -> np.ndarray:
    """A mask or region file's values as stored, (H,W) or (H,W,3), upright as its image is read
    (its EXIF orientation applied): alpha dropped, palette indices kept, 16-bit colour files with
    their 16 bits (Pillow would keep each value's high byte: a defect drawn with value 1 would vanish)."""
    with _open(path) as im:
        turn = orientation(im)
        if _wide_colour(im):
            return _wide_rgb(path, turn, needs_tifffile(im))
        _load(im, path)
        return upright(_stored_values(im), still_to_turn(im, turn))


def _stored_values(im: Image.Image) -> np.ndarray:
    if im.mode in ("LA", "La", "PA"):
        return np.asarray(im.getchannel(0))
    if im.mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(im.convert("RGB"))
    if im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("L"))
    return np.asarray(im)


def read_mask(mask_path: str | Path, image_size: tuple[int, int] | None = None,
              image_path: str | Path | None = None) -> np.ndarray:
    """Read a ground-truth mask as {0,1} uint8 (H,W); >0 is defect. A folder of masks
    (``mask_files``) reads as their union.

    image_size is the image's (W, H); a mask of another size raises DataError(mask_path, ...).
    Palette masks use their indices (0 = background), as label PNGs do.
    """
    if Path(mask_path).is_dir():
        files = mask_files(mask_path)
        if image_size is None:
            image_size = read_mask(files[0]).shape[::-1]
        union = np.zeros(image_size[::-1], np.uint8)
        for f in files:
            union |= read_mask(f, image_size, image_path)
        return union
    mask = mask_from_array(mask_values(mask_path))
    if image_size is not None:
        w, h = image_size
        mh, mw = mask.shape
        if (mw, mh) != (w, h):
            what = f"image {image_path}" if image_path is not None else "image"
            raise DataError(mask_path, f"mask size {mw}x{mh} differs from {what} {w}x{h}")
    return mask
