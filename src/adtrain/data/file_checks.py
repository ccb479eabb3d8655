"""Checks of the data files that run before training, so a bad file fails in seconds, not after fitting.

`check_files`: every image file is non-empty and has a readable header, every mask matches its
image's size, every PNG, JPEG, BMP and WebP ends as its format says and every TIFF holds the
strips its header names (one cut short is decoded to name its error), every defects config (MVTec
LOCO AD) reads; headers and tails only (PIL's lazy open reads no pixels). The test set is listed
for this, but only paths are used: no test label is read and no test image is decoded before
testing (but one cut short, to name its error). A run also warns when its images are stretched far
out of shape (`warn_stretched`), names the images far smaller than the rest of their split or than
the training images (`warn_small`) and the 8-bit training images a `data.bit_depth` range does not
apply to (`warn_range_unused`).
"""

from __future__ import annotations

import logging
import os

from adtrain.errors import DataError

log = logging.getLogger("adtrain")

#: files named in one error at most (the count of the rest follows)
MAX_LISTED = 3


def header_size(path: str | os.PathLike, whole: bool = False) -> tuple[int, int]:
    """(W, H) from the file's header, upright (an EXIF orientation that turns the image a quarter
    swaps them, as image_io.read_image turns the pixels); DataError naming the file if it is empty or
    not an image. whole: also check_complete, through the same open file."""
    return header_info(path, whole)[0]


def header_info(path: str | os.PathLike, whole: bool = False) -> tuple[tuple[int, int], bool]:
    """(``header_size``'s (W, H), whether its values are wider than 8 bits: 16-bit, 32-bit integer or
    float, grey or colour), from the header alone."""
    from PIL import Image, UnidentifiedImageError

    from adtrain.data.image_io import _stored_tiff_rgb, is_wide, needs_tifffile
    from adtrain.data.orientation import shown_size

    try:
        size = os.stat(path).st_size
        if size == 0:
            raise DataError(path, "empty file (0 bytes)")
        with open(path, "rb") as f:
            with Image.open(f) as im:  # lazy: the header only, no pixel is decoded
                shown = shown_size(im)
                wide = is_wide(im)
                tiff = im.format == "TIFF"
                by_tifffile = needs_tifffile(im)
                cut = whole and tiff and not _tiff_whole(im, size)
            cut = cut or (whole and not tiff and not _ends_whole(f, path, size))
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataError(path, f"not a readable image ({type(err).__name__}: {err})") from None
    if cut:
        _decode(path)
    if by_tifffile:  # rare (16-bit colour, turned or planar): decoded now, so a codec it lacks is
        _stored_tiff_rgb(path)  # found before training, not at the test after the whole fit
    return shown, wide


#: bytes read from a file's end to find its format's end marker (a PNG's IEND chunk, a JPEG's EOI)
TAIL_BYTES = 1024
_END_MARKERS = {".png": b"IEND", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}
_CHECKED = (*_END_MARKERS, ".bmp", ".webp")


def _looks_whole(f, suffix: str, size: int) -> bool:
    """Does the open file end as its format says? PNG, JPEG: the end marker among the last TAIL_BYTES;
    BMP, WebP: at least the length their header declares (a BMP's bfSize, 0 where a writer leaves it
    out; a WebP's RIFF size + 8)."""
    if suffix in _END_MARKERS:
        f.seek(max(0, size - TAIL_BYTES))
        return _END_MARKERS[suffix] in f.read()
    head = f.read(12)
    if suffix == ".bmp" and head[:2] == b"BM":
        return size >= int.from_bytes(head[2:6], "little")
    if suffix == ".webp" and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return size >= int.from_bytes(head[4:8], "little") + 8
    return True  # not the format its name says: left to the decoder


def _ends_whole(f, path, size: int) -> bool:
    """Does the open file end as its format says (``_looks_whole``)? True for formats not checked."""
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in _CHECKED:
        return True
    f.seek(0)
    return _looks_whole(f, suffix, size)


def _tiff_whole(im, size: int) -> bool:
    """Do the first page's strips (or tiles) of an open TIFF lie inside its ``size`` bytes? From the
    header's offsets and byte counts (tags 273/279, tiled 324/325); True where they are not given."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return True
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if offsets and counts:
            offsets = offsets if isinstance(offsets, tuple) else (offsets,)
            counts = counts if isinstance(counts, tuple) else (counts,)
            return max(int(o) + int(c) for o, c in zip(offsets, counts)) <= size
    return True


def _decode(path) -> None:
    from adtrain.data.image_io import read_image

    read_image(path)  # DataError naming the file, as the run would have raised it


def check_complete(path: str | os.PathLike) -> None:
    """A PNG, JPEG, BMP or WebP cut short (a copy or a download that stopped) has a whole header, so
    header_size passes it, and failed only when decoded: a test image, after the whole fit. Where the
    file does not end as its format says (``_looks_whole``) it is decoded, and the decoder's error
    raised as reading it would raise it (a file that merely carries data past its end decodes and
    passes). A TIFF is decoded where its first page's strips or tiles reach past its end
    (``_tiff_whole``). (``header_size(path, whole=True)`` checks it through the header's open file.)"""
    if os.path.splitext(str(path))[1].lower() in (".tif", ".tiff"):
        header_size(path, whole=True)
        return
    with open(path, "rb") as f:
        whole = _ends_whole(f, path, f.seek(0, os.SEEK_END))
    if not whole:
        _decode(path)


def _problems(samples, with_masks: bool, sizes: list | None = None, paths: list | None = None,
              wide: list | None = None) -> list[DataError]:
    """The bad files among samples (``sizes``: each readable image's (W, H) appended, ``paths`` its
    path, ``wide`` whether it is wider than 8 bits)."""
    from adtrain.data.image_io import mask_files

    found = []
    for s in samples:
        try:
            size, is_wide = header_info(s.path, whole=True)
            if sizes is not None:
                sizes.append(size)
            if wide is not None:
                wide.append(is_wide)
            if paths is not None:
                paths.append(s.path)
            if with_masks and s.mask_path is not None:
                for mask in mask_files(s.mask_path):  # a file, or each file of a mask folder
                    msize = header_size(mask, whole=True)
                    if msize != size:
                        raise DataError(mask, f"mask size {msize[0]}x{msize[1]} differs from image {s.path} "
                                        f"{size[0]}x{size[1]}")
        except DataError as err:
            found.append(err)
    return found


#: the stretch (source aspect ratio over the input's, or its inverse) from which a run warns
STRETCH_WARNING = 2.5


def warn_stretched(sizes: list[tuple[int, int]], image_size, limit: float = STRETCH_WARNING) -> float:
    """Warn when the training images' typical shape (the median width/height of ``sizes``, (W, H)
    each) is stretched ``limit`` times or more along one side to reach ``image_size`` (H, W): a
    line-scan strip squeezed into a square input loses what a defect looks like. Returns the stretch."""
    ratios = sorted((w / h, (w, h)) for w, h in sizes if w > 0 and h > 0)
    if not ratios or image_size is None:
        return 1.0
    ratio, (w, h) = ratios[len(ratios) // 2]
    in_h, in_w = (int(v) for v in image_size)
    stretch = max(ratio / (in_w / in_h), (in_w / in_h) / ratio)
    if stretch >= limit:
        log.warning("the training images are typically %dx%d (width/height %.3g) and the model's input %dx%d "
                    "(method.image_size=[%d, %d], width/height %.3g): each is stretched %.1fx along one side. "
                    "A method.image_size=[H, W] of about their shape keeps it (every method takes a non-square "
                    "size), or cut them into tiles first", w, h, ratio, in_w, in_h, in_h, in_w, in_w / in_h, stretch)
    return stretch


#: an image this many times smaller than its split's median size along a side is warned about
SMALL_OUTLIER = 4.0


def _median_size(sizes: list[tuple[int, int]]) -> tuple[int, int] | None:
    if len(sizes) < 4:
        return None
    return sorted(w for w, _ in sizes)[len(sizes) // 2], sorted(h for _, h in sizes)[len(sizes) // 2]


def warn_small(sizes: list[tuple[int, int]], paths: list, split: str, factor: float = SMALL_OUTLIER,
               reference: list[tuple[int, int]] | None = None) -> list:
    """Warn about the images ``factor`` times or more smaller than the split's median width or height
    (a 1x1 placeholder or a thumbnail among camera frames: upscaled to the input, it is trained on or
    scored as a frame), or than the ``reference`` split's (the training images', for the test split:
    a test set of thumbnails beside full-size training frames). A split of uniformly small images,
    with no larger reference, is not warned about. Returns their paths."""
    own, ref = _median_size(sizes), _median_size(reference or [])
    if own is None and ref is None:
        return []
    mid_w, mid_h = max(v[0] for v in (own, ref) if v), max(v[1] for v in (own, ref) if v)
    whose = "the training images'" if ref is not None and (own is None or ref[0] > own[0] or ref[1] > own[1]) \
        else "the split's"
    small = [(p, w, h) for p, (w, h) in zip(paths, sizes) if w * factor <= mid_w or h * factor <= mid_h]
    if small:
        listed = ", ".join(f"{p} ({w}x{h})" for p, w, h in small[:MAX_LISTED]) + (", ..." if len(small) > MAX_LISTED
                                                                                 else "")
        log.warning("%d %s image(s) are %gx or more smaller than %s typical %dx%d along a side, and are "
                    "upscaled to the model's input as any other: %s", len(small), split, factor, whose, mid_w, mid_h,
                    listed)
    return [p for p, _, _ in small]


def warn_range_unused(wide: list[bool], paths: list, bit_depth) -> list:
    """Warn when ``data.bit_depth`` is a [low, high] range but training images are 8-bit: the range is
    for images wider than 8 bits, and those are read as stored (an 8-bit X-ray is not windowed).
    Returns their paths."""
    if not isinstance(bit_depth, tuple):
        return []
    narrow = [p for p, w in zip(paths, wide) if not w]
    if narrow:
        listed = ", ".join(str(p) for p in narrow[:MAX_LISTED]) + (", ..." if len(narrow) > MAX_LISTED else "")
        log.warning("data.bit_depth=[%g, %g] is a range for images wider than 8 bits (16-bit, 32-bit, float), "
                    "but %d of the %d training images are 8-bit and are read as stored, not over that range: %s",
                    bit_depth[0], bit_depth[1], len(narrow), len(wide), listed)
    return narrow


def check_files(dm, test: bool = True, train: bool = True) -> None:
    """Headers, sizes and emptiness of every (train=true) training and held-out and (test=true)
    test file of dm; ``adtrain.test`` checks the test files alone (it reads no other).

    Only for data modules that read files with the default loader (in-memory data is skipped).
    The test set is listed through dm._test_samples() and only its paths are used."""
    from adtrain.data.dataset import reads_files

    if not reads_files(dm.sample_loader()):
        return
    sizes: list[tuple[int, int]] = []
    paths: list = []
    wide: list[bool] = []
    found: list[DataError] = []
    if train:
        found = _problems([*dm.train_samples, *dm.val_samples], with_masks=False, sizes=sizes, paths=paths,
                          wide=wide)
        warn_stretched(sizes, getattr(dm, "image_size", None))
        warn_small(sizes, paths, "training")
        warn_range_unused(wide, paths, getattr(dm, "bit_depth", None))
    if test:
        train_sizes, sizes, paths = sizes, [], []
        found += _problems(dm._test_samples(), with_masks=True, sizes=sizes, paths=paths)
        warn_small(sizes, paths, "test", reference=train_sizes)
        regions = dm.spro_regions()  # MVTec LOCO AD's defects_config.json files (AU-sPRO)
        try:
            regions is not None and regions.check()
        except DataError as err:
            found.append(err)
    if found:
        more = f" (and {len(found) - 1} more bad file{'s' if len(found) > 2 else ''}" + (
            f": {', '.join(str(e.path) for e in found[1:1 + MAX_LISTED])}{', ...' if len(found) > 1 + MAX_LISTED else ''})"
        ) if len(found) > 1 else ""
        raise DataError(found[0].path, f"{str(found[0]).removeprefix(f'{found[0].path}: ')}{more}")
