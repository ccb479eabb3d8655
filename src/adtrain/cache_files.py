"""Helpers shared by the on-disk caches (images, features, coresets): mode switches, reading an
entry and eviction."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from adtrain.errors import ConfigError

log = logging.getLogger("adtrain")


def parse_mode(value, key: str, modes: Sequence[str], true_means: str) -> str:
    """A cache switch from config: None/False -> off, True -> ``true_means``, else one of
    ``modes`` (YAML reads a bare off as false); a ConfigError names ``key`` otherwise."""
    if value is False or value is None:
        return "off"
    if value is True:
        return true_means
    mode = str(value).lower()
    if mode not in modes:
        raise ConfigError(key, f"{value!r}; choose {', '.join(modes[:-1])} or {modes[-1]}")
    return mode


def evict_lru(paths: Iterable[Path], max_bytes: float) -> int:
    """Delete the least recently modified files until they fit ``max_bytes``; returns how many."""
    entries = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        entries.append((st.st_mtime_ns, st.st_size, p))
    total, removed = sum(e[1] for e in entries), 0
    for _, size, p in sorted(entries):
        if total <= max_bytes:
            break
        try:
            p.unlink()
        except OSError:
            continue
        total -= size
        removed += 1
    return removed


def _why(err: BaseException) -> str:
    """torch.load's failure in a few words (its unpickling error is paragraphs long, and its advice,
    weights_only=False, would run whatever a damaged or planted file holds)."""
    text = str(err)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported [^\n]*", text)
        return "not tensors and plain data" + (f" ({found.group(0).strip()})" if found else "")
    if isinstance(err, EOFError):
        return "empty or cut short"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(err).__name__}{': ' + first[:200] if first else ''}"


#: broken entries of one cache folder named in a warning each; the rest in one line, then debug logs
WARNED_BROKEN = 3
_broken_seen: dict[tuple[str, str], int] = {}


def _drop_broken(path: Path, what: str, why: str) -> None:
    """Warn naming the entry and delete it: the caller computes and stores it again. A folder of
    many broken entries (a full disk, a damaged copy of the cache) names its first WARNED_BROKEN, then
    says once that the others follow without a warning each (each still named in the debug log)."""
    key = (what, str(path.parent))
    seen = _broken_seen[key] = _broken_seen.get(key, 0) + 1
    if seen <= WARNED_BROKEN:
        log.warning("%s %s unreadable (%s): deleted, computed again", what, path, why)
    else:
        if seen == WARNED_BROKEN + 1:
            log.warning("more unreadable entries in %s (%s): each is deleted and computed again without a "
                        "warning (the debug log names them)", path.parent, what)
        log.debug("%s %s unreadable (%s): deleted, computed again", what, path, why)
    try:
        path.unlink()
    except OSError:  # deleted meanwhile by another job, or a read-only cache: the rename replaces it
        pass


def load_entry(path: Path, what: str, map_location: Any = "cpu",
               valid: Callable[[Any], bool] = lambda obj: True) -> Any | None:
    """The torch file ``path`` of a cache (weights-only: runs no code), or None where there is none.

    An entry that cannot be loaded (cut short, overwritten, not torch's format: torch raises
    UnpicklingError, RuntimeError, EOFError, ValueError... for these) or that does not hold what
    the cache stores (``valid``) is a broken entry: warned about by name, deleted, and None is
    returned, so it is recomputed instead of failing the run. KeyboardInterrupt and the like pass."""
    import torch

    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:  # evicted by another job since is_file(): no entry, nothing broken
        return None
    except (MemoryError, torch.cuda.OutOfMemoryError) as err:  # no room here: not the entry's fault, kept
        log.debug("%s %s not loaded (%s), computed again", what, path, type(err).__name__)
        return None
    except Exception as err:  # noqa: BLE001 - any other failure to load means a damaged file
        _drop_broken(path, what, _why(err))
        return None
    if not valid(obj):
        _drop_broken(path, what, f"holds a {type(obj).__name__} of another layout")
        return None
    try:
        os.utime(path)  # least recently used goes first
    except OSError:  # evicted meanwhile: what was read is still whole
        pass
    return obj


def dict_with(keys: Iterable[str]) -> Callable[[Any], bool]:
    """``valid`` for load_entry: a dict holding at least ``keys``."""
    need = frozenset(keys)
    return lambda obj: isinstance(obj, dict) and need <= obj.keys()
