"""Lightning checkpoint I/O that writes atomically (temp file, then rename)."""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from adtrain.io import torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are complete or absent: a crash mid-save leaves the previous file intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        torch_save(checkpoint, path)
