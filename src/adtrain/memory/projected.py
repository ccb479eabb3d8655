"""Exact k-NN on the CPU with the distance pass in p << D dimensions, certified by a lower bound.

For an orthonormal basis V (D, p) of the bank's principal axes (centred at the bank's mean mu),
every squared distance splits exactly into the part in the subspace and the part orthogonal to it:
``||q - m||^2 = ||V^T (q - m)||^2 + ||r_q - r_m||^2`` with ``r = (I - V V^T)(x - mu)``, and by the
triangle inequality ``||r_q - r_m|| >= | |r_q| - |r_m| |``. So

    LB(q, m) = ||q_p - m_p||^2 + (|r_q| - |r_m|)^2  <=  ||q - m||^2,   x_p = V^T (x - mu).

Image features are strongly correlated (CFA's descriptors of a random-init ResNet-18 hold 99.97 %
of the bank's variance in 32 of 448 dimensions; EfficientNet-Lite0's 99.9 % in 64 of 176), so the
bound is tight and nearly every query's neighbours are found from it:

1. LB for every (query, item) pair as one GEMM of width p + 3 per block of queries,
   ``[q_p, |r_q|, |q_p|^2 + |r_q|^2, 1] . [-2 m_p, -2 |r_m|, 1, |m_p|^2 + |r_m|^2]``, and the
   ``k + pad + 1`` smallest of each row; the computed bound is within ``err`` of its exact
   value (``Projection.bound_error``: fp32 projections, generous constants);
2. the exact distances of the ``k + pad`` candidates (``rerank``: by differences, ties by index);
3. a query is certified when its first excluded item, whose exact squared distance is at least
   its bound minus ``err``, is provably further than the k-th candidate, rounding of the exact
   distances included: then every item that can rank among the k nearest is a candidate, and the
   candidates' re-ranking is exactly the flat search's answer (same distances, same indices, ties
   by index). The few queries not certified go through ``exact_search`` (a full pass).

``MemoryBank`` takes this pass for CPU exact searches (``memory.projection``: ``auto``, where the
bank's spectrum gives p + 3 <= (D + 2) / 2; ``off``). docs/BENCHMARKS.md has its speed.
"""

from __future__ import annotations

import torch

from adtrain.memory.dense_exact import widths
from adtrain.memory.lowp import exact_search, tiny_term

_U32 = 2.0 ** -24
#: residual variance share the subspace may leave out (the bound's slack grows with it)
RESIDUAL_SHARE = 1e-3
#: candidates past k kept from the bound (the certificate needs the bound's gap); queries not
#: certified are searched again with 4 x the pad, up to MAX_PAD, then by a full pass
PROJ_PAD = 16
MAX_PAD = 256
#: a query block's bounds: about this many floats (1 MiB: they stay in cache for the top-k)
BLOCK_FLOATS = 1 << 18
PROJECTIONS = ("auto", "off")


class Projection:
    """The bank's subspace (mu, V) and the bank's side of the bound's GEMM, all in fp32."""

    def __init__(self, bank: torch.Tensor, dim: int, spectrum=None):
        mean, _, vecs = spectrum if spectrum is not None else _spectrum(bank)
        # any centre and any near-orthonormal basis work: their rounding is in bound_error
        self.mu = mean.float()
        self.basis = vecs[:, -dim:].flip(1).float().contiguous()  # (D, p), leading axes first
        self.dim, self.full_dim = dim, int(bank.shape[1])
        p, r, sq, norm = self.parts(bank.detach().to("cpu", torch.float32))
        n = bank.shape[0]
        self.bank_aug = torch.cat([-2.0 * p, -2.0 * r.unsqueeze(1), torch.ones(n, 1), sq.unsqueeze(1)],
                                  dim=1).t().contiguous()  # (p + 3, N)
        self.bank_norm_max = float(norm.max())

    def parts(self, x: torch.Tensor):
        """(x_p, |r_x|, |x_p|^2 + |r_x|^2, |x - mu|) for fp32 rows x."""
        centred = x - self.mu
        p = centred @ self.basis
        r = torch.linalg.vector_norm(centred - p @ self.basis.T, dim=1)
        return p, r, (p * p).sum(dim=1) + r * r, torch.linalg.vector_norm(centred, dim=1)

    def query_aug(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented queries (M, p + 3), centred norms |q - mu| (M,)), fp32."""
        p, r, sq, norm = self.parts(queries)
        return torch.cat([p, r.unsqueeze(1), sq.unsqueeze(1), torch.ones(p.shape[0], 1)], dim=1), norm

    def bound_error(self, q_norm: torch.Tensor) -> torch.Tensor:
        """err (M,) float64: |computed - exact| of the bound, generously. The fp32 projection's
        components are each within D u |x - mu| (Cauchy-Schwarz on a unit basis vector), so the
        projected vector within sqrt(p) D u |x - mu|, and the residual as much again through the
        reconstruction; the basis's own rounding, the centring and the GEMM of width p + 3 add
        O((p + 3) u). Every term is at most (|q - mu| + max |m - mu|)^2 in size; values that round
        into (or flush out of) fp32's subnormal range add ``lowp.tiny_term``, whatever the norms."""
        p, d = self.dim, self.full_dim
        c = 4.0 * (p ** 0.5 * (d + p) + 2 * p + 16)
        return c * _U32 * (q_norm.double() + self.bank_norm_max) ** 2 + tiny_term(d + p + 3, torch.float32)


def _spectrum(bank: torch.Tensor):
    """(mean, eigenvalues ascending, eigenvectors) of the bank's centred scatter, float64."""
    b = bank.detach().to("cpu", torch.float64)
    mean = b.mean(dim=0)
    centred = b - mean
    vals, vecs = torch.linalg.eigh(centred.T @ centred)
    return mean, vals, vecs


def _dim_from(vals: torch.Tensor, d: int) -> int | None:
    ev = vals.flip(0).clamp_min(0)
    total = float(ev.sum())
    if total <= 0:
        return None
    share = torch.cumsum(ev, 0) / total
    p = int(torch.searchsorted(share, torch.tensor(1.0 - RESIDUAL_SHARE, dtype=torch.float64))) + 1
    p = min(d, ((p + 7) // 8) * 8)
    return p if 2 * (p + 3) <= d + 2 else None


def choose_dim(bank: torch.Tensor) -> int | None:
    """The smallest multiple of 8 whose principal axes leave at most RESIDUAL_SHARE of the bank's
    variance out, or None where the pass would not be at least twice cheaper than a full one."""
    n, d = bank.shape
    if n < 64 or d < 16:
        return None
    return _dim_from(_spectrum(bank)[1], d)


def projection_for(bank: torch.Tensor) -> Projection | None:
    """The bank's Projection at ``choose_dim``'s dimension, or None; one eigendecomposition."""
    n, d = bank.shape
    if n < 64 or d < 16:
        return None
    spectrum = _spectrum(bank)
    dim = _dim_from(spectrum[1], d)
    return Projection(bank, dim, spectrum) if dim is not None else None


@torch.no_grad()
def projected_search(queries: torch.Tensor, bank: torch.Tensor, k: int, proj: Projection, rerank,
                     pad: int = PROJ_PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """(d (M,k) exact Euclidean, idx (M,k) int64), ascending, ties by bank index: exactly the flat
    search's answer (module docstring). Queries and bank on the CPU; ``rerank`` is MemoryBank's.
    The candidates are re-ranked only as wide as each query needs: the first k + 4 give an upper
    bound U of the k-th exact squared distance, and only candidates whose bound is within U can
    rank among the k nearest (widths k + 4, k + 8, k + 16, ... up to k + pad). Queries the bound
    does not certify are searched again with 4 x the pad (up to MAX_PAD), then by a full pass."""
    q = queries.detach().float()
    m, n = q.shape[0], bank.shape[0]
    kc = min(n, k + pad)
    if kc == n:  # every item is a candidate: the re-ranking alone is exact
        return rerank(q, bank, torch.arange(n).expand(m, n), k)
    keep = kc + 1
    lb = torch.empty(m, keep)
    cand = torch.empty(m, keep, dtype=torch.long)
    q_norm = torch.empty(m)
    rows = max(256, BLOCK_FLOATS // n)  # a block's bounds stay in cache between GEMM and top-k
    for s in range(0, m, rows):
        qa, q_norm[s: s + rows] = proj.query_aug(q[s: s + rows])
        torch.topk(qa @ proj.bank_aug, keep, dim=1, largest=False, sorted=True,
                   out=(lb[s: s + rows], cand[s: s + rows]))
    # exact squared distances computed by differences are within (D + 6) u of the true ones, and
    # an item's exact squared distance is at least its computed bound minus err
    rel = 2.0 * 1.01 * (bank.shape[1] + 6) * _U32
    low = (lb.double() - proj.bound_error(q_norm).unsqueeze(1)) * (1.0 - rel)  # ascending per row
    w0 = min(kc, k + 4)
    d, idx = rerank(q, bank, cand[:, :w0], k)
    upper = d[:, k - 1].double().square() * (1.0 + rel)
    need = (low[:, :kc] <= upper.unsqueeze(1)).sum(dim=1)
    ok = torch.isfinite(lb).all(dim=1) & torch.isfinite(d).all(dim=1) & (low[:, kc] > upper)
    d, idx = d.contiguous(), idx.contiguous()
    lower = w0
    for w in [w for w in widths(k, kc) if w > w0]:
        sel = torch.nonzero(ok & (need > lower) & (need <= w)).squeeze(1)
        lower = w
        if sel.numel():
            d[sel], idx[sel] = rerank(q[sel], bank, cand[sel, :w], k)
    redo = torch.nonzero(~ok).squeeze(1)
    if redo.numel():
        again = projected_search if pad < MAX_PAD and torch.isfinite(q[redo]).all() else None
        d[redo], idx[redo] = (again(q[redo], bank, k, proj, rerank, pad * 4) if again is not None
                              else exact_search(q[redo], bank, k, rerank))
    return d, idx
