"""The decoded-image cache (``data.cache=auto``): every image of a sample list decoded and resized
once, stored as a memory-mapped uint8 array on local disk and shared by epochs, the jobs of a
sweep and the tasks of a continual schedule.

What is stored is exactly what the uncached path makes before its centre crop: the loader's
image resized by the same rule (``data.resize``: adtrain.data.resize.ImageResize; masks nearest),
the mask (zeros where there is none) and the image's size before resizing. The dataset then runs
its usual transform on it; that transform's resize is then an identity (a same-size input is
returned unchanged), so crop, augmentation, normalisation and the random stream are
those of the uncached path and the tensors are bit-identical (tests/test_caches.py).

An entry's key (a SHA-256) covers the sample list (path, label, mask path, category, defect),
each file's size, modification and change times, inode and device, the loader, the resize rule
and the versions of adtrain and the decoding libraries: a changed or touched file gets a new
entry, never a stale one. An
entry is a folder ``<key>/`` (images.npy, masks.npy, meta.json), built in a temp folder beside it
and renamed into place: a concurrent job either wins the rename or uses the winner's entry. An
entry is deleted the same way round (renamed away, then removed): none is ever seen half made or
half deleted.

The folder is kept under ``data.cache_max_gb``: after an entry is written, the least recently used
entries (meta.json's mtime, touched on every use) are deleted until the rest fit, except those
this process's run has opened (its loaders' workers reopen them by path) and those another
process used in the last ``RECENT_S`` seconds (a parallel sweep job may be reading them). An
entry larger than the whole budget is not written (the run decodes as before, and says so).

Disk space is reserved before a single image is written (``posix_fallocate``): writing a
memory-mapped file whose pages the disk cannot hold kills the process with SIGBUS ("Bus error"),
not an exception, so a full disk or tmpfs must be found first. Too little room (or a filesystem
that refuses the reservation) skips the cache with a warning and the run decodes as before.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from adtrain.data.image_io import mask_files
from adtrain.data.resize import DEFAULT, ImageResize, describe
from adtrain.errors import AdtrainError, ConfigError
from adtrain.io import remove_dead_temps, temp_name

log = logging.getLogger("adtrain")

MODES = ("auto", "off")
FORMAT = 4  # bump when the layout of an entry, or how a file is decoded, changes (2: EXIF orientation;
#            3: float images beyond 0..255 refused, where an entry of 2 holds them clipped; 4: TIFFs
#            turned a quarter no longer scrambled, planar 16-bit colour TIFFs read by their bits)
#: an entry another process used this recently is never evicted (it may be reading it now)
RECENT_S = 600.0
#: entry folders this process's run has opened: never evicted by it (`release_entries` at each run's start:
#: a sequential sweep's later jobs may evict an earlier job's entries, past RECENT_S)
_IN_USE: set[str] = set()


def release_entries() -> None:
    """A new run in this process (a sequential sweep's next job): the entries the earlier runs opened
    are evictable again once RECENT_S has passed since their last use (their maps stay readable)."""
    _IN_USE.clear()


def cache_mode(value) -> str:
    """``data.cache``: auto | off (YAML reads a bare off as false)."""
    from adtrain.cache_files import parse_mode

    return parse_mode(value, "data.cache", MODES, "auto")


def _versions() -> dict:
    import albumentations
    import cv2
    import PIL

    import adtrain

    return {"adtrain": getattr(adtrain, "__version__", "?"), "numpy": np.__version__, "pillow": PIL.__version__,
            "opencv": cv2.__version__, "albumentations": albumentations.__version__, "format": FORMAT}


def _stat(path) -> list | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # not a file (e.g. synthetic://...): the loader's key covers it
        return None
    if stat.S_ISDIR(st.st_mode):  # a mask folder (MVTec LOCO): every file in it
        return [[p.name, *_stat(p)] for p in mask_files(path)]
    # inode, device and ctime too: a file rewritten in place with its mtime put back (utime cannot set
    # ctime), or a dataset root switched to a copy that kept the mtimes (cp -p, rsync -a), is a new entry
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns]


def describe_loader(loader) -> str:
    """The loader by name and settings, the same in every process (a default repr has an address)."""
    if inspect.isfunction(loader) or inspect.isbuiltin(loader):
        return f"{loader.__module__}.{loader.__qualname__}"
    kind = f"{type(loader).__module__}.{type(loader).__qualname__}"
    if type(loader).__repr__ is not object.__repr__:
        return f"{kind}:{loader!r}"
    return f"{kind}:{sorted((k, repr(v)) for k, v in vars(loader).items())}" if hasattr(loader, "__dict__") else kind


def cache_key(samples: Sequence, loader, image_size: tuple[int, int], rule: str = DEFAULT) -> str:
    """SHA-256 of everything the cached arrays depend on (see the module docstring)."""
    h = hashlib.sha256()
    head = {"loader": describe_loader(loader),
            "size": list(image_size), "resize": describe(rule),
            "versions": _versions()}
    h.update(json.dumps(head, sort_keys=True).encode())
    for s in samples:
        row = [s.path, int(s.label), s.mask_path, s.category, s.defect, _stat(s.path), _stat(s.mask_path)]
        h.update(json.dumps(row).encode())
    return h.hexdigest()[:40]


class _Decode(torch.utils.data.Dataset):
    """Decode + resize one sample (the work the cache saves), run by the DataLoader's workers."""

    def __init__(self, dataset, resize):
        self.dataset, self.resize = dataset, resize

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from adtrain.data.dataset import _binarise

        image, mask = self.dataset._load(self.dataset.samples[index])
        has = mask is not None
        mask = np.zeros(image.shape[:2], np.uint8) if mask is None else _binarise(mask)
        out = self.resize(image=image, mask=mask)
        return index, out["image"], out["mask"], image.shape[:2], has


def _as_is(item):
    return item


#: free space left over on the cache's disk after an entry is reserved
HEADROOM_BYTES = 256 * 2**20


def entry_bytes(n: int, image_size) -> int:
    """What an entry's two arrays take on disk (without the small .npy headers and meta.json)."""
    h, w = image_size
    return n * h * w * 4  # uint8 RGB image + uint8 mask


def _reserve(fd: int, size: int) -> None:
    """Allocate every block of the open file now, so a full disk raises OSError (ENOSPC) here
    instead of SIGBUS on the first write through the memory map."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
        return
    chunk = b"\0" * (16 * 2**20)  # no fallocate (macOS, Windows): write the zeros ourselves
    for start in range(0, size, len(chunk)):
        os.pwrite(fd, chunk[:min(len(chunk), size - start)], start)


def _open_reserved(path: Path, shape: tuple) -> np.memmap:
    """A zero-filled uint8 .npy of ``shape`` with its blocks allocated, opened memory-mapped."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
        f.flush()
        _reserve(f.fileno(), f.tell() + int(np.prod(shape)))
    return np.load(path, mmap_mode="r+")


def _build(folder: Path, dataset, image_size, num_workers: int, rule: str) -> None:
    resize = ImageResize(image_size[0], image_size[1], rule)
    n, (h, w) = len(dataset), image_size
    images = _open_reserved(folder / "images.npy", (n, h, w, 3))
    masks = _open_reserved(folder / "masks.npy", (n, h, w))
    source = np.zeros((n, 2), np.int64)
    has_mask = np.zeros(n, bool)
    loader = torch.utils.data.DataLoader(_Decode(dataset, resize), batch_size=None, num_workers=num_workers,
                                         collate_fn=_as_is, generator=torch.Generator())
    # (its own generator: building must not draw from torch's global RNG, which later shuffles the
    # training set; a cold run would otherwise see another order than an uncached or warm one)
    for i, image, mask, size, has in loader:
        images[i], masks[i], source[i], has_mask[i] = image, mask, size, has
    images.flush()
    masks.flush()
    del images, masks
    meta = {"n": n, "size": [h, w], "source_size": source.tolist(), "has_mask": has_mask.tolist(),
            "paths": [s.path for s in dataset.samples]}
    (folder / "meta.json").write_text(json.dumps(meta))


def _is_entry_name(name: str) -> bool:
    return len(name) == 40 and all(c in "0123456789abcdef" for c in name)


def _delete_entry(folder: Path) -> None:
    """Delete an entry so that no process ever sees it half deleted: renamed first to a temp name with
    this pid (one a killed deletion leaves is removed by `remove_dead_temps`), then removed. A plain
    rmtree killed after meta.json went left a folder that blocked its key for good."""
    gone = folder.with_name(temp_name(folder.name))
    try:
        os.rename(folder, gone)
    except OSError:  # deleted meanwhile, or cannot be renamed: removed in place
        gone = folder
    shutil.rmtree(gone, ignore_errors=True)


class ImageCache:
    """Where the entries live, and what the runs of this process did with them (for results.json)."""

    def __init__(self, root: str | os.PathLike, mode: str = "auto", max_gb: float = 20.0):
        self.mode = cache_mode(mode)
        self.root = Path(os.path.expanduser(str(root)))
        try:
            self.max_bytes = float(max_gb) * 2**30
        except (TypeError, ValueError):
            raise ConfigError("data.cache_max_gb", f"must be a number of GB, got {max_gb!r}") from None
        if not self.max_bytes > 0:
            raise ConfigError("data.cache_max_gb", f"must be > 0, got {max_gb!r} (data.cache=off turns the cache off)")
        self.events: list[str] = []  # "hit" | "miss" | "skip" (not cacheable) per dataset made

    def evict(self) -> int:
        """Delete the least recently used entries until the folder fits ``max_bytes`` (entries in
        use here, or used elsewhere in the last RECENT_S seconds, are kept); returns how many."""
        import time

        if gone := remove_dead_temps(self.root, recursive=False):  # builds killed midway, their space reserved
            log.info("image cache: %d unfinished entr%s of ended processes deleted", gone, "y" if gone == 1 else "ies")
        entries = []
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            if not _is_entry_name(folder.name) or not folder.is_dir():
                continue  # a build in progress (.<key>.tmp), or not the cache's: never touched
            try:
                size = sum(f.stat().st_size for f in folder.iterdir())
            except OSError:  # deleted meanwhile
                continue
            try:
                used = (folder / "meta.json").stat().st_mtime
            except OSError:  # entries appear whole (renamed from their build): one without meta.json is damaged
                if folder.exists():
                    log.warning("image cache entry %s has no meta.json (a deletion cut short): deleted", folder)
                    _delete_entry(folder)
                continue
            entries.append((used, size, folder))
        total, removed, now = sum(e[1] for e in entries), 0, time.time()
        for used, size, folder in sorted(entries):
            if total <= self.max_bytes:
                break
            if str(folder.resolve()) in _IN_USE or now - used < RECENT_S:
                continue
            _delete_entry(folder)
            total -= size
            removed += 1
        if removed:
            log.info("image cache: %d least recently used entr%s deleted (data.cache_max_gb=%g)", removed,
                     "y" if removed == 1 else "ies", self.max_bytes / 2**30)
        if total > self.max_bytes:
            log.warning("data.cache_dir=%s holds %.3g GB of images in use (data.cache_max_gb=%g)", self.root,
                        total / 2**30, self.max_bytes / 2**30)
        return removed

    def state(self) -> str:
        """off | hit (every set served from the cache) | miss (at least one set decoded into it) |
        skipped (data.cache=auto, but its folder took no entry: decoded every time, warned)."""
        if self.mode != "off" and self.events and all(e == "skip" for e in self.events):
            return "skipped"
        if self.mode == "off" or not any(e in ("hit", "miss") for e in self.events):
            return "off"
        return "miss" if "miss" in self.events else "hit"

    def entry(self, dataset, image_size, num_workers: int = 0, rule: str = DEFAULT) -> "CachedImages | None":
        """The cached arrays for ``dataset`` resized by ``rule`` (built now if missing); None when the
        cache is off or the folder is not writable (then the dataset decodes as before, and the log
        says why)."""
        if self.mode == "off" or not len(dataset):
            return None
        key = cache_key(dataset.samples, dataset.loader, image_size, rule)
        folder = self.root / key
        if (folder / "meta.json").is_file():
            try:
                hit = CachedImages(folder)
            except (OSError, ValueError, AdtrainError) as e:  # damaged or deleted meanwhile: build it again
                log.warning("image cache entry %s unreadable (%s): decoding it again", folder, e)
                _delete_entry(folder)
            else:
                self.events.append("hit")
                return hit
        elif folder.is_dir():  # entries appear whole: without meta.json it is a deletion cut short
            log.warning("image cache entry %s has no meta.json (a deletion cut short): decoding it again", folder)
            _delete_entry(folder)
        need, tmp = entry_bytes(len(dataset), image_size), None
        if need > self.max_bytes:
            log.warning("data.cache_max_gb=%g: the image cache entry of %d images needs %.2f GB: images are "
                        "decoded without it", self.max_bytes / 2**30, len(dataset), need / 2**30)
            self.events.append("skip")
            return None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_dead_temps(self.root, recursive=False)  # a killed build's space, before it is counted
            free = shutil.disk_usage(self.root).free
            if free >= need + HEADROOM_BYTES:
                tmp = self.root / temp_name(key)  # with its pid: a killed build's is deleted by evict
                tmp.mkdir()
        except OSError as e:
            log.warning("data.cache_dir=%s is not writable (%s): images are decoded without the cache", self.root, e)
            self.events.append("skip")
            return None
        if tmp is None:
            log.warning("data.cache_dir=%s: %.2f GB free, the image cache needs %.2f GB (+%.2f GB left free): "
                        "images are decoded without it", self.root, free / 1e9, need / 1e9, HEADROOM_BYTES / 1e9)
            self.events.append("skip")
            return None
        try:
            _build(tmp, dataset, image_size, num_workers, rule)  # a bad image raises its DataError here
            try:
                os.rename(tmp, folder)
            except OSError:  # another job renamed its identical entry first: use that one
                if not (folder / "meta.json").is_file():
                    raise
        except OSError as e:  # disk full, folder removed meanwhile...: decode as before
            log.warning("data.cache_dir=%s: cannot write the image cache (%s): images are decoded without it",
                        self.root, e)
            self.events.append("skip")
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.events.append("miss")
        log.debug("image cache: %d images decoded into %s", len(dataset), folder)
        entry = CachedImages(folder)
        self.evict()
        return entry


class CachedImages:
    """One entry, opened memory-mapped on first use in each process (picklable for workers)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.source_size, self.has_mask = self._per_image(meta)
        self._arrays = None
        self._open()  # now, in this process: forked workers inherit the maps (a later rm is harmless)
        if not len(self._arrays[0]) == len(self._arrays[1]) == len(self.source_size):
            self._damaged("meta.json and the arrays disagree on the number of images")
        _IN_USE.add(str(self.folder.resolve()))
        try:
            os.utime(self.folder / "meta.json")  # its last use, for the budget's LRU order
        except OSError:
            pass

    def _per_image(self, meta) -> tuple[list, list]:
        """meta.json's per-image lists (valid JSON of another shape, e.g. ``{}``, is a damaged entry)."""
        lists = [meta.get(k) if isinstance(meta, dict) else None for k in ("source_size", "has_mask")]
        if not all(isinstance(v, list) for v in lists) or len(lists[0]) != len(lists[1]):
            self._damaged("meta.json lacks the images' source_size / has_mask lists")
        return lists[0], lists[1]

    def _damaged(self, why: str):
        from adtrain.errors import DataError

        raise DataError(self.folder, f"image cache entry damaged ({why})")

    def _open(self):
        from adtrain.errors import DataError

        try:
            self._arrays = (np.load(self.folder / "images.npy", mmap_mode="r"),
                            np.load(self.folder / "masks.npy", mmap_mode="r"))
        except (OSError, ValueError) as e:
            raise DataError(self.folder, f"image cache entry unreadable ({e}); deleted or damaged while in use? "
                            "run again, or set data.cache=off") from None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray, list, bool]:
        if self._arrays is None:
            self._open()
        images, masks = self._arrays
        return (np.array(images[index]), np.array(masks[index]), self.source_size[index],
                bool(self.has_mask[index]))
