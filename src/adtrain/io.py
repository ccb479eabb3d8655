"""Atomic file writes: a crash never leaves a half-written result or checkpoint.

Files get the usual permissions (0o666 minus the umask), as a plain open() would give them.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from adtrain import distributed


#: a temp file or folder of adtrain's: ``.<name>.<pid>-<12 hex>.tmp`` (the writing process's pid)
TEMP_NAME = re.compile(r"^\..+\.(\d+)-[0-9a-f]{12}\.tmp$")


def temp_name(name: str) -> str:
    """A unique temp name for ``name``, carrying this process's pid (remove_dead_temps)."""
    return f".{name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"


def process_alive(pid: int) -> bool:
    """Is process ``pid`` running (another user's counts as running)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's live process; a number no pid is
        return True
    return True


def remove_dead_temps(folder: str | os.PathLike, recursive: bool = True) -> int:
    """Delete the temp files and folders a killed write left in ``folder`` (those of a process that
    has ended; a live one's are kept); returns how many. A write killed midway leaves its temp
    (a checkpoint's is checkpoint-sized) that nothing else would ever remove."""
    folder, removed = Path(folder), 0
    if not folder.is_dir():
        return 0
    for path in list(folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")):
        m = TEMP_NAME.match(path.name)
        if not m or process_alive(int(m.group(1))):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed += 1
        except OSError:  # removed meanwhile, or not ours to remove
            continue
    return removed


def _new_temp(path: Path) -> str:
    """Create an empty, unique temp file beside path, mode 0o666 & ~umask (mkstemp would give 0600)."""
    for _ in range(100):
        tmp = str(path.parent / temp_name(path.name))
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: no free temp file name beside it")


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    if not distributed.is_writer():  # under DDP rank 0 writes the run's files (adtrain.distributed)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def move_files(source: Path, dest: Path, files) -> None:
    """Each of ``files`` (paths relative to ``source``) moved to the same place below ``dest``, folders
    made as needed: renames on one file system (a staging folder inside dest), in the order given."""
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(source / rel, dest / rel)


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> null, tensors/numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, data: Any) -> Path:
    text = json.dumps(_clean(data), indent=2, sort_keys=False)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text + "\n")

    return _atomic(path, write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return _atomic(path, write)


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def save_image(image, path: str | os.PathLike) -> Path:
    """Save a PIL image (format from the suffix) atomically."""
    fmt = Path(path).suffix.lstrip(".").upper() or "PNG"
    fmt = "JPEG" if fmt == "JPG" else fmt
    return _atomic(path, lambda tmp: image.save(tmp, format=fmt))


def writable_folder(path: str | os.PathLike, key: str, what: str = "folder") -> Path:
    """``path`` made (parents too) if missing and writable, else ConfigError naming ``key``: said before
    work is done that would be lost when the write fails."""
    from adtrain.errors import ConfigError

    path = Path(os.path.expanduser(str(path)))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(key, f"{what} cannot be made: {path} ({err.strerror or err})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{what} is not writable: {path}")
    return path
