"""k = 1 (PatchCore's patch scores): the certified low-precision pass without sorting.

``lowp.certified_pass`` keeps each query's ``k + pad`` smallest lower bounds with ``topk`` over
every bank column; for the nearest item alone a row minimum is enough. With L = d~ - eps and
U = d~ + eps the per-pair bounds of ``lowp`` (the same GEMM, the same error model), the exact
nearest item (ties included) has L <= its exact distance <= U(j*) for any item j*, so with j* the
item of smallest L, every item that can be the nearest has L <= U(j*). Per block of queries x
bank columns:

1. L - qadj from one GEMM: on CUDA with fp32 output and the per-column term added in its
   epilogue (``addmm(..., out_dtype=float32)``: no fp16 output rounding, no separate passes to
   widen and add), elsewhere the fp16/bf16 product widened and added as in ``certified_pass``;
2. the row minimum (a reduction, not a sort) and its item j*: threshold = min(U(j*), the
   smallest U seen in earlier bank slices);
3. the items at or below the threshold (a comparison and ``nonzero``: almost always a few per
   query); the threshold becomes the smallest U among them (the item of smallest U is always
   among them) and is carried to the next bank slice. It only falls, so anything kept against
   an earlier one is a superset. A row with more than ``max(256, 8 cap)`` items in one block is
   searched again in full fp32 (bounded memory).

At the end the items above a row's final threshold are dropped, and each query's remaining
candidates (at most ``cap``, else a full fp32 search) are re-ranked exactly (``rerank``, ties
by index) in groups of equal width. Rows with non-finite inputs, none
or too many candidates go through ``exact_search``. The neighbours and distances are the exact
fp32 ones, as from ``certified_pass`` + ``certified_rerank``.
"""

from __future__ import annotations

import math

import torch

from adtrain.memory.dense_exact import widths
from adtrain.memory.lowp import _CUDA_BLOCK, augment, exact_search, pair_bound, pair_eps

#: devices on which ``addmm(..., out_dtype=float32)`` of half inputs failed once (older torch)
_NO_OUT_DTYPE: set[str] = set()
#: most candidates a query is re-ranked over (``nearest_cap``), and the bank items one candidate's
#: exact re-ranking is worth: a gather, a difference and a norm of ``dim`` fp32 values (about 12
#: bytes each) against the 2 ``dim`` fp32 flops per item of a full search (a GPU's ~14 flops per
#: byte: ~85 items; a CPU's fewer), rounded down to be safe
CAP_MAX, ITEMS_PER_CANDIDATE = 256, 64


def nearest_cap(n: int, least: int = 33) -> int:
    """Most candidates a query of ``certified_nearest`` is re-ranked over before it is searched
    again in full fp32 instead: ``least`` on a small bank, up to ``CAP_MAX`` where a full search of
    the ``n`` items costs more than that many re-ranked candidates. A dense bank of random-init
    WRN50 features (36,044 items) leaves 10 % of its queries more than 33 fp16 candidates, at most
    119 (docs/BENCHMARKS.md)."""
    return max(least, min(CAP_MAX, n // ITEMS_PER_CANDIDATE))


def _low_minus_qadj(qlow: torch.Tensor, mlow_t: torch.Tensor, madj: torch.Tensor) -> torch.Tensor:
    """fp32 (r, n): the GEMM of the augmented vectors plus the per-column term."""
    dev = str(qlow.device)
    if qlow.is_cuda and dev not in _NO_OUT_DTYPE:
        try:
            return torch.addmm(madj.unsqueeze(0), qlow, mlow_t, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _NO_OUT_DTYPE.add(dev)
    return (qlow @ mlow_t).float().add_(madj)


@torch.no_grad()
def certified_nearest(queries: torch.Tensor, bank: torch.Tensor, dtype: torch.dtype, query_chunk: int,
                      bank_chunk: int, rerank, device=None, center: torch.Tensor | None = None,
                      cap: int = 33) -> tuple[torch.Tensor, torch.Tensor]:
    """(d (M,1) exact Euclidean, idx (M,1) int64) on ``device`` (default: the bank's), the exact
    fp32 nearest bank item of each query, ties by index (module docstring). ``cap``: most
    candidates a query is re-ranked over before it is searched again in full."""
    dev = torch.device(device) if device is not None else bank.device
    cen = None if center is None else center.detach().to(dev, torch.float32).reshape(1, -1)
    q32 = queries.detach().to(dev, torch.float32)
    if cen is not None:
        q32 = q32 - cen
    m, (n, dim) = q32.shape[0], bank.shape
    a, b, c, z = pair_bound(dim, dtype)
    s = math.sqrt(a / 2 + b)

    def augmented(x: torch.Tensor):  # as lowp.certified_pass
        return augment(x, dtype, s, b, c, z)

    def slack(qn: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:  # U - L = 2 eps(|q|, |m|)
        return 2 * pair_eps(qn, mn, (a, b, c, z))

    qlow, qadj, qn = augmented(q32)
    finite = torch.isfinite(qadj) & torch.isfinite(qlow).all(dim=1)
    rows = query_chunk
    if dev.type == "cuda" and bank.device == dev and n * 1024 <= _CUDA_BLOCK:
        bank_chunk, rows = n, max(1, min(query_chunk, _CUDA_BLOCK // n))  # the whole bank per block
    run_u = torch.full((m,), float("inf"), device=dev)  # smallest upper bound seen so far
    over = torch.zeros(m, dtype=torch.bool, device=dev)
    guard = max(256, 8 * cap)  # items past the first threshold that a block may keep per query
    found_r, found_c, found_l = [], [], []
    for bs in range(0, n, bank_chunk):
        mb = bank[bs: bs + bank_chunk].detach().to(dev, torch.float32, non_blocking=True)
        if cen is not None:
            mb = mb - cen
        mlow, madj, mn = augmented(mb)
        finite &= torch.isfinite(madj).all() & torch.isfinite(mlow).all()
        mlow_t = mlow.mul_(-2.0).t()  # exact (a power of two)
        for qs in range(0, m, rows):
            sl = slice(qs, qs + rows)
            x = _low_minus_qadj(qlow[sl], mlow_t, madj)  # L - qadj
            qa = qadj[sl]
            xmin, xarg = x.min(dim=1)
            # U of the block's item of smallest L (fl(min x + qadj) = min fl(x + qadj): monotone)
            thr = torch.minimum(run_u[sl], xmin + qa + slack(qn[sl], mn[xarg]))
            # fl(x + qadj) <= thr implies x <= thr - qadj + 3u(|thr| + |qadj|): a superset, filtered below
            lim = (thr - qa) + 2.0 ** -20 * (thr.abs() + qa.abs()) + 1e-30
            mask = x <= lim.unsqueeze(1)
            many = mask.sum(dim=1) > guard
            if bool(many.any()):
                over[sl] |= many
                mask[many] = False
            r, col = torch.nonzero(mask, as_tuple=True)
            lval = x[r, col] + qa[r]
            upper = lval + slack(qn[sl][r], mn[col])
            thr = thr.scatter_reduce(0, r, upper, "amin")  # the smallest U of the items found
            run_u[sl] = thr
            keep = lval <= thr[r]
            found_r.append(r[keep] + qs)
            found_c.append(col[keep] + bs)
            found_l.append(lval[keep])
    r, col, lval = torch.cat(found_r), torch.cat(found_c), torch.cat(found_l)
    keep = lval <= run_u[r]  # against the final smallest upper bound
    r, col = r[keep], col[keep]
    order = torch.argsort(r * n + col)  # by query, then by item
    r, col = r[order], col[order]
    need = torch.bincount(r, minlength=m)
    start = torch.cumsum(need, dim=0) - need
    ok = finite & ~over & (need >= 1) & (need <= cap)
    d_out = torch.empty(m, 1, device=dev)
    i_out = torch.empty(m, 1, dtype=torch.long, device=dev)
    lower = 0
    for w in widths(1, cap):
        sel = torch.nonzero(ok & (need > lower) & (need <= w)).squeeze(1)
        lower = w
        if sel.numel():  # a shorter row repeats its last candidate (k = 1: no effect on the minimum)
            pos = torch.minimum(torch.arange(w, device=dev).unsqueeze(0), (need[sel] - 1).unsqueeze(1))
            cand = col[start[sel].unsqueeze(1) + pos]
            d_out[sel], i_out[sel] = rerank(queries[sel.to(queries.device)], bank, cand, 1, dev)
    redo = torch.nonzero(~ok).squeeze(1)
    if redo.numel():
        d_out[redo], i_out[redo] = exact_search(queries[redo.to(queries.device)], bank, 1, rerank, dev, center)
    return d_out, i_out
