"""Differentiable k-NN distances: indices from a search without gradients, distances in torch.

``nearest_distances`` returns d = sqrt(clamp(sum((q - m)^2), min=eps)) (or the clamped sum
with ``squared=True``) for the k nearest bank items m of each query q. The distances go
through a custom autograd function that never materialises the (M,k,D) gathered items for
the whole batch: forward and backward run in row chunks, so CFA's training step costs
O(M*D) memory instead of O(M*k*D). The gradient is the analytic one, d/dq = (q - m)/d
(zero where the clamp is active), and flows to the bank too when it requires grad.
"""

from __future__ import annotations

import torch

from adtrain.memory.bank import RERANK_PAD, MemoryBank, rerank
from adtrain.memory.fp32 import autocast_off
from adtrain.memory.graph_knn import graph_distances, graph_knn, in_graph
from adtrain.memory.lowp import exact_search

#: rows per chunk: about this many gathered floats. On the CPU 2 MB blocks stay in the heap and the
#: caches (32 MB ones are mapped fresh and page-faulted on every call): DFM's and CFA's shapes run
#: 1.5-3.7x faster forward and backward, with the same bits (benchmarks/gathered_chunk.py)
_ELEMS = {"cpu": 1 << 19}
_ELEMS_DEFAULT = 1 << 23


def _rows(k: int, dim: int, device: torch.device) -> int:
    return max(1, _ELEMS.get(device.type, _ELEMS_DEFAULT) // max(1, k * dim))


class _GatheredDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, bank, idx, eps: float, squared: bool):
        q = queries.float()
        b = bank.float()
        m, k = idx.shape
        step = _rows(k, q.shape[1], q.device)
        sq = torch.empty(m, k, device=q.device)
        for s in range(0, m, step):
            diff = q[s : s + step].unsqueeze(1) - b[idx[s : s + step]]
            sq[s : s + step] = diff.pow_(2).sum(dim=-1)
        active = sq > eps
        sq.clamp_(min=eps)
        out = sq if squared else sq.sqrt()
        ctx.save_for_backward(queries, bank, idx, out, active)
        ctx.squared = squared
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        queries, bank, idx, out, active = ctx.saved_tensors
        # d(sq)/dq = 2 (q - m); d(sqrt(sq))/dq = (q - m) / d
        coef = grad.float() * (2.0 if ctx.squared else 1.0 / out) * active
        q, b = queries.float(), bank.float()
        m, k = idx.shape
        step = _rows(k, q.shape[1], q.device)
        need_q, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gq = torch.empty_like(q) if need_q else None
        gb = torch.zeros_like(b) if need_b else None
        for s in range(0, m, step):
            c = coef[s : s + step].unsqueeze(-1)  # (r,k,1)
            diff = q[s : s + step].unsqueeze(1) - b[idx[s : s + step]]  # (r,k,D)
            w = diff.mul_(c)
            if need_q:
                gq[s : s + step] = w.sum(dim=1)
            if need_b:
                gb.index_add_(0, idx[s : s + step].reshape(-1), w.reshape(-1, w.shape[-1]), alpha=-1.0)
        return (
            gq.to(queries.dtype) if need_q else None,
            gb.to(bank.dtype) if need_b else None,
            None,
            None,
            None,
        )


def gathered_distances(queries, bank, idx, eps: float = 1e-12, squared: bool = False):
    """Distances (M,k) between queries (M,D) and bank[idx] (idx (M,k)), differentiable."""
    if in_graph():  # traced for export: the same distances as plain ops
        return graph_distances(queries, bank, idx, eps=eps, squared=squared)
    return _GatheredDistance.apply(queries, bank, idx.to(bank.device), float(eps), bool(squared))


@autocast_off
def nearest_distances(
    queries: torch.Tensor,
    bank: MemoryBank | torch.Tensor,
    k: int = 1,
    eps: float = 1e-12,
    squared: bool = False,
    bank_chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest bank items of each query: (d (M,k) with gradients, idx (M,k) int64).

    ``bank`` is a MemoryBank (its index finds the neighbours) or a (K,D) tensor (the certified
    exact fp32 search, ``memory.lowp.exact_search``; gradients reach it if it requires grad; while
    traced, ``graph_knn`` over ``bank_chunk`` rows at a time). Queries and bank on the same device.
    """
    with torch.no_grad():
        if isinstance(bank, MemoryBank):
            _, idx = bank.search(queries.detach(), k)
            items = bank.bank
        else:
            items = bank
            fixed = items.detach()
            if in_graph():  # traced: the graph's plain-op search (centred candidates, re-ranked)
                _, idx = graph_knn(queries.detach(), fixed, k, RERANK_PAD, bank_chunk)
            else:  # the certified exact fp32 search (centred on the bank's mean; a query it does
                # not prove is searched again in full), as MemoryBank's fallback
                _, idx = exact_search(queries.detach(), fixed, k, rerank, fixed.device, fixed.float().mean(dim=0))
    if isinstance(bank, MemoryBank):
        return bank_distances(queries, bank, idx, eps=eps, squared=squared), idx.to(queries.device)
    idx = idx.to(items.device)
    return gathered_distances(queries, items, idx, eps=eps, squared=squared), idx


def bank_distances(queries, bank: MemoryBank, idx, eps: float = 1e-12, squared: bool = False):
    """Distances (M,k) between queries (M,D) and the MemoryBank rows idx (M,k), differentiable
    w.r.t. the queries. A bank on another device (``keep_on_host``) sends only those rows."""
    if bank.bank.device == queries.device:
        return gathered_distances(queries, bank.bank, idx, eps=eps, squared=squared)
    sub = bank.gather(idx.to(queries.device)).flatten(0, 1)
    local = torch.arange(sub.shape[0], device=sub.device).view_as(idx)
    return gathered_distances(queries, sub, local, eps=eps, squared=squared)
