"""The order in which a training epoch sees its samples, and each sample's random draws: functions of
(seed, epoch) and (seed, epoch, index) alone.

A DataLoader left to itself shuffles from torch's global RNG, and draws its workers' base seed from
it too: once per iterator, i.e. every epoch with ``num_workers=0`` but only once with persistent
workers. So the worker count changed which numbers every later draw got (the order of epoch 2 on,
a method's own random draws), and a run resumed with persistent workers did not repeat the
uninterrupted one. `EpochShuffle` draws each epoch's permutation from its own generator seeded by
(seed, epoch) (Lightning calls ``set_epoch`` before each epoch, also after a resume), and every
loader gets a private generator for its base seed (`loader_generator`), so the global RNG is the
model's alone.

Two more things a worker process used to decide, both now a function of (seed, epoch, index):
- Lightning makes the first training iterator of a process (``FitLoop.setup_data``) before it calls
  ``set_epoch``, and a loader with workers fetches its first indices at once: a run resumed at epoch
  k replayed epoch 0's order. `EpochShuffle` starts at the epoch the trainer is about to run
  (`next_epoch`).
- A training item's random draws (augmentation, synthetic anomalies) came from the torch RNG of the
  worker that loaded it: its stream depended on the worker count and restarted with a resumed
  process. Each index is yielded as a `Draw` carrying its own seed (`item_seed`), which
  `AnomalyDataset` uses instead.
Under DDP `EpochShard` gives each rank its share of that order, with the same draws.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import DistributedSampler, Sampler


def _mix(seed: int, epoch: int) -> int:
    """A 63-bit seed for (seed, epoch): distinct epochs and seeds never share a permutation stream."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    return x % 2**63


class Draw(NamedTuple):
    """A dataset key: the item's index and the seed of its random draws in this epoch."""

    index: int
    seed: int


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index``'s draws in ``epoch`` (distinct per item, epoch and run seed)."""
    return _mix(_mix(seed, epoch), index)


def next_epoch(trainer) -> int:
    """The epoch a trainer is about to run, the value it passes to ``set_epoch`` (after a resume the
    restored loop's count); 0 without a trainer."""
    try:
        return int(trainer.fit_loop.epoch_progress.current.processed)
    except (AttributeError, TypeError, ValueError):
        return 0


class EpochShuffle(Sampler[Draw]):
    """A permutation of range(n) per epoch, the same whatever the loader's workers and whatever ran
    before (``set_epoch`` chooses it; ``epoch``: the first one, see `next_epoch`). Each index comes
    as a `Draw` with the seed of its random draws."""

    def __init__(self, n: int, seed: int, epoch: int = 0):
        self.n, self.seed, self.epoch = int(n), int(seed), int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        return iter([Draw(i, item_seed(self.seed, self.epoch, i)) for i in torch.randperm(self.n, generator=g).tolist()])

    def __len__(self) -> int:
        return self.n


class EpochShard(DistributedSampler):
    """`EpochShuffle` under DDP: this rank's share of the epoch's permutation, each index a `Draw`
    with the same seed it has in a single process. Sharded as torch's DistributedSampler does
    (padded by repeating the permutation's start to a multiple of the world size, then every
    world-th item), and a DistributedSampler itself, so Lightning keeps it rather than putting
    its own (seeded by the global seed, its items' draws left to the workers' RNG) in its place."""

    def __init__(self, n: int, seed: int, rank: int, world: int, epoch: int = 0):
        self.n, self.seed, self.epoch = int(n), int(seed), int(epoch)
        self.rank, self.num_replicas = int(rank), int(world)
        self.num_samples = -(-self.n // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.shuffle, self.drop_last = True, False

    def __iter__(self):
        order = list(EpochShuffle(self.n, self.seed, self.epoch))
        order += (order * (-(-self.total_size // max(len(order), 1))))[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


def loader_generator(seed: int) -> torch.Generator:
    """A private generator for a DataLoader's worker base seeds (not the global RNG)."""
    return torch.Generator().manual_seed(_mix(seed, -1))
