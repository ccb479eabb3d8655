"""How many images one CPU model call takes (``inference.cpu_chunk_pixels``): a CPU forward
without gradients runs on chunks of a few images, whose activations stay in the heap and cache
(docs/BENCHMARKS.md, "Chunked CPU inference")."""

from __future__ import annotations

import torch


def cpu_chunk(images: torch.Tensor, pixels: int) -> int:
    """Images per model call (``AnomalyModule.cpu_chunk_pixels``): the whole batch, except for a
    CPU forward without gradients that is not being traced for export."""
    n = int(images.shape[0])
    if (images.device.type != "cpu" or torch.is_grad_enabled() or int(pixels) <= 0 or images.dim() != 4
            or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        return n
    return max(1, int(pixels) // max(1, images.shape[-1] * images.shape[-2]))


def cpu_chunks(images: torch.Tensor, pixels: int) -> list[slice]:
    """The row slices of ``images`` that one model call each takes (``cpu_chunk``)."""
    step = max(1, cpu_chunk(images, pixels))
    return [slice(s, s + step) for s in range(0, int(images.shape[0]), step)]
