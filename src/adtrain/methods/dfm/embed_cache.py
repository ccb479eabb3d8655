"""Validation features kept while what computes them is unchanged.

DFM validates the untrained start and the end of every round on one fixed validation set, and a
continual run scores every task's validation set once more through its routing after the last task
(schedule.routed_val). Most of a pass's cost is the backbone's forward pass, and with a CNN
backbone that part is frozen: the extractor's per-layer features of a validation batch are the
same at every pass of the run, whatever the adapters, the host's head or the memory do (they act
after it). This cache keeps them per validation batch:

- keyed by the batch's content (a checksum of its images and of the chunks the model takes them
  in): a batch is a hit wherever it comes back (the next pass, another task's training, the routed
  validation), and another batch is never served a stale entry;
- while the modules the cached function depends on are unchanged (``sync`` at the start of each
  pass: ``exact`` modules compared tensor by tensor, ``frozen`` ones by a per-tensor fingerprint;
  a change drops everything). CNN: only the frozen extractor. ViT, whose adapters act inside the
  blocks: the patch features P are cached instead, and a stage-1 step (adapters) or a new
  continual task drops them;
- within ``budget_mb``: an entry that does not fit evicts entries not used in the current pass
  (oldest pass first), never one of the current pass; if it still does not fit it is not kept.

Everything after the cached function (adapters, aggregation, head, matching) runs as in an uncached
pass on the same chunks, so scores and maps equal it bit for bit.

A continual run also keeps whole outputs here (``put``/``lookup`` under ``(batch, "output", pass)``):
each own-validation pass of an open task stores its scores and maps, and when the task ends only
the pass that validated the state the task kept stays (``Dfm._keep_validation_outputs``, states
compared exactly). The routed validation then takes an image routed to its own task from there
instead of matching it again (methods/dfm/continual.py).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map


def _checksum(images: torch.Tensor) -> tuple:
    flat = images.detach().reshape(images.shape[0], -1).double()
    ramp = torch.linspace(1.0, 2.0, flat.shape[1], dtype=torch.float64, device=flat.device)
    return (tuple(images.shape), images.dtype, tuple((flat @ ramp).tolist()), float(flat.sum()))


def fingerprint(modules: list[nn.Module]) -> tuple:
    """Per tensor of the modules' state: name, shape and float64 sum (a frozen module's identity)."""
    return tuple((i, k, tuple(v.shape), float(torch.sum(v.detach(), dtype=torch.float64)))
                 for i, m in enumerate(modules) for k, v in m.state_dict().items())


class ValidationFeatureCache:
    def __init__(self, budget_mb: float = 1024.0) -> None:
        self.budget = int(float(budget_mb) * 2 ** 20)
        self.entries: OrderedDict[tuple, tuple[int, int, list]] = OrderedDict()  # key -> (pass, bytes, outs)
        self.state: dict[str, torch.Tensor] | None = None
        self.frozen: tuple | None = None
        self.nbytes = 0
        self.generation = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def clear(self) -> None:
        self.entries, self.state, self.frozen, self.nbytes = OrderedDict(), None, None, 0

    def sync(self, exact: list[nn.Module], frozen: list[nn.Module] = ()) -> None:
        """Before a validation pass: drop everything if a module the cached function reads changed."""
        now = {f"{i}.{k}": v for i, m in enumerate(exact) for k, v in m.state_dict().items()}
        same = self.state is not None and now.keys() == self.state.keys() and all(
            v.shape == self.state[k].shape and torch.equal(v, self.state[k].to(v.device)) for k, v in now.items())
        prints = fingerprint(list(frozen))
        if not same or prints != self.frozen:
            self.clear()
            self.state = {k: v.detach().clone() for k, v in now.items()}
            self.frozen = prints
        self.generation += 1

    @staticmethod
    def key(images: torch.Tensor, chunks: list[slice]) -> tuple:
        """A batch's identity: its images' checksum and the chunks the model takes them in."""
        return _checksum(images), tuple((c.start, c.stop) for c in chunks)

    def get(self, images: torch.Tensor, chunks: list[slice], fn, key: tuple | None = None) -> list:
        """``fn(images[c])`` for each chunk c: the cached outputs when this batch (same images, same
        chunks) was computed before, else computed (and kept while the budget allows)."""
        key = self.key(images, chunks) if key is None else key
        hit = self.lookup(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        out = [fn(images[c]) for c in chunks]
        self.put(key, out)
        return out

    def lookup(self, key: tuple):
        """The value kept under ``key`` (marked as used in this pass), or None."""
        hit = self.entries.get(key)
        if hit is None:
            return None
        self.entries[key] = (self.generation, hit[1], hit[2])
        self.entries.move_to_end(key)
        return hit[2]

    def put(self, key: tuple, value) -> bool:
        """Keep ``value`` (tensors) under ``key`` if it fits; False if it does not."""
        size = sum(t.numel() * t.element_size() for t in tree_leaves(value))
        old = self.entries.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        if not self._make_room(size):
            return False
        self.entries[key] = (self.generation, size, tree_map(lambda t: t.detach(), value))
        self.nbytes += size
        return True

    def drop(self, keep) -> None:
        """Drop the entries whose key ``keep(key)`` rejects."""
        for key in [k for k in self.entries if not keep(k)]:
            self.nbytes -= self.entries.pop(key)[1]

    def _make_room(self, size: int) -> bool:
        """Evict entries of earlier passes (oldest first) until ``size`` fits; False if it cannot."""
        if size > self.budget:
            return False
        while self.nbytes + size > self.budget:
            key, (gen, nbytes, _) = next(iter(self.entries.items()), (None, (self.generation, 0, None)))
            if key is None or gen >= self.generation:
                return False
            del self.entries[key]
            self.nbytes -= nbytes
        return True
