"""Nearest-neighbour search back ends: FAISS indexes and an exact chunked torch search.

Both return candidate indices only; ``MemoryBank`` recomputes the distances of the
candidates exactly (difference, not the ||q||^2 - 2 q.m + ||m||^2 expansion) and re-ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from adtrain.errors import ConfigError

INDEXES = ("flat", "ivf", "hnsw", "ivfpq")
BACKENDS = ("auto", "faiss", "torch")

_GPU_RESOURCES = None


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_num_gpus() -> int:
    if not faiss_available():
        return 0
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def default_nlist(n: int) -> int:
    """IVF lists: ~4 sqrt(N), at most N/39 (FAISS wants >= 39 training points per list)."""
    return int(max(1, min(4 * math.sqrt(n), n // 39, 65536)))


def _pq_m(dim: int, wanted: int) -> int:
    """Largest divisor of dim not above ``wanted`` (PQ needs dim % m == 0)."""
    for m in range(max(1, min(wanted, dim)), 0, -1):
        if dim % m == 0:
            return m
    return 1


def build_faiss_index(
    bank: np.ndarray,
    kind: str,
    nlist: int | None = None,
    nprobe: int = 8,
    hnsw_m: int = 32,
    pq_m: int = 16,
    hnsw_ef_search: int = 128,
    seed: int = 0,
):
    """CPU FAISS index over ``bank`` (K,D float32, C-contiguous)."""
    import faiss

    n, dim = bank.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m))
        index.hnsw.efConstruction = max(40, 2 * int(hnsw_m))
        index.hnsw.efSearch = int(hnsw_ef_search)
    elif kind in ("ivf", "ivfpq"):
        lists = int(nlist) if nlist else default_nlist(n)
        lists = max(1, min(lists, n))
        quantizer = faiss.IndexFlatL2(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_L2)
        else:
            # codebooks of 2^nbits centres, >= 39 training points each where possible
            nbits = int(max(4, min(8, math.floor(math.log2(max(n, 2) / 39)))))
            index = faiss.IndexIVFPQ(quantizer, dim, lists, _pq_m(dim, int(pq_m)), nbits)
        index.cp.seed = int(seed)
        index.train(bank)
        index.nprobe = max(1, min(int(nprobe), lists))
    else:
        raise ConfigError("memory.index", f"'{kind}' is not one of {INDEXES}")
    index.add(bank)
    return index


def index_to_gpu(index, device: torch.device):
    """Copy a CPU index to the FAISS GPU of ``device``; None where FAISS cannot (e.g. HNSW)."""
    import faiss

    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    gpu_id = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES, int(gpu_id), index)
    except (RuntimeError, AttributeError):
        return None


def faiss_search(index, queries: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Candidate indices (M,k) int64 on CPU; -1 where the index found fewer than k."""
    m = queries.shape[0]
    out = torch.empty(m, k, dtype=torch.long)
    for s in range(0, m, chunk):
        q = np.ascontiguousarray(queries[s : s + chunk].detach().float().cpu().numpy())
        _, idx = index.search(q, k)
        out[s : s + chunk] = torch.from_numpy(idx)
    return out


def torch_search(
    queries: torch.Tensor, bank: torch.Tensor, k: int, query_chunk: int, bank_chunk: int
) -> torch.Tensor:
    """Exact k-NN candidates (M,k) int64 on the bank's device, chunked over queries and bank.

    Squared distances via ||q||^2 - 2 q.m + ||m||^2 (clamped at 0); peak memory about
    query_chunk x bank_chunk floats.
    """
    q_all = queries.detach().to(bank.device, torch.float32)
    bank = bank.detach().float()
    bsq = (bank * bank).sum(dim=1)
    n_bank = bank.shape[0]
    out = torch.empty(q_all.shape[0], k, dtype=torch.long, device=bank.device)
    for qs in range(0, q_all.shape[0], query_chunk):
        q = q_all[qs : qs + query_chunk]
        qsq = (q * q).sum(dim=1, keepdim=True)
        best_d = best_i = None
        for bs in range(0, n_bank, bank_chunk):
            mb = bank[bs : bs + bank_chunk]
            d = torch.addmm(bsq[bs : bs + bank_chunk].unsqueeze(0), q, mb.t(), alpha=-2.0)
            d.add_(qsq).clamp_(min=0.0)
            dv, di = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
            di += bs
            if best_d is None:
                best_d, best_i = dv, di
            else:
                cat_d = torch.cat([best_d, dv], dim=1)
                cat_i = torch.cat([best_i, di], dim=1)
                best_d, sel = torch.topk(cat_d, min(k, cat_d.shape[1]), dim=1, largest=False)
                best_i = torch.gather(cat_i, 1, sel)
        out[qs : qs + query_chunk] = best_i
    return out


def exact_distances(queries: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """||q_i - bank[idx[i, j]]|| (M,k) by differences (no cancellation), chunked, on the bank's device."""
    q_all = queries.detach().to(bank.device, torch.float32)
    m, k = idx.shape
    dim = bank.shape[1]
    rows = max(1, (1 << 23) // max(1, k * dim))
    out = torch.empty(m, k, device=bank.device)
    for s in range(0, m, rows):
        diff = q_all[s : s + rows].unsqueeze(1) - bank[idx[s : s + rows]].float()
        out[s : s + rows] = diff.pow_(2).sum(dim=-1).sqrt_()
    return out
