"""Small helpers shared by the benchmark scripts: device sync and peak-memory bookkeeping."""

from __future__ import annotations

import resource

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mb(device) -> float | None:
    """Peak GPU memory allocated by torch since the last reset_peak (None off the GPU)."""
    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def peak_mb(device) -> float:
    """Peak GPU memory on a GPU, else the process's peak RSS."""
    gpu = peak_gpu_mb(device)
    return gpu if gpu is not None else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
