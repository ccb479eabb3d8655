"""Validation embeddings kept while DFM's extractor is unchanged.

DFM validates the untrained start and the end of every round on one fixed validation set. With the
default schedule (no adapter epochs) only the memory trains, so the patch features P of every
validation image are the same at each pass, and recomputing them is most of validation's cost (the
backbone's forward pass). This cache keeps P per validation batch and hands it back while

- the extractor's trainable state (adapters and the host's head, parameters and buffers) equals the
  state P was computed under (compared exactly: a stage-1 step or a new task's state clears it), and
- the batch's images are the ones cached under that batch index (a checksum of the input), and
- the cached tensors fit in ``budget_mb`` (batches past it are recomputed, never evicted mid-epoch).

The matching head (FMN) always runs, so scores and maps equal an uncached pass exactly.
"""

from __future__ import annotations

import torch
from torch import nn


def _checksum(images: torch.Tensor) -> tuple:
    flat = images.detach().reshape(images.shape[0], -1).double()
    ramp = torch.linspace(1.0, 2.0, flat.shape[1], dtype=torch.float64, device=flat.device)
    return (tuple(images.shape), images.dtype, tuple((flat @ ramp).tolist()), float(flat.sum()))


class EmbeddingCache:
    def __init__(self, budget_mb: float = 1024.0) -> None:
        self.budget = int(float(budget_mb) * 2 ** 20)
        self.entries: dict[tuple, tuple[tuple, list[torch.Tensor]]] = {}
        self.state: dict[str, torch.Tensor] | None = None
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def clear(self) -> None:
        self.entries, self.state, self.nbytes = {}, None, 0

    def sync(self, modules: list[nn.Module]) -> None:
        """Before a validation pass: drop everything if the extractor's trainable state changed."""
        now = {f"{i}.{k}": v for i, m in enumerate(modules) for k, v in m.state_dict().items()}
        same = self.state is not None and now.keys() == self.state.keys() and all(
            v.shape == self.state[k].shape and torch.equal(v, self.state[k].to(v.device)) for k, v in now.items())
        if not same:
            self.clear()
            self.state = {k: v.detach().clone() for k, v in now.items()}

    def embeddings(self, key: tuple, images: torch.Tensor, chunks: list[slice], embed) -> list[torch.Tensor]:
        """P of each chunk of ``images``: cached under ``key`` when the images match, else computed
        by ``embed(chunk)`` (and kept while the budget allows)."""
        check = _checksum(images)
        hit = self.entries.get(key)
        if hit is not None and hit[0] == check:
            self.hits += 1
            return hit[1]
        self.misses += 1
        out = [embed(images[c]) for c in chunks]
        size = sum(t.numel() * t.element_size() for t in out)
        old = 0 if hit is None else sum(t.numel() * t.element_size() for t in hit[1])
        if self.nbytes - old + size <= self.budget:
            self.entries[key] = (check, [t.detach() for t in out])
            self.nbytes += size - old
        return out
