"""A low-precision (fp16 / bf16) distance pass whose candidates provably hold the exact neighbours.

`certified_search` computes squared distances ||q||^2 - 2 q.m + ||m||^2 with the cross term
q.m in ``dtype`` (tensor cores on a GPU) and the norms in fp32, keeps the ``k + pad`` best
candidates of each query, and certifies per query that they contain every bank item whose fp32
distance could rank among the k nearest: with eps(|q|, |m|) a rigorous bound on |approximate -
exact| squared distance of one pair (input rounding, fp32 accumulation, output rounding, fp16
underflow; the fp32 re-ranking's own rounding included), candidates are ranked by the lower
bound d~ - eps, and a query is certified when the best excluded lower bound is above the k-th
smallest upper bound d~ + eps of the kept ones. Both sides are centred on the bank's mean first
(the same distances, smaller norms): on a dense bank of post-ReLU CNN features this turns a
certificate that held for under 1 % of the queries into one that holds for most
(docs/BENCHMARKS.md). Then any item within the true k nearest (ties included) is kept, and the
exact fp32 re-ranking (`MemoryBank.rerank`, ties by index) returns exactly the fp32 neighbours.
Queries not certified (near ties past the pad) and inputs outside fp16's range are searched again
in fp32 by the caller.
"""

from __future__ import annotations

import math

import torch

from adtrain.errors import ConfigError

DISTANCE_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LOW = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: unit roundoff of each low precision (half an ulp at 1) and of fp32
_UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}
_U32 = 2.0 ** -24
#: largest absolute error of rounding a tiny value into the format: fp16's subnormal spacing / 2;
#: bf16 and fp32 the smallest normal, 2^-126, as hardware that flushes subnormals to zero makes it
#: (Intel AMX's bf16 products, FTZ / DAZ modes); still negligible beside any real feature's eps
_UNDERFLOW = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -126, torch.float32: 2.0 ** -126}
_FP16_SAFE = 30000.0  # stay well inside fp16's 65504 for every input and product
_CUDA_BLOCK = 1 << 28  # distances per (queries x bank) block of a GPU-resident bank (1 GiB in fp32)


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
    return 2 * (cross + under) + fp32 + tiny_term(dim, dtype)


def tiny_term(dim: int, dtype: torch.dtype) -> float:
    """The part of eps that no norm scales: a product or a distance small enough to round into the
    format's subnormal range is off by up to ``_UNDERFLOW`` (fp16's 2^-25 whatever the norms), as
    are the fp32 terms of the pass's and the reference's sums (D + 2 of them); twice that. Without
    it the bound failed on rows whose centred norms are near 1e-3 (fp16)."""
    return 2 * (_UNDERFLOW[dtype] + (dim + 2) * _UNDERFLOW[torch.float32])


def max_norm(x: torch.Tensor) -> float:
    return float(x.detach().float().norm(dim=1).max()) if x.numel() else 0.0


def fits_dtype(queries: torch.Tensor, bank_max_norm: float, dtype: torch.dtype, shift: float = 0.0) -> bool:
    """fp16 only: every input and every q.m product far from overflow (bf16 has fp32's range).
    shift: the norm of a vector subtracted from both sides first (centring; norms grow by it at most)."""
    if dtype != torch.float16:
        return True
    qn, mn = max_norm(queries) + float(shift), float(bank_max_norm) + float(shift)
    return math.isfinite(qn * mn) and qn * mn < _FP16_SAFE and max(qn, mn) < _FP16_SAFE


def pair_bound(dim: int, dtype: torch.dtype) -> tuple[float, float, float, float]:
    """(a, b, c, z) with eps(|q|, |m|) = a |q| |m| + b (|q| + |m|)^2 + c (|q| + |m|) + z:
    ``error_bound`` for one pair of norms (the item's own norm, not the bank's largest), with
    margins for the centring, the augmented column and the adjusted norms of ``certified_pass``;
    z: ``tiny_term`` (the augmented column adds one input)."""
    u = _UNIT[dtype]
    a = 2 * (3 * u + u * u + 1.01 * (dim + 1) * _U32) * (1 + 4 * u)
    b = 4 * (dim + 10) * _U32
    c = 4 * _UNDERFLOW[dtype] * math.sqrt(dim + 1)
    return a, b, c, tiny_term(dim + 1, dtype)


def pair_eps(qn, mn, bound: tuple[float, float, float, float]):
    """``pair_bound``'s eps at query norms ``qn`` and item norms ``mn`` (tensors or floats that
    broadcast): a |q| |m| + b (|q| + |m|)^2 + c (|q| + |m|) + z."""
    a, b, c, z = bound
    return a * qn * mn + b * (qn + mn) ** 2 + c * (qn + mn) + z


def augment(x: torch.Tensor, dtype: torch.dtype, s: float, b: float, c: float, z: float = 0.0):
    """The low-precision pass's side of ``x`` (R, D) fp32: ((R, W) in ``dtype``, the vectors and
    s |x| in column D, W = D + 1 padded to a multiple of 8 for tensor cores), the fp32 per-row
    term |x|^2 - b |x|^2 - c |x| - z / 2 of the lower bound (each side takes half of ``pair_bound``'s
    z), and |x| (``pair_bound``'s b, c and z)."""
    dim = x.shape[1]
    sq = (x * x).sum(dim=1)
    norm = sq.sqrt()
    out = torch.zeros(x.shape[0], -(-(dim + 1) // 8) * 8, device=x.device, dtype=dtype)
    out[:, :dim] = x.to(dtype)
    out[:, dim] = (s * norm).to(dtype)
    return out, sq - b * sq - c * norm - z / 2, norm


def certified_search(queries: torch.Tensor, bank: torch.Tensor, k: int, pad: int, dtype: torch.dtype,
                     query_chunk: int, bank_chunk: int, device=None,
                     center: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates (M, min(K, k+pad)) int64, certified (M,) bool) on ``device`` (default: the
    bank's): ``certified_pass``'s candidates and its certificate."""
    cand, low, thr = certified_pass(queries, bank, k, pad, dtype, query_chunk, bank_chunk, device, center)
    if thr is None:  # the whole bank is kept: nothing excluded, nothing to certify
        return cand, torch.ones(cand.shape[0], dtype=torch.bool, device=cand.device)
    kc = cand.shape[1] - 1
    return cand[:, :kc].contiguous(), torch.isfinite(low).all(dim=1) & (low[:, kc] > thr)


def certified_pass(queries: torch.Tensor, bank: torch.Tensor, k: int, pad: int, dtype: torch.dtype,
                   query_chunk: int, bank_chunk: int, device=None, center: torch.Tensor | None = None):
    """(cand (M, c) int64, low (M, c) fp32 ascending, thr (M,) or None) on ``device`` (default: the
    bank's); the bank is streamed ``bank_chunk`` rows at a time (a host bank to a GPU too). c =
    min(K, k + pad + 1): the k + pad items of smallest lower bound and the best excluded one;
    thr = the k-th smallest upper bound among the k + pad (None when c = K: nothing excluded).
    Every item that can rank among the exact k nearest has its lower bound at or below thr, and
    a query is certified when the excluded item's is above it (``low[:, c-1] > thr``; rows with
    non-finite inputs get infinite bounds: never certified).

    Per pair bounds: each item's approximate squared distance d~ is within eps(|q|, |m|) of the
    fp32 reference (``pair_bound``), so L = d~ - eps is a lower and U = d~ + eps an upper bound.
    The pass keeps the k + pad items of smallest L; a query is certified when the best excluded
    L is above the k-th smallest U of the kept ones (every item that could rank among the k
    nearest, ties included, is then kept). L comes out of the one low-precision GEMM: the
    norm-product part of eps rides in an extra column (s|q| against s|m|, s^2 = a/2 + b), the rest
    in the per-row and per-column terms. ``center`` (e.g. the bank's mean) is subtracted from both
    sides first: distances do not change, the norms, and with them eps, shrink.
    """
    dev = torch.device(device) if device is not None else bank.device
    q32 = queries.detach().to(dev, torch.float32)
    cen = center.detach().to(dev, torch.float32).reshape(1, -1) if center is not None else None
    if cen is not None:
        q32 = q32 - cen
    m, n = q32.shape[0], bank.shape[0]
    dim = q32.shape[1]
    kc = min(n, k + pad)
    keep = min(n, kc + 1)  # one more: the best excluded item certifies the kept ones
    a, b, c, z = pair_bound(dim, dtype)
    s = math.sqrt(a / 2 + b)

    def augmented(x: torch.Tensor):
        return augment(x, dtype, s, b, c, z)

    qlow, qadj, qn = augmented(q32)
    qadj = qadj.unsqueeze(1)
    best_l = torch.full((m, keep), float("inf"), device=dev)
    best_i = torch.zeros(m, keep, dtype=torch.long, device=dev)
    finite = torch.isfinite(qadj[:, 0]) & torch.isfinite(qlow).all(dim=1)  # inputs, not the (M, N) pass
    m_norm = torch.empty(n, device=dev)
    if dev.type == "cuda" and bank.device == dev:  # a resident bank needs no streaming slices: blocks
        bank_chunk = max(bank_chunk, _CUDA_BLOCK // max(1, min(query_chunk, m)))  # of up to 1 GiB
    for bs in range(0, n, bank_chunk):
        mb = bank[bs: bs + bank_chunk].detach().to(dev, torch.float32, non_blocking=True)
        if cen is not None:
            mb = mb - cen
        mlow, madj, mn = augmented(mb)
        m_norm[bs: bs + mb.shape[0]] = mn
        finite &= torch.isfinite(madj).all() & torch.isfinite(mlow).all()
        mlow_t = mlow.mul_(-2.0).t()  # exact (a power of two): one pass less over the (M, N) block
        kk = min(keep, mb.shape[0])
        for qs in range(0, m, query_chunk):
            sl = slice(qs, qs + query_chunk)
            low = (qlow[sl] @ mlow_t).float().add_(madj).add_(qadj[sl])
            lv, li = torch.topk(low, kk, dim=1, largest=False)
            cat_l = torch.cat([best_l[sl], lv], dim=1)
            cat_i = torch.cat([best_i[sl], li + bs], dim=1)
            sel_l, sel = torch.topk(cat_l, keep, dim=1, largest=False)
            best_l[sl] = sel_l
            best_i[sl] = torch.gather(cat_i, 1, sel)
    best_l[~finite] = float("inf")
    if keep == kc:  # the whole bank is kept: nothing excluded, nothing to certify
        return best_i, best_l, None
    kept_n = m_norm[best_i[:, :kc]]
    qk = qn.unsqueeze(1)
    upper = best_l[:, :kc] + 2 * pair_eps(qk, kept_n, (a, b, c, z))
    return best_i, best_l, torch.kthvalue(upper, k, dim=1).values


def matmul_dtype(device: torch.device) -> torch.dtype:
    """The precision an fp32 matmul really runs at: TF32 (fp16's mantissa) on a CUDA device
    allowed to use it, fp32 otherwise; the error bounds of fp32 passes use it."""
    if torch.device(device).type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                                or torch.get_float32_matmul_precision() != "highest"):
        return torch.float16
    return torch.float32


def certified_from_rerank(d: torch.Tensor, k: int, q_norm: torch.Tensor, m_norm_max: float, dim: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """(M,) bool: an exact (flat) fp32 pass's kc candidates, re-ranked (d (M,kc) exact, ascending),
    provably hold every item that could rank among the k nearest: an excluded item's computed
    distance is at least the largest kept one's, so its exact squared distance exceeds
    d[:, kc-1]^2 - 2 eps; certified where that is above d[:, k-1]^2. kc == K: all kept."""
    if d.shape[1] <= k:
        return torch.ones(d.shape[0], dtype=torch.bool, device=d.device)
    eps = error_bound(q_norm.to(d.device), m_norm_max, dim, dtype)
    return d[:, -1].square() - 2 * eps > d[:, k - 1].square()


def exact_search(queries: torch.Tensor, bank: torch.Tensor, k: int, rerank, device=None,
                 center: torch.Tensor | None = None):
    """(d (M,k), idx (M,k)): the exact fp32 neighbours, every tie considered, for the queries no
    certificate covered (near ties past the candidates kept): a full fp32 expansion pass over the
    bank (read in slices: a host bank is streamed, never copied whole), then per query

    - thr = the k-th smallest upper bound d~ + eps(|q|, |m|) among its k + 8 smallest d~ (any k
      items' upper bounds bound the k-th exact distance; eps per pair, ``pair_bound`` with the
      precision the fp32 matmul really runs at, +1 %), and
    - its candidates = every item whose lower bound d~ - eps(|q|, |m|) is at or below thr: each
      item that can rank among the k nearest (exact distance <= thr), ties included;

    each query is re-ranked exactly (``rerank``, ties by index) over only its own candidates,
    queries of one width together (k, k+1, k+2, k+4, ...). ``center`` (e.g. the bank's mean) is
    subtracted from both sides of the expansion first: the same distances, smaller norms and
    bounds (``pair_bound`` has the margin for it). The re-ranking reads the raw vectors."""
    from adtrain.memory.dense_exact import widths

    dev = torch.device(device) if device is not None else bank.device
    q_all = queries.detach().to(dev, torch.float32)
    cen = None if center is None else center.detach().to(dev, torch.float32).reshape(1, -1)
    q32 = q_all if cen is None else q_all - cen
    n, dim = bank.shape
    step = 4096  # the bank is read in slices: a host bank is streamed, never copied whole
    bound = tuple(1.01 * v for v in pair_bound(dim, matmul_dtype(dev)))  # the bounds' own roundings

    def eps(qn: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        return pair_eps(qn, mn, bound)

    m_norm = torch.empty(n, device=dev)
    rows = max(1, (1 << (27 if dev.type == "cuda" else 24)) // max(1, n))  # GPU: fewer, larger blocks
    d_out = torch.empty(q32.shape[0], k, device=dev)
    i_out = torch.empty(q32.shape[0], k, dtype=torch.long, device=dev)
    for s in range(0, q32.shape[0], rows):
        q = q32[s: s + rows]
        qsq = (q * q).sum(dim=1, keepdim=True)
        d = torch.empty(q.shape[0], n, device=dev)
        for b0 in range(0, n, step):
            mb = bank[b0: b0 + step].detach().to(dev, torch.float32, non_blocking=True)
            if cen is not None:
                mb = mb - cen
            msq = (mb * mb).sum(dim=1)
            m_norm[b0: b0 + mb.shape[0]] = msq.sqrt()
            d[:, b0: b0 + mb.shape[0]] = torch.addmm(msq.unsqueeze(0), q, mb.t(), alpha=-2.0)
        d.add_(qsq)
        qn = qsq.sqrt()
        top_d, top_i = torch.topk(d, min(n, k + 8), dim=1, largest=False)
        thr = torch.kthvalue(top_d + eps(qn, m_norm[top_i]), min(k, n), dim=1).values
        d.sub_(eps(qn, m_norm.unsqueeze(0)))  # now each pair's lower bound
        need = (d <= thr.unsqueeze(1)).sum(dim=1).clamp(min=k)  # NaN rows: k
        lower = 0
        for w in widths(k, max(k, int(need.max()))):
            sel = torch.nonzero((need > lower) & (need <= w)).squeeze(1)
            lower = w
            if sel.numel():  # the w smallest lower bounds hold every item at or below thr
                cand = torch.topk(d[sel], w, dim=1, largest=False).indices
                d_out[s + sel], i_out[s + sel] = rerank(q_all[s + sel], bank, cand, k, dev)
    return d_out, i_out
