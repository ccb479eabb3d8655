"""Host memory left for a collection that grows with the data set (PatchCore's patch features).

A memory-bank method holds every training patch as fp32 on the host until its coreset is
taken. On a data set too large for the machine that pass used to run for an hour and end in
the kernel's OOM killer, which leaves no message and no results. ``check_room`` refuses at the
first batch instead, with the figure and the config key that caps the collection.
"""

from __future__ import annotations

from adtrain.errors import ConfigError

_MEMINFO = "/proc/meminfo"
#: cgroup v2 and v1 (limit, usage) files of this process's container, where there is one
_CGROUPS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def available_bytes() -> int | None:
    """Bytes this process can still allocate without swapping: the least of the kernel's
    MemAvailable and the container's limit minus its usage; None where neither is known."""
    found: list[int] = []
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in _CGROUPS:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes ~2^63 for no limit
            found.append(max(limit - usage, 0))
    if not found:
        try:
            import psutil  # macOS, Windows
        except ImportError:
            return None
        found.append(int(psutil.virtual_memory().available))
    return min(found)


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_room(rows: int, bytes_per_row: int, held: int, key: str, what: str, switch: str) -> None:
    """Refuse (ConfigError naming ``key``) when ``rows`` rows of ``bytes_per_row`` each, of which
    ``held`` are already held, will not fit in the memory still available. ``switch``: the key
    that turns the check off (an estimate can be wrong; the user decides)."""
    avail = available_bytes()
    more = max(int(rows) - int(held), 0) * int(bytes_per_row)
    if avail is None or more <= avail:
        return
    fits = max(int(avail // max(bytes_per_row, 1)) + int(held), 1)
    raise ConfigError(key, (
        f"{what}: {int(rows):,} rows of {bytes_per_row:,} bytes ({_size(int(rows) * bytes_per_row)}) would be "
        f"held in host memory, but only {_size(avail)} is available; cap them with {key} "
        f"(about {int(fits * 0.8):,} fit), or use fewer or smaller training images; {switch}=false skips this check"))
