"""Memory-bank work runs in its own precision whatever autocast the caller is under.

Lightning runs ``test_step`` (and every other step) under autocast with ``trainer.precision=bf16-mixed``
or ``16-mixed``. The searches' certificates (``memory.lowp``, ``memory.dense_exact``, the projected
pass) bound fp32 rounding, or the low precision they pick themselves; an autocast matmul in bf16
breaks them (on the CPU it failed outright: ``topk(out=...)`` got bf16 into fp32 buffers), and a
coreset picked on bf16 distances is another coreset. `autocast_off` (a decorator) and `no_autocast`
turn off whatever autocast is on.
"""

from __future__ import annotations

import contextlib

import torch

_DEVICES = ("cpu", "cuda")


@contextlib.contextmanager
def no_autocast():
    """Autocast off on every device type where it is on (nothing to do where none is)."""
    with contextlib.ExitStack() as stack:
        for dev in _DEVICES:
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        yield


def autocast_off(fn):
    """``fn`` run under `no_autocast` (a generator context manager is a ContextDecorator: a fresh one
    per call)."""
    return no_autocast()(fn)
