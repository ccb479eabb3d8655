"""A background writer: files (heatmap PNGs) written off the hot path, errors surfaced.

`BackgroundWriter.submit(path, fn, *args)` queues ``fn(path, *args)`` for one worker thread and
returns at once (it blocks only while ``max_pending`` jobs wait, bounding memory). The first job
that fails is re-raised in the calling thread, naming the file, at the next `submit`, `check`
or `close`; the jobs queued after it are skipped. `close()` waits for every queued job (flush +
join) and must run before results are written.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

from adtrain.errors import AdtrainError

_STOP = object()
#: writers whose thread may still run: stopped and joined at interpreter exit (a run ended by
#: Ctrl-C or an error while heatmaps were queued), before daemon threads are torn down mid-job
#: (matplotlib inside a dying thread aborted the process: "terminate called without an active exception")
_LIVE: "weakref.WeakSet[BackgroundWriter]" = weakref.WeakSet()


@atexit.register
def stop_all(timeout: float = 30.0) -> None:
    for writer in list(_LIVE):
        writer.stop(timeout)


class BackgroundWriter:
    def __init__(self, max_pending: int = 16, name: str = "adtrain-writer") -> None:
        if int(max_pending) < 1:
            raise AdtrainError(f"BackgroundWriter: max_pending must be >= 1, got {max_pending}")
        self._queue: queue.Queue = queue.Queue(maxsize=int(max_pending))
        self._error: tuple[str, BaseException] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._closed = False
        self.written: list[str] = []
        _LIVE.add(self)

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the jobs already queued, without raising (exit paths); waits up to ``timeout``."""
        if not self._closed:
            self._closed = True
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                return
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                path, fn, args, kwargs = job
                if self._error is None:  # after a failure the rest is skipped
                    try:
                        fn(path, *args, **kwargs)
                        self.written.append(str(path))
                    except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                        self._error = (str(path), exc)
            finally:
                self._queue.task_done()

    def check(self) -> None:
        """Raise the first failed job's error (naming its file) in the calling thread."""
        if self._error is not None:
            path, exc = self._error
            raise AdtrainError(f"writing {path} failed: {type(exc).__name__}: {exc}") from exc

    def submit(self, path: str | Path, fn: Callable[..., Any], *args, **kwargs) -> None:
        """Queue ``fn(path, *args, **kwargs)``; raises an earlier job's error first."""
        if self._closed:
            raise AdtrainError(f"BackgroundWriter: closed, cannot write {path}")
        self.check()
        self._queue.put((path, fn, args, kwargs))

    def flush(self) -> None:
        """Wait until every queued job ran; raise the first error."""
        self._queue.join()
        self.check()

    def close(self) -> None:
        """Flush, stop and join the thread; raise the first error. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        self.check()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # an error is already on its way: stop quietly, do not mask it
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
