"""Finding image files: which names count as images, listing folders (the same for training and
predict), glob patterns, and a mask's file whatever the case of its extension."""

from __future__ import annotations

import functools
import glob
import logging
import os
from pathlib import Path

from adtrain.errors import DataError

log = logging.getLogger("adtrain")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


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


def _entries(folder: Path, top: bool = True) -> list[Path]:
    """The folder's entries but hidden ones (``.DS_Store``, macOS's ``._name.png`` AppleDouble files,
    ``.ipynb_checkpoints/``). A folder that cannot be listed: DataError naming it, or below the top
    (a disk's root-only ``lost+found``) a warning naming it."""
    try:
        with os.scandir(folder) as it:
            return [folder / e.name for e in it if not e.name.startswith(".")]
    except OSError as e:
        if top:
            raise DataError(folder, f"cannot list this folder: {e.strerror or e}") from None
        log.warning("%s: cannot list this folder (%s): its images are left out", folder, e.strerror or e)
        return []


def _files_below(folder: Path, ancestors: frozenset = frozenset()):
    """Every non-folder entry below ``folder``, linked folders followed (``Path.rglob`` does not follow
    them before Python 3.13: a defect type linked in from another disk would vanish); a link back up
    its own tree is not followed again."""
    real = os.path.realpath(folder)
    if real in ancestors:
        return
    for p in _entries(folder, top=not ancestors):
        if p.is_dir():
            yield from _files_below(p, ancestors | {real})
        else:
            yield p


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in a folder (``recursive``: and below it, linked folders followed), sorted by path.
    Hidden files and folders are skipped, a name that is not UTF-8 is refused, and links to nothing
    are left out with a warning naming them."""
    folder = Path(folder)
    images, broken = [], []
    for p in _files_below(folder) if recursive else _entries(folder):
        if not is_image_file(p):
            continue
        if p.is_file():
            images.append(check_name(p))
        elif not p.exists():  # a link whose target is gone (a folder named x.png is no image either)
            broken.append(p)
    if broken:
        log.warning("%s: %d image link(s) point to a missing file and are left out: %s", folder, len(broken),
                    ", ".join(str(p) for p in sorted(broken)[:5]) + (", ..." if len(broken) > 5 else ""))
    return sorted(images)


def expand_image_paths(spec: str | Path | list) -> list[Path]:
    """A folder, a glob pattern, a single file, or a list of these -> sorted image paths."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_image_paths(s)]
    p = Path(spec)
    if p.is_dir():
        return list_images(p, recursive=True)
    if p.is_file():
        return [check_name(p)]
    hits = sorted(Path(h) for h in glob.glob(str(spec), recursive=True))
    hits = [check_name(h) for h in hits if h.is_file() and is_image_file(h)]
    if not hits:
        raise DataError(spec, "no image files found (expected a folder, a glob pattern or an image file)")
    return hits


def _extension_lowered(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return stem + ext.lower()


@functools.lru_cache(maxsize=64)
def _names_by_extension(folder: str, mtime_ns: int) -> dict[str, str]:
    """A folder's file names keyed with their extension lower-cased (mtime_ns: a changed folder is listed again)."""
    return {_extension_lowered(e.name): e.name for e in os.scandir(folder) if not e.name.startswith(".")}


def find_file(folder: Path, names) -> Path | None:
    """The first of ``names`` (lower-case extensions) that is a file in ``folder``; a file whose
    extension differs in case only (``000_mask.PNG``, ``042.BMP``: cameras and Windows tools write
    them) matches too, where no exact name does."""
    names = list(dict.fromkeys(names))
    for name in names:
        if (folder / name).is_file():
            return folder / name
    try:
        listed = _names_by_extension(str(folder), os.stat(folder).st_mtime_ns)
    except OSError:  # no such folder
        return None
    for name in names:
        hit = listed.get(_extension_lowered(name))
        if hit is not None and (folder / hit).is_file():
            return folder / hit
    return None
