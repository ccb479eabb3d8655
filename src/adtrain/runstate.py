"""What last.ckpt carries beyond Lightning's loop state: the RNG states and the fit time so far.

A run killed mid-epoch resumes from the end of its last finished epoch. Lightning restores the
weights, optimiser and loop counters; this callback restores the torch / numpy / Python (and CUDA)
random states of that moment, so the resumed epochs shuffle, augment and draw synthetic anomalies
exactly as the uninterrupted run did. The states are stored as plain tensors and lists, so the
checkpoint still loads with weights_only=True (adtrain.loading.read_checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from lightning.pytorch import Callback

from adtrain.errors import DataError, Terminated

#: set when a fit saw Ctrl-C (Lightning turns KeyboardInterrupt into exit(1) after its shutdown)
_INTERRUPTED = {"flag": False}


def interrupted() -> bool:
    return _INTERRUPTED["flag"]


#: set when SIGTERM came while catch_sigterm's handler was in place (also inside a Lightning fit or test,
#: where Lightning acts on it only between batches: one in the last batch would otherwise be lost)
_SIGTERM = {"seen": False}


def sigterm_seen() -> bool:
    return _SIGTERM["seen"]


def catch_sigterm(run_dir: Path) -> Callable[[], None]:
    """From now on SIGTERM (SLURM, `timeout`, Kubernetes) raises Terminated, as Ctrl-C raises
    KeyboardInterrupt: the CLI says where the run stands and how to resume it instead of dying without
    a word. Inside a Lightning fit or test Lightning's handler runs and calls this one, which then only
    notes the signal: Lightning stops at the next batch boundary (SIGTERMException, sigterm_as_error),
    not in the middle of a step. Returns the function that puts the earlier handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # Python sets signal handlers from the main thread only
    owner = os.getpid()
    _SIGTERM["seen"] = False

    def handler(signum, frame):
        if os.getpid() != owner:  # a process forked from this one (DataLoader workers set their own handler):
            signal.signal(signum, signal.SIG_DFL)  # it ends as it would without this handler
            os.kill(os.getpid(), signum)
            return
        _SIGTERM["seen"] = True
        if signal.getsignal(signal.SIGTERM) is handler:  # not inside Lightning (which composes it with its own)
            raise Terminated(run_dir)

    before = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


@contextlib.contextmanager
def sigterm_as_error(path, message: str | None = None):
    """Lightning ends a fit or a test that got SIGTERM with SIGTERMException, a SystemExit without a
    code: uncaught, the process (a whole sweep too) exits with status 0, as if the run had finished.
    Raised as Terminated, naming path, instead."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        yield
    except SIGTERMException:
        raise Terminated(path, message) from None


def rng_states() -> dict:
    """torch, CUDA, numpy and Python RNG states as tensors, lists and numbers only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": [int(v) for v in py_state], "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_states(state: dict) -> None:
    """Inverse of rng_states."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


class RunState(Callback):
    """Saves the RNG states and the fit seconds so far with every full checkpoint (last.ckpt) and
    puts them back when a fit resumes from one: a resumed run ends as an uninterrupted one would."""

    def __init__(self, checkpoint: str | None = None):
        self.checkpoint = checkpoint  # the file a resume reads (last.ckpt), named when its state is unreadable
        self.seconds_before = 0.0  # fit time of the interrupted session(s), from the checkpoint
        self._t0: float | None = None

    @property
    def state_key(self) -> str:
        return "adtrain.RunState"

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            _INTERRUPTED["flag"] = True

    def fit_seconds(self) -> float:
        """Fit time of this session plus that of the sessions it resumes."""
        now = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return self.seconds_before + now

    def state_dict(self) -> dict:
        return {"rng": rng_states(), "fit_seconds": float(self.fit_seconds())}

    def load_state_dict(self, state: dict) -> None:
        # Lightning restores callbacks before the fit loop sets up its data: the first resumed epoch's
        # loader is made (its shuffling seed drawn) after this, as the uninterrupted run's was
        try:
            if state.get("rng") is not None:
                set_rng_states(state["rng"])
            self.seconds_before = float(state.get("fit_seconds") or 0.0)
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            text = " ".join(str(err).split())[:200]
            raise DataError(self.checkpoint or "checkpoints/last.ckpt",
                            f"unreadable run state (RNG states, fit time: {type(err).__name__}: {text}); the run "
                            "cannot resume as it was: overwrite=true runs it again") from None
