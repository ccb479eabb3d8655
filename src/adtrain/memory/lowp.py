"""A low-precision (fp16 / bf16) distance pass whose candidates provably hold the exact neighbours.

`certified_search` computes squared distances ||q||^2 - 2 q.m + ||m||^2 with the cross term
q.m in ``dtype`` (tensor cores on a GPU) and the norms in fp32, keeps the ``k + pad`` best
candidates of each query, and certifies per query that they contain every bank item whose fp32
distance could rank among the k nearest: with eps a rigorous bound on |approximate - exact|
squared distance (input rounding, fp32 accumulation, output rounding, fp16 underflow; the fp32
re-ranking's own rounding included), a query is certified when the best excluded candidate is
further than the k-th kept one plus 2 eps. Then any item within the true k nearest (ties
included) is kept, and the exact fp32 re-ranking (`MemoryBank.rerank`, ties by index) returns
exactly the fp32 neighbours. Queries not certified (near ties past the pad) and inputs outside
fp16's range are searched again in fp32 by the caller.
"""

from __future__ import annotations

import math

import torch

from adtrain.errors import ConfigError

DISTANCE_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LOW = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: unit roundoff of each low precision (half an ulp at 1) and of fp32
_UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
_U32 = 2.0 ** -24
#: largest absolute error of rounding a tiny value into the format (fp16 subnormal spacing / 2)
_UNDERFLOW = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}
_FP16_SAFE = 30000.0  # stay well inside fp16's 65504 for every input and product


def resolve_distance_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """None (= the fp32 pass) or the low-precision dtype of the distance pass on ``device``.
    auto: float16 on CUDA (tensor cores), fp32 elsewhere (a CPU has no faster half matmul)."""
    if name not in DISTANCE_DTYPES:
        raise ConfigError("memory.distance_dtype", f"'{name}' is not one of {DISTANCE_DTYPES}")
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else None
    return _LOW.get(name)


def error_bound(q_norm: torch.Tensor, m_norm_max: float, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """eps (M,): |approximate - fp32 reference| squared distance, for queries of norms q_norm
    against bank items of norm at most m_norm_max (generous constants: a loose bound only costs
    fp32 re-searches, never exactness)."""
    u = _UNIT[dtype]
    cross = (2 * u + u * u + u + 1.01 * dim * _U32) * q_norm * m_norm_max  # inputs, accumulation, output
    under = 2 * _UNDERFLOW[dtype] * math.sqrt(dim) * (q_norm + m_norm_max)
    fp32 = 4 * (dim + 8) * _U32 * (q_norm + m_norm_max) ** 2  # fp32 norms, sum, and the reference's rounding
    return 2 * (cross + under) + fp32


def fits_dtype(queries: torch.Tensor, bank: torch.Tensor, dtype: torch.dtype) -> bool:
    """fp16 only: every input and every q.m product far from overflow (bf16 has fp32's range)."""
    if dtype != torch.float16:
        return True
    qn = float(queries.float().norm(dim=1).max()) if queries.numel() else 0.0
    mn = float(bank.float().norm(dim=1).max()) if bank.numel() else 0.0
    return math.isfinite(qn * mn) and qn * mn < _FP16_SAFE and max(qn, mn) < _FP16_SAFE


def certified_search(queries: torch.Tensor, bank: torch.Tensor, k: int, pad: int, dtype: torch.dtype,
                     query_chunk: int, bank_chunk: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates (M, min(K, k+pad)) int64, certified (M,) bool) on ``device`` (default: the
    bank's); the bank is streamed ``bank_chunk`` rows at a time (a host bank to a GPU too)."""
    dev = torch.device(device) if device is not None else bank.device
    q32 = queries.detach().to(dev, torch.float32)
    m, n = q32.shape[0], bank.shape[0]
    kc = min(n, k + pad)
    keep = min(n, kc + 1)  # one more: the best excluded item certifies the kept ones
    qsq = (q32 * q32).sum(dim=1, keepdim=True)
    qlow = q32.to(dtype)
    best_d = torch.full((m, keep), float("inf"), device=dev)
    best_i = torch.zeros(m, keep, dtype=torch.long, device=dev)
    finite = torch.ones(m, dtype=torch.bool, device=dev)
    m_norm_max = 0.0
    for bs in range(0, n, bank_chunk):
        mb = bank[bs: bs + bank_chunk].detach().to(dev, torch.float32, non_blocking=True)
        msq = (mb * mb).sum(dim=1)
        m_norm_max = max(m_norm_max, float(msq.max().sqrt()))
        mlow_t = mb.to(dtype).t()
        kk = min(keep, mb.shape[0])
        for qs in range(0, m, query_chunk):
            sl = slice(qs, qs + query_chunk)
            d = (qlow[sl] @ mlow_t).float().mul_(-2.0).add_(msq).add_(qsq[sl])
            finite[sl] &= torch.isfinite(d).all(dim=1)
            dv, di = torch.topk(d, kk, dim=1, largest=False)
            cat_d = torch.cat([best_d[sl], dv], dim=1)
            cat_i = torch.cat([best_i[sl], di + bs], dim=1)
            sel_d, sel = torch.topk(cat_d, keep, dim=1, largest=False)
            best_d[sl] = sel_d
            best_i[sl] = torch.gather(cat_i, 1, sel)
    if keep == kc:  # the whole bank is kept: nothing excluded, nothing to certify
        return best_i, torch.ones(m, dtype=torch.bool, device=dev)
    eps = error_bound(qsq[:, 0].sqrt(), m_norm_max, q32.shape[1], dtype)
    certified = finite & (best_d[:, kc] > best_d[:, k - 1] + 2 * eps)
    return best_i[:, :kc].contiguous(), certified
