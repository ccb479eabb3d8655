"""Exact k-NN for a small bank on the CPU: one fused fp32 pass, certified, re-ranked only as wide
as each query needs.

For a bank of a few thousand rows (CFA's memory: one item per feature-grid position; PatchCore
at a small training set) the general path (FAISS flat for k + 8 candidates, then an exact
re-ranking of all k + 8 by differences, then its certificate) spends as much time gathering and
re-ranking the candidates as in the distance matmul. Here:

1. squared distances ||q||^2 - 2 q.m + ||m||^2 as one GEMM of the augmented vectors
   [-2q, ||q||^2, 1] . [m, 1, ||m||^2] per block of queries, and the ``k + pad + 1`` smallest of
   each row (``topk``). Its rounding error is at most 1.01 (D+2) u (|q| + |m|)^2 (any summation
   order), plus the norms' D u (|q|^2 + |m|^2) and the exact distance's own D u (|q| + |m|)^2:
   within the fp32 term 4 (D+8) u (|q| + |m|)^2 of ``lowp.error_bound``. Full fp32 GEMMs only:
   ``MemoryBank`` does not take this pass where a reduced-precision fp32 matmul is allowed;
2. per query the fp32 error bound eps of that expansion (``lowp.error_bound``): no item whose
   computed distance is above d_(k) + 2 eps can rank among the exact k nearest (ties included),
   so the candidates a query needs are only those at or below d_(k) + 2 eps; the query is
   certified when the first excluded one, d_(k+pad+1), is above that;
3. each certified query is re-ranked by exact differences (``rerank``, ties by bank index) over
   just its needed candidates, rounded up to a width of k, k+1, k+2, k+4, ... k+pad (queries of
   one width together); the others go through ``exact_search`` (a full pass, every tie kept).

The neighbours and their distances are exactly those of the general path (the same exact
re-ranking of a candidate set that provably holds every item that can rank among the k nearest).

For k = 1 (PatchCore's scores) ``dense_nearest`` needs no sort at all: per block of queries (a
few MiB, so the distances stay in cache) the minimum of each group of 64 bank columns (``amin``,
vectorised, about ten times cheaper than ``topk`` or ``min`` with indices) and the row minimum
from those; then the items at or below minimum + 2 eps, looked for only in the groups whose
minimum is (almost always one group and one item). Those items are exactly the candidates the
sorted pass would re-rank (every item that can tie with or beat the nearest), so the neighbours
and distances are the same, bit for bit; a query with more than ``1 + pad`` of them is searched
again in full (``exact_search``), as in the sorted pass.
"""

from __future__ import annotations

import math

import torch

from adtrain.memory.lowp import error_bound, exact_search

#: a query block's distances: about this many floats (32 MiB; smaller blocks slow the GEMM down)
BLOCK_FLOATS = 1 << 23
#: k = 1: a query block's distances, about this many floats (4 MiB, read again from cache)
NEAREST_BLOCK_FLOATS = 1 << 20
#: k = 1: bank columns per group; a row's group minima show which groups can hold candidates
NEAREST_GROUP = 64


def cpu_matmul_dtype() -> torch.dtype:
    """The precision an fp32 matmul really runs at on the CPU: fp32 unless reduced precision is
    allowed (``torch.set_float32_matmul_precision`` below ``highest``: oneDNN may use bf16)."""
    if torch.get_float32_matmul_precision() != "highest":
        return torch.bfloat16
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if str(getattr(mkldnn, "fp32_precision", "ieee")) not in ("ieee", "none", "highest"):
        return torch.bfloat16
    return torch.float32


def widths(k: int, kc: int) -> list[int]:
    """Re-ranking widths: k, k+1, k+2, k+4, ... up to kc (kc included)."""
    out, step = [k], 1
    while out[-1] < kc:
        out.append(min(kc, k + step))
        step *= 2
    return out


@torch.no_grad()
def dense_certified_search(queries: torch.Tensor, bank: torch.Tensor, k: int, pad: int, rerank,
                           m_norm_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d (M,k) exact Euclidean, idx (M,k) int64), ascending, ties by bank index; queries and bank
    on the CPU. ``m_norm_max``: the bank's largest row norm. ``rerank`` is MemoryBank's."""
    q = queries.detach().float()
    b = bank.detach().float()
    m, n = q.shape[0], b.shape[0]
    kc = min(n, k + pad)
    keep = min(n, kc + 1)  # one more: the best excluded item certifies the kept ones
    qsq = (q * q).sum(dim=1)
    # one GEMM gives the whole expansion: [-2q, ||q||^2, 1] . [m, 1, ||m||^2]
    bat = torch.cat([b, torch.ones(n, 1), (b * b).sum(dim=1, keepdim=True)], dim=1).t()
    dv = torch.empty(m, keep)
    di = torch.empty(m, keep, dtype=torch.long)
    rows = max(256, BLOCK_FLOATS // n)
    for s in range(0, m, rows):
        qb = q[s: s + rows]
        qa = torch.cat([qb * -2.0, qsq[s: s + rows].unsqueeze(1), torch.ones(qb.shape[0], 1)], dim=1)
        torch.topk(qa @ bat, keep, dim=1, largest=False, sorted=True, out=(dv[s: s + rows], di[s: s + rows]))
    if keep == kc:  # the whole bank is kept: nothing excluded, every query certified
        return certified_rerank(q, b, di, dv, k, None, rerank)
    eps = error_bound(qsq.sqrt(), m_norm_max, q.shape[1], torch.float32)  # full fp32 GEMM (caller)
    return certified_rerank(q, b, di, dv, k, eps, rerank)


def _overflow_free(q: torch.Tensor, m_norm_max: float) -> bool:
    """Every input finite and every distance of the expansion far below fp32's overflow (and
    below ``_FAR``, the padding columns' distance)."""
    if not (math.isfinite(m_norm_max) and bool(torch.isfinite(q).all())):
        return False
    q_max = float(q.norm(dim=1).max()) if q.numel() else 0.0
    return (q_max + m_norm_max) ** 2 < 1e30


#: k = 1: squared distance of the padding columns (above any distance ``_overflow_free`` admits)
_FAR = 1e35


@torch.no_grad()
def dense_nearest(queries: torch.Tensor, bank: torch.Tensor, pad: int, rerank,
                  m_norm_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``dense_certified_search`` for k = 1 without sorting (module docstring): (d (M,1), idx
    (M,1)), the same values bit for bit. Non-finite or huge inputs take the sorted pass."""
    q = queries.detach().float()
    b = bank.detach().float()
    m, (n, dim) = q.shape[0], b.shape
    if not _overflow_free(q, m_norm_max) or n <= 1 + pad:
        return dense_certified_search(queries, bank, 1, pad, rerank, m_norm_max)
    g = NEAREST_GROUP
    groups = -(-n // g)
    qsq = (q * q).sum(dim=1)
    qa = torch.cat([q * -2.0, qsq.unsqueeze(1), torch.ones(m, 1)], dim=1)
    ba = torch.zeros(groups * g, dim + 2)  # padded to whole groups with far-away columns
    ba[:n, :dim] = b
    ba[:, dim] = 1.0
    ba[:n, dim + 1] = (b * b).sum(dim=1)
    ba[n:, dim + 1] = _FAR
    bat = ba.t()
    slack = 2 * error_bound(qsq.sqrt(), m_norm_max, dim, torch.float32)  # full fp32 GEMM (caller)
    rows = max(64, NEAREST_BLOCK_FLOATS // (groups * g))
    block = torch.empty(min(rows, m), groups * g)
    hit_rows, hit_cols = [], []
    for s in range(0, m, rows):
        e = min(m, s + rows)
        dist = block[: e - s]
        torch.mm(qa[s:e], bat, out=dist)
        by_group = dist.view(e - s, groups, g)
        group_min = by_group.amin(dim=2)
        thr = group_min.amin(dim=1) + slack[s:e]
        # every item at or below thr lies in a group whose minimum is: look only inside those
        pr, pg = torch.nonzero(group_min <= thr.unsqueeze(1), as_tuple=True)  # rows ascending
        pi, pj = torch.nonzero(by_group[pr, pg] <= thr[pr].unsqueeze(1), as_tuple=True)
        hit_rows.append(pr[pi] + s)
        hit_cols.append(pg[pi] * g + pj)
    rows_all, cols_all = torch.cat(hit_rows), torch.cat(hit_cols)
    need = torch.bincount(rows_all, minlength=m)
    start = torch.cumsum(need, dim=0) - need
    d_out = torch.empty(m, 1)
    i_out = torch.empty(m, 1, dtype=torch.long)
    for w in range(1, 2 + pad):  # candidate sets of w items (the sorted pass keeps 1 + pad)
        sel = torch.nonzero(need == w).squeeze(1)
        if sel.numel():
            cand = cols_all[start[sel].unsqueeze(1) + torch.arange(w)]
            d_out[sel], i_out[sel] = rerank(q[sel], b, cand, 1)
    redo = torch.nonzero((need == 0) | (need > 1 + pad)).squeeze(1)  # need 0: a NaN distance row
    if redo.numel():
        d_out[redo], i_out[redo] = exact_search(q[redo], b, 1, rerank)
    return d_out, i_out


def certified_rerank(queries, bank, cand, approx, k: int, eps, rerank, device=None, thr=None, center=None):
    """Exact neighbours from an fp32 expansion pass's sorted candidates ``cand`` / squared distances
    ``approx`` (M, c): no item whose approximate distance is above thr = approx[:, k-1] + 2 eps (eps:
    the pass's error bound per query) can rank among the exact k nearest, ties included. The last
    column certifies (a query is proven when it lies beyond thr; ``eps`` and ``thr`` None: the
    candidates are the whole bank, all proven, none certifies); each proven query is re-ranked
    (``rerank``) over only the columns within thr, rounded up to a width of k, k+1, k+2, k+4, ...;
    the others are searched again over every tie (``exact_search``). ``thr`` given (M,): ``approx``
    holds lower bounds and ``thr`` the bound no candidate that matters is above (lowp.certified_pass).
    ``center``: passed to ``exact_search`` (the bank's mean: tighter bounds there)."""
    m = cand.shape[0]
    if thr is None and eps is not None:
        thr = approx[:, k - 1] + 2 * eps
    if thr is None:
        kc = cand.shape[1]
        need = torch.full((m,), kc, dtype=torch.long, device=cand.device)
        ok = torch.ones(m, dtype=torch.bool, device=cand.device)
    else:
        kc = cand.shape[1] - 1
        ok = torch.isfinite(approx).all(dim=1) & (approx[:, kc] > thr)
        need = (approx[:, :kc] <= thr.unsqueeze(1)).sum(dim=1)
    dev = cand.device if device is None else device
    d_out = torch.empty(m, k, device=dev)
    i_out = torch.empty(m, k, dtype=torch.long, device=dev)
    lower = k - 1
    for w in widths(k, kc):
        sel = torch.nonzero(ok & (need > lower) & (need <= w)).squeeze(1)
        lower = w
        if sel.numel():
            d_out[sel], i_out[sel] = rerank(queries[sel.to(queries.device)], bank, cand[sel, :w], k, device)
    redo = torch.nonzero(~ok).squeeze(1)
    if redo.numel():
        d_out[redo], i_out[redo] = exact_search(queries[redo.to(queries.device)], bank, k, rerank, device, center)
    return d_out, i_out
