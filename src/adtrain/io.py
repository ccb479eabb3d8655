"""Atomic file writes: a crash never leaves a half-written result or checkpoint.

Files get the usual permissions (0o666 minus the umask), as a plain open() would give them.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import torch

from adtrain import distributed


def _new_temp(path: Path) -> str:
    """Create an empty, unique temp file beside path, mode 0o666 & ~umask (mkstemp would give 0600)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
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
