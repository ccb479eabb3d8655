"""Pixel-level Template Selection (PTS): compress N template sheets into a K-sheet tiny set.

Per layer and per spatial position (the paper's "per_position" mode):
1. cosine distances D = 1 - <x_i, x_j> of the N (L2-normalised) template vectors there;
2. OPTICS (xi extraction, min_samples = max(2, N // K), max_eps = inf) on D;
3. easy normals: one cosine medoid per cluster (member with the smallest summed distance to
   its cluster; noise excluded); more than K clusters -> the K largest clusters' medoids;
   no cluster at all -> the medoid of all N (as the official code does);
4. hard normals: greedily add the unchosen vector with the smallest summed cosine similarity
   to those already chosen, until K.
N <= K returns all N sheets unchanged.

Speed: sklearn's OPTICS spends ~130 ms per call on input validation for N=200, i.e. ~9 minutes
for a 64x64 grid. ``optics_backend="torch"`` (default) computes the same OPTICS graph (core
distances, ordering, reachability, predecessors; same tie-breaking and rounding as
sklearn.cluster.compute_optics_graph with a precomputed matrix) vectorised over positions, then
runs sklearn's own ``cluster_optics_xi`` per position. ``optics_backend="sklearn"`` calls
``sklearn.cluster.OPTICS(metric="precomputed")`` per position (reference; tests check both agree).
``pts_positions="per_image"`` is a fast approximation (not the paper): one OPTICS on the
position-averaged distance matrix, the same K sheets kept at every position.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
from sklearn.cluster import OPTICS, cluster_optics_xi

from adtrain.errors import ConfigError

__all__ = ["PTSResult", "pts_select", "pts_compress", "optics_labels"]

POSITIONS = ("per_position", "per_image")
BACKENDS = ("torch", "sklearn")


class PTSResult(NamedTuple):
    """templates (K',C,H,W); indices (K',H,W) into the N input sheets (easy normals first);
    n_easy (H,W) number of easy normals per position. K' = min(K, N)."""

    templates: torch.Tensor
    indices: torch.Tensor
    n_easy: torch.Tensor


def _round15(x: torch.Tensor) -> torch.Tensor:
    """In place, exactly as np.around(x, 15) (multiply, round half even, divide)."""
    return x.mul_(1e15).round_().div_(1e15)


def _optics_graph(dist: torch.Tensor, min_samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OPTICS graph for P precomputed (N,N) float64 matrices at once, as sklearn computes it
    (max_eps=inf, same rounding and tie-breaking): ordering, reachability, predecessor (P,N).

    The sequential loop uses arithmetic only (bool-mask ops are slow on CPU): processed points
    carry +inf, unreached ones the largest finite float, so one argmin picks the next point."""
    p, n, _ = dist.shape
    dev, dt = dist.device, dist.dtype
    inf = float("inf")
    core = _round15(dist.topk(min_samples, dim=2, largest=False).values[:, :, -1].contiguous())
    big = torch.finfo(dt).max
    key = torch.full((p, n), big, dtype=dt, device=dev)
    penalty = torch.zeros(p, n, dtype=dt, device=dev)  # +inf once processed
    pred = torch.full((p, n), -1.0, dtype=dt, device=dev)
    better = torch.empty(p, n, dtype=dt, device=dev)
    ordering = torch.empty(n, p, dtype=torch.long, device=dev)
    reach_at = torch.empty(n, p, dtype=dt, device=dev)
    rows = torch.arange(p, device=dev)
    flat = dist.reshape(p * n, n)
    for step in range(n):
        point = key.argmin(dim=1)  # smallest reachability, first index on ties
        ordering[step] = point
        reach_at[step] = key[rows, point]
        key[rows, point] = inf
        penalty[rows, point] = inf
        rd = flat.index_select(0, rows * n + point)  # (P,N) distances from the point
        torch.maximum(rd, core[rows, point].unsqueeze(1), out=rd)
        _round15(rd).add_(penalty)
        torch.lt(rd, key, out=better)  # strict improvement, unprocessed only
        pred.addcmul_(better, point.to(dt).unsqueeze(1) - pred)
        torch.minimum(key, rd, out=key)
    ordering = ordering.t().contiguous()
    reach = torch.empty(p, n, dtype=dt, device=dev).scatter_(1, ordering, reach_at.t())
    reach = reach.masked_fill(reach >= big, inf)
    return ordering, reach, pred.long()


def optics_labels(dist: torch.Tensor, min_samples: int, backend: str = "torch") -> torch.Tensor:
    """OPTICS (xi) cluster labels (P,N), -1 = noise, for P precomputed (N,N) distance matrices."""
    if backend not in BACKENDS:
        raise ConfigError("method.optics_backend", f"must be one of {BACKENDS}, got {backend!r}")
    d64 = dist.double()
    out = np.empty(tuple(d64.shape[:2]), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "all reachability values are inf" etc.
        if backend == "sklearn":
            d_np = d64.cpu().numpy()
            for i in range(d_np.shape[0]):
                out[i] = OPTICS(min_samples=min_samples, metric="precomputed").fit_predict(d_np[i])
        else:
            ordering, reach, pred = (x.cpu().numpy() for x in _optics_graph(d64, min_samples))
            for i in range(out.shape[0]):
                out[i] = cluster_optics_xi(
                    reachability=reach[i], predecessor=pred[i], ordering=ordering[i],
                    min_samples=min_samples,
                )[0]
    return torch.from_numpy(out).to(dist.device)


def _select(dist: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Easy + hard normal indices (P,k) and easy counts (P,) from cosine distances (P,N,N)
    and OPTICS labels (P,N). Smallest summed similarity == largest summed distance."""
    p, n, _ = dist.shape
    dev = dist.device
    n_clu = int(labels.max().item()) + 1 if labels.numel() else 0
    sel = torch.full((p, k), -1, dtype=torch.long, device=dev)
    count = torch.zeros(p, dtype=torch.long, device=dev)
    rows = torch.arange(p, device=dev)
    if n_clu > 0:
        onehot = torch.zeros(p, n, n_clu + 1, dtype=dist.dtype, device=dev)
        onehot.scatter_(2, (labels + 1).unsqueeze(2), 1.0)  # column 0 = noise
        onehot = onehot[:, :, 1:].contiguous()  # (P,N,nc)
        to_clu = torch.bmm(dist, onehot)  # summed distance of each point to each cluster
        member = onehot.transpose(1, 2).bool()  # (P,nc,N)
        cost = to_clu.transpose(1, 2).masked_fill(~member, float("inf"))
        medoid = cost.argmin(dim=2)  # (P,nc), first index on ties
        size = member.sum(dim=2)  # (P,nc), 0 for labels absent at this position
        # largest clusters first (stable: lower label on ties); absent ones sort last
        order = torch.sort(size, dim=1, descending=True, stable=True).indices[:, :k]
        ok = size.gather(1, order) > 0
        m = order.shape[1]
        sel[:, :m] = torch.where(ok, medoid.gather(1, order), sel[:, :m])
        count = ok.sum(dim=1)
    n_easy = count.clone()
    empty = count == 0  # no cluster: start from the medoid of all N (official behaviour)
    if bool(empty.any()):
        sel[empty, 0] = dist[empty].sum(dim=2).argmin(dim=1)
        count = torch.where(empty, torch.ones_like(count), count)
    # hard normals; chosen points carry -inf in `taken` (arithmetic only: fast on CPU)
    taken = torch.zeros(p, n + 1, dtype=dist.dtype, device=dev)  # column n absorbs the -1s
    taken.scatter_(1, torch.where(sel < 0, n, sel), float("-inf"))
    taken = taken[:, :n].contiguous()
    score = torch.bmm(dist, torch.isinf(taken).to(dist.dtype).unsqueeze(2)).squeeze(2)
    flat = dist.reshape(p * n, n)
    for _ in range(k - int(count.min().item())):
        active = count < k
        pick = (score + taken).argmax(dim=1)  # first index on ties
        slot = count.clamp(max=k - 1)
        sel[rows, slot] = torch.where(active, pick, sel[rows, slot])
        # rows already full keep going harmlessly: their picks are never recorded
        taken[rows, pick] = float("-inf")
        score += flat.index_select(0, rows * n + pick)  # dist is symmetric
        count = count + active.long()
    return sel, n_easy


def _cosine_dist(x: torch.Tensor) -> torch.Tensor:
    """(P,N,C) unit vectors -> (P,N,N) float64 distances 1 - <x_i, x_j>: symmetric, >= 0,
    zero diagonal (symmetry makes medoid ties resolve to the lower index)."""
    sim = torch.bmm(x, x.transpose(1, 2)).double()
    dist = (sim + sim.transpose(1, 2)).mul_(-0.5).add_(1.0).clamp_min_(0.0)  # exactly symmetric
    dist.diagonal(dim1=1, dim2=2).zero_()
    return dist


def pts_select(
    templates: torch.Tensor,
    k: int,
    pts_positions: str = "per_position",
    optics_backend: str = "torch",
    position_chunk: int | None = None,
) -> PTSResult:
    """Select a K-sheet tiny set from templates (N,C,H,W) (L2-normalised over C)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("method.templates", f"the tiny-set size K must be a positive int, got {k!r}")
    if pts_positions not in POSITIONS:
        raise ConfigError("method.pts_positions", f"must be one of {POSITIONS}, got {pts_positions!r}")
    n, c, h, w = templates.shape
    dev = templates.device
    if n <= k:
        idx = torch.arange(n, device=dev).view(n, 1, 1).expand(n, h, w).clone()
        return PTSResult(templates.clone(), idx, torch.zeros(h, w, dtype=torch.long, device=dev))
    min_samples = max(2, n // k)
    flat = templates.reshape(n, c, h * w)
    if position_chunk is None:  # (P,N,N) float64 blocks of ~16 MB (CPU caches), ~512 MB on a GPU
        budget = (16 << 20) if dev.type == "cpu" else (512 << 20)
        position_chunk = max(1, min(h * w, budget // (8 * n * n)))
    if pts_positions == "per_image":
        dist = torch.zeros(1, n, n, dtype=torch.float64, device=dev)
        for p0 in range(0, h * w, position_chunk):
            xc = flat[:, :, p0 : p0 + position_chunk].permute(2, 0, 1).float().contiguous()
            dist += _cosine_dist(xc).sum(0, keepdim=True)
        dist /= h * w
        sel, n_easy = _select(dist, optics_labels(dist, min_samples, optics_backend), k)
        idx = sel[0].view(k, 1, 1).expand(k, h, w).clone()
        return PTSResult(templates[sel[0]].clone(), idx, n_easy.view(1, 1).expand(h, w).clone())
    out = torch.empty(k, c, h * w, dtype=templates.dtype, device=dev)
    idx = torch.empty(k, h * w, dtype=torch.long, device=dev)
    easy = torch.empty(h * w, dtype=torch.long, device=dev)
    for p0 in range(0, h * w, position_chunk):
        raw = flat[:, :, p0 : p0 + position_chunk].permute(2, 0, 1)  # (P,N,C)
        dist = _cosine_dist(raw.float().contiguous())
        sel, n_easy = _select(dist, optics_labels(dist, min_samples, optics_backend), k)
        p1 = p0 + sel.shape[0]
        out[:, :, p0:p1] = torch.gather(raw, 1, sel.unsqueeze(2).expand(-1, -1, c)).permute(1, 2, 0)
        idx[:, p0:p1] = sel.t()
        easy[p0:p1] = n_easy
    return PTSResult(out.reshape(k, c, h, w), idx.reshape(k, h, w), easy.reshape(h, w))


def pts_compress(templates: torch.Tensor, k: int, **kwargs) -> torch.Tensor:
    """The tiny set only: (min(K,N),C,H,W)."""
    return pts_select(templates, k, **kwargs).templates
