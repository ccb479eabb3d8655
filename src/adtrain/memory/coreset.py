"""Memory-bank compression: PatchCore's greedy k-center coreset and FAISS k-means.

``greedy_coreset`` selects the points the plain greedy k-center loop would select (start
point, then repeatedly the point farthest from every centre chosen so far; identical up to
float rounding on near-ties), in a Gaussian random projection of the features. The plain loop costs one pass over all N
projected points per centre, a memory-bound matrix-vector product: about 20 ms per step
for 360k points on two CPU cores, i.e. ~12 min for a 36k-point coreset. Here the work is
reorganised without changing the result:

* a *pool* of the L points with the largest min-distance is kept exactly up to date (one
  small L x d product per step); as long as the pool's best value is at least ``tau``, the
  largest value outside the pool at the time the pool was formed, it is the global argmax;
* the other points are updated lazily, in cache-sized matrix-matrix products against all
  the centres added since their last update, only when the pool runs dry and only for the
  points that can still reach the top (values only decrease, so a stale value is an upper
  bound). On random 128-d data about half of the N x n distance evaluations are skipped;
  on real (low intrinsic dimension) features far more.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from adtrain.errors import AdtrainError
from adtrain.memory.fp32 import autocast_off

_ROW_BLOCK = 4096
_CENTRE_BLOCK = 1024  # 16 MB fp32 tiles: near-peak GEMM, few parallel regions


def random_projection(
    features: torch.Tensor, projection_dim: int = 128, seed: int = 0, chunk: int = 65536,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gaussian random projection (N,D) -> (N,projection_dim), fp32, on ``device`` (default:
    the features'); features elsewhere are moved there ``chunk`` rows at a time.

    The PatchCore paper uses a sparse random projection and the official code a randomly
    initialised linear layer; any Johnson-Lindenstrauss projection serves, Gaussian is used
    here. Features with D <= projection_dim are returned unprojected (as fp32).
    """
    n, dim = features.shape
    dev = torch.device(device) if device is not None else features.device
    if projection_dim <= 0 or dim <= projection_dim:
        return features.to(dev, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(dim, projection_dim, generator=gen) / math.sqrt(projection_dim)
    proj = proj.to(dev)
    out = torch.empty(n, projection_dim, device=dev)
    for s in range(0, n, chunk):
        torch.matmul(features[s : s + chunk].to(dev, torch.float32), proj, out=out[s : s + chunk])
    return out


class _LazyGreedy:
    """State of the pooled/lazy greedy k-center search (see the module docstring)."""

    def __init__(self, proj: torch.Tensor, n_select: int, pool: int):
        self.p = proj
        self.sq = (proj * proj).sum(dim=1)
        n, dim = proj.shape
        dev = proj.device
        self.mind = torch.full((n,), float("inf"), device=dev)
        self.upto = torch.zeros(n, dtype=torch.long, device=dev)  # centres applied so far
        self.cents = torch.empty(n_select, dim, device=dev)
        self.csq = torch.empty(n_select, device=dev)
        self.pool_size = max(1, min(pool, n - 1))
        self.pool_idx: torch.Tensor | None = None
        self.tau = float("inf")

    def add_centre(self, t: int, index: int) -> None:
        self.cents[t] = self.p[index]
        self.csq[t] = self.sq[index]
        self.mind[index] = -1.0  # chosen: never the argmax again (matters for duplicate points)
        if self.pool_idx is not None:
            d = torch.addmv(self.pool_sq + self.csq[t], self.pool_p, self.cents[t], alpha=-2.0)
            torch.minimum(self.pool_val, d.clamp_(min=0.0), out=self.pool_val)

    def _refresh(self, idx: torch.Tensor, t: int) -> None:
        """Apply centres [upto[i], t) to the points idx.

        Points sorted by watermark: the points that still need a centre block form a prefix,
        so each block of centres is one matrix product over that prefix (blocks split at the
        watermarks, so no point sees a centre twice)."""
        marks, order = torch.sort(self.upto[idx])
        idx = idx[order]
        pts, psq = self.p[idx], self.sq[idx]
        best = torch.full((idx.shape[0],), float("inf"), device=pts.device)
        marks_cpu = marks.cpu()
        w0 = int(marks_cpu[0])
        bounds = sorted(set(range(w0, t, _CENTRE_BLOCK)) | set(marks_cpu.unique().tolist()) | {t})
        for c0, c1 in zip(bounds[:-1], bounds[1:]):
            n_rows = int(torch.searchsorted(marks_cpu, c0, right=True))  # points with upto <= c0
            cents, csq = self.cents[c0:c1].t(), self.csq[c0:c1].unsqueeze(0)
            for r in range(0, n_rows, _ROW_BLOCK):
                r1 = min(r + _ROW_BLOCK, n_rows)
                d = torch.addmm(csq, pts[r:r1], cents, alpha=-2.0)
                torch.minimum(best[r:r1], d.amin(dim=1), out=best[r:r1])
        fresh = (best + psq).clamp_(min=0.0)
        self.mind[idx] = torch.minimum(self.mind[idx], fresh)
        self.upto[idx] = t

    def reform_pool(self, t: int) -> None:
        """Bring the true top L+1 points up to date and make the first L the pool.

        Values only decrease, so a stale value is an upper bound: refresh the stale points
        among the current top m (m doubling from 2(L+1)) until the top L+1 are all fresh.
        """
        if self.pool_idx is not None:  # the pool's values are exact: write them back
            self.mind[self.pool_idx] = self.pool_val
            self.upto[self.pool_idx] = t
        n = self.mind.shape[0]
        top = self.pool_size + 1
        m = min(n, 2 * top)
        while True:
            vals, idx = torch.topk(self.mind, m)
            stale = self.upto[idx] < t
            if not bool(stale[:top].any()):
                break
            self._refresh(idx[stale], t)
            m = min(n, 2 * m)
        self.tau = float(vals[top - 1]) if n > self.pool_size else float("-inf")
        self.pool_idx = idx[: self.pool_size]
        self.pool_val = vals[: self.pool_size].clone()
        self.pool_p = self.p[self.pool_idx]
        self.pool_sq = self.sq[self.pool_idx]

    def next_index(self, t: int) -> int:
        """Index of the point farthest from centres [0, t)."""
        if self.pool_idx is None:
            self.reform_pool(t)
        j = int(torch.argmax(self.pool_val))
        if float(self.pool_val[j]) < self.tau:
            self.reform_pool(t)
            j = int(torch.argmax(self.pool_val))
        self.pool_val[j] = -1.0
        return int(self.pool_idx[j])


def coreset_size(n_points: int, ratio: float | None = None, n: int | None = None) -> int:
    """Number of centres for a ratio in (0, 1] or an explicit count (clamped to [1, N])."""
    if (ratio is None) == (n is None):
        raise AdtrainError("greedy_coreset: give exactly one of ratio= or n=")
    if ratio is not None:
        if not 0.0 < ratio <= 1.0:
            raise AdtrainError(f"greedy_coreset: ratio must be in (0, 1], got {ratio}")
        n = int(n_points * ratio)
    return max(1, min(int(n), n_points))


@torch.no_grad()
@autocast_off
def greedy_coreset(
    features: torch.Tensor,
    ratio: float | None = None,
    *,
    n: int | None = None,
    projection_dim: int = 128,
    seed: int = 0,
    pool: int = 4096,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """PatchCore's approximate greedy k-center coreset; returns int64 indices (n,) into features,
    on the features' device.

    Runs on ``device`` (default: the features') in fp32; only the (N, projection_dim) projection
    lives there, so features in host memory need no device copy of their own. Start point:
    uniform random with ``seed``; distances in a ``projection_dim`` Gaussian random projection
    (same seed). Extra memory O(N).
    """
    if features.dim() != 2 or features.shape[0] == 0:
        raise AdtrainError(f"greedy_coreset: expected non-empty (N,D) features, got {tuple(features.shape)}")
    n_points = features.shape[0]
    n_sel = coreset_size(n_points, ratio, n)
    if n_sel == n_points:
        return torch.arange(n_points, device=features.device)
    proj = random_projection(features, projection_dim, seed, device=device)
    gen = torch.Generator().manual_seed(seed)
    start = int(torch.randint(n_points, (1,), generator=gen))
    state = _LazyGreedy(proj, n_sel, pool)
    chosen = [start]
    state.add_centre(0, start)
    bar = tqdm(total=n_sel, desc="coreset", unit="centre", disable=not progress or n_sel < 2000, mininterval=1.0)
    bar.update(1)
    for t in range(1, n_sel):
        idx = state.next_index(t)
        chosen.append(idx)
        if t % 256 == 0:
            bar.update(256)
        state.add_centre(t, idx)
    bar.close()
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


def greedy_coreset_reference(features: torch.Tensor, n: int, projection_dim: int = 128, seed: int = 0):
    """The plain O(N) per step greedy loop (slow; used by tests to check ``greedy_coreset``)."""
    proj = random_projection(features, projection_dim, seed)
    gen = torch.Generator().manual_seed(seed)
    c = int(torch.randint(features.shape[0], (1,), generator=gen))
    sq = (proj * proj).sum(1)
    mind = torch.full_like(sq, float("inf"))
    out = [c]
    for _ in range(n - 1):
        d = (sq - 2.0 * (proj @ proj[c]) + sq[c]).clamp_(min=0.0)
        torch.minimum(mind, d, out=mind)
        c = int(torch.argmax(mind))
        out.append(c)
    return torch.tensor(out, dtype=torch.long, device=features.device)


def kmeans_plus_plus(x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """k-means++ seeding: indices (k,) drawn with probability proportional to squared distance."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    sq = (x * x).sum(dim=1)
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    mind = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    for _ in range(k - 1):
        c = chosen[-1]
        torch.minimum(mind, (sq - 2.0 * (x @ x[c]) + sq[c]).clamp_(min=0.0), out=mind)
        total = float(mind.sum())
        if total <= 0.0:  # fewer distinct points than k: fill with unused indices
            rest = torch.ones(n, dtype=torch.bool)
            rest[chosen] = False
            chosen += torch.nonzero(rest).squeeze(1)[: k - len(chosen)].tolist()
            break
        pick = torch.multinomial((mind / total).cpu().double(), 1, generator=gen)
        chosen.append(int(pick))
    return torch.tensor(chosen[:k], dtype=torch.long)


@torch.no_grad()
def kmeans(features: torch.Tensor, k: int, niter: int = 20, seed: int = 0) -> torch.Tensor:
    """k-means centres (k,D): k-means++ seeding, then FAISS Lloyd iterations (faiss.Kmeans), or
    the same iterations in torch when FAISS is not installed (an empty cluster keeps its centre
    where FAISS splits a large one). Returned on the features' device, fp32."""
    import numpy as np

    n_points, dim = features.shape
    if not 1 <= k <= n_points:
        raise AdtrainError(f"kmeans: k must be in [1, {n_points}], got {k}")
    xt = features.detach().float()
    init_t = xt[kmeans_plus_plus(xt, int(k), seed).to(xt.device)]
    try:
        import faiss
    except ImportError:  # the default install has no FAISS (extras faiss-cpu | faiss-gpu)
        return _lloyd_torch(xt, init_t, int(niter)).to(features.device)
    init = init_t.cpu().numpy()
    x = np.ascontiguousarray(xt.cpu().numpy())
    km = faiss.Kmeans(dim, int(k), niter=int(niter), seed=int(seed), verbose=False,
                      max_points_per_centroid=max(256, math.ceil(n_points / k)))
    km.train(x, init_centroids=np.ascontiguousarray(init))
    return torch.from_numpy(km.centroids.copy()).to(features.device)


def _lloyd_torch(x: torch.Tensor, centres: torch.Tensor, niter: int, chunk: int = 16384) -> torch.Tensor:
    """Lloyd iterations: assign each point to its nearest centre (chunked), move centres to means."""
    c = centres.clone()
    for _ in range(niter):
        assign = torch.cat([torch.cdist(x[i:i + chunk], c).argmin(dim=1) for i in range(0, len(x), chunk)])
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=len(c))
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled].unsqueeze(1).to(c.dtype)
    return c
