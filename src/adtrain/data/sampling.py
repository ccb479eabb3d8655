"""The order in which a training epoch sees its samples, a function of (seed, epoch) alone.

A DataLoader left to itself shuffles from torch's global RNG, and draws its workers' base seed from
it too: once per iterator, i.e. every epoch with ``num_workers=0`` but only once with persistent
workers. So the worker count changed which numbers every later draw got (the order of epoch 2 on,
a method's own random draws), and a run resumed with persistent workers did not repeat the
uninterrupted one. `EpochShuffle` draws each epoch's permutation from its own generator seeded by
(seed, epoch) (Lightning calls ``set_epoch`` before each epoch, also after a resume), and every
loader gets a private generator for its base seed (`loader_generator`), so the global RNG is the
model's alone.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def _mix(seed: int, epoch: int) -> int:
    """A 63-bit seed for (seed, epoch): distinct epochs and seeds never share a permutation stream."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    return x % 2**63


class EpochShuffle(Sampler[int]):
    """A permutation of range(n) per epoch, the same whatever the loader's workers and whatever ran
    before (``set_epoch`` chooses it)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def loader_generator(seed: int) -> torch.Generator:
    """A private generator for a DataLoader's worker base seeds (not the global RNG)."""
    return torch.Generator().manual_seed(_mix(seed, -1))
