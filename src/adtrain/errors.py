"""Errors that reach the user: each names the file or the config key at fault."""

from __future__ import annotations


class AdtrainError(Exception):
    """Base class of every error adtrain raises on purpose (bad input, bad config)."""


class ConfigError(AdtrainError):
    """A config value is missing, unknown or out of range. The message names the key."""

    def __init__(self, key: str, message: str | None = None):
        # one argument = an already formatted message (how worker processes re-raise errors)
        self.key = key if message is not None else None
        self.detail = message
        super().__init__(f"config key '{key}': {message}" if message is not None else key)


class DataError(AdtrainError):
    """A data file or folder is missing, unreadable or inconsistent. The message names it."""

    def __init__(self, path, message: str | None = None):
        self.path = str(path) if message is not None else None
        super().__init__(f"{path}: {message}" if message is not None else str(path))


class CategoryNotFound(DataError):
    """A category's folder is missing from the dataset's root (a continual run names schedule.tasks)."""


class WeightsError(AdtrainError):
    """No pretrained weights could be found for a backbone."""


class TrainingError(AdtrainError):
    """Training diverged (NaN/inf loss) or cannot continue."""


def whole_number(value, key: str, least: int = 0, none_ok: bool = False) -> int | None:
    """``value`` as an int >= ``least`` (None passed through where ``none_ok``); else ConfigError naming
    ``key``: a fraction is not cut (1.5 shots would train on 1), a bool is not a count (true is not 1)."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(key, f"must be a whole number >= {least}{' or null' if none_ok else ''}, got {value!r}")
    return value


class Terminated(BaseException):
    """A run (or a test) stopped by SIGTERM (SLURM, `timeout`, Kubernetes); a run can be resumed.

    Not an Exception, as KeyboardInterrupt is not: a script's ``except Exception`` (or ``except
    AdtrainError``) that goes on to its next run must not swallow a request to stop."""

    def __init__(self, path, message: str | None = None):
        self.path = str(path)
        super().__init__(f"{path}: stopped by SIGTERM" + (f"; {message}" if message else ""))
