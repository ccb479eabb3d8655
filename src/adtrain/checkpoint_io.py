"""Lightning checkpoint I/O: writes atomically (temp file, then rename), reads safely (no code runs)."""

from __future__ import annotations

from typing import Any, Callable

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from adtrain.loading import read_checkpoint
from adtrain.io import torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are complete or absent: a crash mid-save leaves the previous file intact.
    Resuming (trainer.fit(ckpt_path=...)) reads through adtrain.loading.read_checkpoint, so a
    crafted last.ckpt is refused with a one-line DataError before anything in it runs."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        torch_save(checkpoint, path)

    def load_checkpoint(self, path: _PATH, map_location: Callable | Any = "cpu",
                        weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is always True here, whatever Lightning asks for: no checkpoint may run code
        return read_checkpoint(path, map_location=map_location if map_location is not None else "cpu")
