"""Reading images and masks: every image becomes RGB uint8 (H,W,3), every mask {0,1} uint8 (H,W)."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from adtrain.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def check_name(path: Path) -> Path:
    """A path whose bytes are not UTF-8 (names from a zip made on Windows, e.g. Latin-1 'caf\\xe9.png')
    would fail later in a seed, a CSV or a JSON file: refused here, naming it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise DataError(shown, "file name is not valid UTF-8 (e.g. Latin-1 from an archive made on Windows): "
                        "rename it (convmv -f latin1 -t utf8 --notest -r FOLDER converts a tree)") from None
    return path


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in a folder, sorted by path (hidden files skipped; a name that is not UTF-8 refused)."""
    folder = Path(folder)
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(check_name(p) for p in it if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def expand_image_paths(spec: str | Path | list) -> list[Path]:
    """A folder, a glob pattern, a single file, or a list of these -> sorted image paths."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_image_paths(s)]
    p = Path(spec)
    if p.is_dir():
        return list_images(p, recursive=True)
    if p.is_file():
        return [p]
    hits = sorted(Path(h) for h in glob.glob(str(spec), recursive=True))
    hits = [h for h in hits if h.is_file() and is_image_file(h)]
    if not hits:
        raise DataError(spec, "no image files found (expected a folder, a glob pattern or an image file)")
    return hits


def _open(path: str | Path) -> Image.Image:
    """The file opened, its header read (not yet its pixels: ``_load``)."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DataError(path, "cannot read image: file not found") from None
    except _READ_ERRORS as e:
        raise DataError(path, f"cannot read image: {type(e).__name__}: {e}") from None


def _load(im: Image.Image, path: str | Path) -> Image.Image:
    """The pixels decoded; a truncated or corrupt file raises DataError naming it."""
    try:
        im.load()
        return im
    except _READ_ERRORS as e:
        raise DataError(path, f"cannot read image: {type(e).__name__}: {e}") from None


def check_bit_depth(bit_depth, key: str = "data.bit_depth") -> int | None:
    """None (a 16-bit file's full 0-65535 range) or the bits its values use, 8-16 (a 12-bit camera's
    0-4095 stored in a 16-bit PNG or TIFF: bit_depth=12)."""
    if bit_depth is None:
        return None
    if isinstance(bit_depth, bool) or not isinstance(bit_depth, int) or not 8 <= bit_depth <= 16:
        raise ConfigError(key, f"must be null (16-bit files use their full range) or a whole number of bits "
                          f"from 8 to 16 (e.g. 12 for a 12-bit camera's images in 16-bit files), got {bit_depth!r}")
    return bit_depth


def _to_uint8(arr: np.ndarray, mode: str, bit_depth: int | None = None) -> np.ndarray:
    """Scale a high bit depth or float single-channel array to uint8: 16-bit values over
    0..2**bit_depth - 1 (bit_depth None: 16), larger values clipped."""
    if arr.dtype == np.uint8:
        return arr
    top = float(2 ** (bit_depth or 16) - 1)
    if mode.startswith("I;16") or arr.dtype == np.uint16:
        return np.round(np.minimum(arr.astype(np.float64), top) * (255.0 / top)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float64)
        a = np.nan_to_num(a)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return np.clip(np.round(a), 0, 255).astype(np.uint8)
    # 32-bit integer ("I"): Pillow uses it for 16-bit data in some formats.
    a = arr.astype(np.int64)
    if bit_depth is not None or (a.size and a.max() > 255):
        return np.round(np.clip(a, 0, top) * (255.0 / top)).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def image_to_rgb(im: Image.Image, bit_depth: int | None = None) -> np.ndarray:
    """A PIL image of any mode -> RGB uint8 (H,W,3); alpha is dropped. A 16-bit (or 32-bit integer)
    image's values are read as ``bit_depth``-bit ones (``check_bit_depth``); 8-bit images are as they are."""
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
    # writable: np.asarray of a PIL image is read-only, and torch warns when such an array (an image
    # already at the run's size passes the resize untouched) becomes a tensor
    return np.require(arr, np.uint8, ("C", "W"))


def _wide_colour(im: Image.Image) -> bool:
    """A colour file of 16 bits per channel (PNG, TIFF): Pillow decodes it as 8-bit RGB(A), keeping
    each value's high byte, which would ignore ``bit_depth``."""
    if im.mode not in ("RGB", "RGBA"):
        return False
    for tile in getattr(im, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def _wide_rgb(path: str | Path) -> np.ndarray:
    """A 16-bit-per-channel colour file's RGB values (H,W,3) uint16, through OpenCV (which keeps the
    16 bits); alpha dropped."""
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(path, "cannot read image: a 16-bit colour file that OpenCV cannot decode")
    return np.ascontiguousarray(arr[:, :, 2::-1])  # BGR(A) -> RGB


def _read_wide_colour(path: str | Path, bit_depth: int | None) -> np.ndarray:
    """A 16-bit colour file scaled to uint8 as a 16-bit grey image is."""
    return np.require(_to_uint8(_wide_rgb(path), "RGB;16", bit_depth), np.uint8, ("C", "W"))


def read_image(path: str | Path, bit_depth: int | None = None) -> np.ndarray:
    """Read any image as RGB uint8 (H,W,3) (``bit_depth``: image_to_rgb; 16-bit colour files too).
    Raises DataError(path, 'cannot read image: ...')."""
    with _open(path) as im:
        if _wide_colour(im):
            return _read_wide_colour(path, bit_depth)
        try:
            return image_to_rgb(_load(im, path), bit_depth)
        except _READ_ERRORS as e:
            raise DataError(path, f"cannot read image: {type(e).__name__}: {e}") from None


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
    """A mask or region file's values as stored, (H,W) or (H,W,3): alpha dropped, palette indices
    kept, 16-bit colour files with their 16 bits (Pillow would keep each value's high byte: a defect
    drawn with value 1 would vanish)."""
    with _open(path) as im:
        if _wide_colour(im):
            return _wide_rgb(path)
        if _load(im, path).mode in ("LA", "La", "PA"):
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
