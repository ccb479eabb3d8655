"""Exact nearest-neighbour search written with plain tensor ops, for exported graphs.

While a model is traced (TorchScript, ONNX, OpenVINO export) FAISS and the in-place chunked
search of `adtrain.memory.index` cannot be recorded. `in_graph()` tells the memory code to use
`graph_knn` instead: the bank is a constant tensor, read one `chunk` of rows at a time while a
running top-k is kept, so the graph never holds more than (queries x chunk) distances whatever
the bank's size (no (queries x bank) matrix, no giant buffer). The loop is unrolled at trace time
(one block of ops per chunk). The winners' distances are then recomputed by differences (no
||a||^2 - 2ab + ||b||^2 cancellation), as the eager search's re-ranking does.
"""

from __future__ import annotations

import torch

#: bank rows compared at once inside an exported graph
GRAPH_CHUNK = 4096


def in_graph() -> bool:
    """True while a model is traced for export (TorchScript trace or ONNX export)."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def graph_candidates(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = GRAPH_CHUNK,
                     scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (M,k) of the k smallest ``scale_j * ||q - b_j|| + shift_j`` (plain squared distance
    ordering when scale/shift are None: by ||b_j||^2 - 2 q.b_j, the same order) per query, by a
    running top-k over bank chunks. Both sides are centred on the bank's mean first (the same
    distances, smaller norms: a bank far from the origin beside its spread would otherwise lose the
    order to the expansion's cancellation, as the eager search's centring avoids)."""
    center = bank.float().mean(dim=0, keepdim=True)
    q = queries.float() - center
    n = int(bank.shape[0])
    k = min(int(k), n)
    q_sq = (q * q).sum(dim=1, keepdim=True) if scale is not None else None
    # ||b||^2 - 2 q.b as one plain product [q, 1] . [-2 b, ||b||^2] (every elementwise pass over a
    # (queries x chunk) block is memory-bound work of its own, a bias added to a GEMM included);
    # ||q||^2 is the same along a row, so the plain ordering leaves it out; the candidates are
    # re-ranked by exact distance after
    q1 = torch.cat([q, torch.ones_like(q[:, :1])], dim=1)
    best_v = best_i = None
    for c in range(0, n, chunk):
        m = bank[c : c + chunk].float() - center
        d = q1 @ torch.cat([m * -2.0, (m * m).sum(dim=1, keepdim=True)], dim=1).t()
        if scale is not None:
            d = (d + q_sq).clamp(min=0.0).sqrt() * scale[c : c + chunk] + shift[c : c + chunk]
        val, idx = torch.topk(d, min(k, int(m.shape[0])), dim=1, largest=False)
        idx = idx + c
        if best_v is not None:
            val, sel = torch.topk(torch.cat([best_v, val], dim=1), k, dim=1, largest=False)
            idx = torch.gather(torch.cat([best_i, idx], dim=1), 1, sel)
        best_v, best_i = val, idx
    return best_i


def graph_distances(queries: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, eps: float = 1e-12,
                    squared: bool = False) -> torch.Tensor:
    """||q_i - bank[idx[i, j]]|| (M,k) by differences, clamped at eps as `gathered_distances` is."""
    diff = queries.float().unsqueeze(1) - bank.float()[idx]
    sq = diff.pow(2).sum(dim=-1).clamp(min=eps)
    return sq if squared else sq.sqrt()


def graph_knn(queries: torch.Tensor, bank: torch.Tensor, k: int, pad: int = 8,
              chunk: int = GRAPH_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest bank rows: (distances (M,k) ascending, indices (M,k)); k + pad candidates from
    `graph_candidates`, re-ranked by exact distance."""
    cand = graph_candidates(queries, bank, min(int(bank.shape[0]), k + pad), chunk)
    d = graph_distances(queries, bank, cand, eps=0.0)
    d, order = torch.sort(d, dim=1)
    return d[:, :k], torch.gather(cand, 1, order)[:, :k]


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.logsumexp, written out while traced: OpenVINO (2026.4) misreads ONNX ReduceLogSumExp."""
    if not in_graph():
        return torch.logsumexp(x, dim=dim)
    top = x.amax(dim=dim, keepdim=True)
    return (top + (x - top).exp().sum(dim=dim, keepdim=True).log()).squeeze(dim)
