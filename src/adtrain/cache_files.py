"""Helpers shared by the on-disk caches (images, features, coresets): mode switches and eviction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from adtrain.errors import ConfigError


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
