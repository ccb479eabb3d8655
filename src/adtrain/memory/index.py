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


_BUILDS_CHECKED = False


def _warn_if_both_builds() -> None:
    """faiss-cpu and faiss-gpu-* install the same module: one overwrites the other (FAISS: pick one)."""
    global _BUILDS_CHECKED
    if _BUILDS_CHECKED:
        return
    _BUILDS_CHECKED = True
    from importlib.metadata import distributions

    names = {(d.metadata["Name"] or "").lower() for d in distributions()}
    found = sorted(n for n in names if n == "faiss-cpu" or n.startswith("faiss-gpu"))
    if "faiss-cpu" in found and len(found) > 1:
        import logging

        logging.getLogger("adtrain").warning(
            "both %s are installed: they provide the same `faiss` module; keep one "
            "(pip uninstall faiss-cpu for GPU search, adtrain's extras faiss-cpu | faiss-gpu)", " and ".join(found))


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    _warn_if_both_builds()
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


#: bytes of rows centred and handed to FAISS at a time (build_faiss_index): 64 MB
ADD_BYTES = 1 << 26


def build_faiss_index(
    bank,
    kind: str,
    nlist: int | None = None,
    nprobe: int = 8,
    hnsw_m: int = 32,
    pq_m: int = 16,
    hnsw_ef_search: int = 128,
    seed: int = 0,
    center: torch.Tensor | None = None,
):
    """CPU FAISS index over ``bank`` (K,D: a float32 array, or a tensor on any device) less
    ``center`` (a (D,) row; None: as it is). The rows reach FAISS ``ADD_BYTES`` at a time, so the
    process holds the bank, FAISS's copy and one slice, not a whole centred copy beside them (3x the
    bank at the build); IVF training, which reads every row at once, takes its centred copy first
    and frees it before the rows are added; HNSW takes them in one add (its storage grows by
    reallocation when added to in slices, which holds more than the one centred copy)."""
    import faiss

    n, dim = bank.shape
    step = max(1, ADD_BYTES // (4 * dim))

    def rows(start: int = 0, stop: int | None = None) -> np.ndarray:
        part = bank[start:stop]
        if torch.is_tensor(part):
            part = part.detach().float()
            if center is not None:
                part = part - center.to(part.device)
            part = part.cpu().numpy()
        elif center is not None:
            part = part - center.detach().float().cpu().numpy()
        return np.ascontiguousarray(part, dtype=np.float32)

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
        index.train(rows())
        index.nprobe = max(1, min(int(nprobe), lists))
    else:
        raise ConfigError("memory.index", f"'{kind}' is not one of {INDEXES}")
    if kind == "flat" and _fill_flat(index, n, dim, rows, step):
        return index
    if kind == "hnsw":  # its storage grows by reallocation slice by slice (worse than one copy)
        index.add(rows())
    else:  # each row's code does not depend on the others: the same index, slice by slice
        for start in range(0, n, step):
            index.add(rows(start, start + step))
    return index


def _fill_flat(index, n: int, dim: int, rows, step: int) -> bool:
    """A flat index's storage (its rows as they are, float32) sized once and filled slice by slice:
    adding slices grew it by reallocation (the old and the new storage at once, the bank 2-3x), one
    add needed the whole centred copy. False where this FAISS build does not expose the storage."""
    import faiss

    try:
        index.codes.resize(n * dim * 4)
        store = faiss.rev_swig_ptr(index.codes.data(), n * dim * 4).view(np.float32).reshape(n, dim)
    except (AttributeError, TypeError, RuntimeError):
        return False
    for start in range(0, n, step):
        store[start:start + step] = rows(start, start + step)
    index.ntotal = n
    return True


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


def faiss_search(index, queries: torch.Tensor, k: int, chunk: int, distances: bool = False):
    """Candidate indices (M,k) int64 on CPU; -1 where the index found fewer than k. With
    ``distances``: (indices, FAISS's squared distances (M,k) fp32, ascending)."""
    m = queries.shape[0]
    out = torch.empty(m, k, dtype=torch.long)
    dist = torch.empty(m, k) if distances else None
    for s in range(0, m, chunk):
        q = np.ascontiguousarray(queries[s : s + chunk].detach().float().cpu().numpy())
        d, idx = index.search(q, k)
        out[s : s + chunk] = torch.from_numpy(idx)
        if dist is not None:
            dist[s : s + chunk] = torch.from_numpy(d)
    return (out, dist) if distances else out


def torch_search(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    query_chunk: int,
    bank_chunk: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Exact k-NN candidates (M,k) int64 on ``device`` (default: the bank's), chunked over
    bank and queries.

    Squared distances via ||q||^2 - 2 q.m + ||m||^2 (clamped at 0). The bank is read one
    ``bank_chunk`` slice at a time, so a bank held in host memory is streamed to a CUDA
    ``device`` slice by slice (once per call): device memory stays about
    query_chunk x bank_chunk distances + one slice, whatever the bank's size.
    """
    dev = torch.device(device) if device is not None else bank.device
    q_all = queries.detach().to(dev, torch.float32)
    m, n_bank = q_all.shape[0], bank.shape[0]
    k = min(k, n_bank)
    qsq_all = (q_all * q_all).sum(dim=1, keepdim=True)
    best_d = torch.full((m, k), float("inf"), device=dev)
    best_i = torch.zeros(m, k, dtype=torch.long, device=dev)
    for bs in range(0, n_bank, bank_chunk):
        mb = bank[bs : bs + bank_chunk].detach().to(dev, torch.float32, non_blocking=True)
        msq = (mb * mb).sum(dim=1).unsqueeze(0)
        kk = min(k, mb.shape[0])
        for qs in range(0, m, query_chunk):
            q = q_all[qs : qs + query_chunk]
            d = torch.addmm(msq, q, mb.t(), alpha=-2.0)
            d.add_(qsq_all[qs : qs + query_chunk]).clamp_(min=0.0)
            dv, di = torch.topk(d, kk, dim=1, largest=False)
            di += bs
            if bs == 0:
                best_d[qs : qs + query_chunk, :kk] = dv
                best_i[qs : qs + query_chunk, :kk] = di
                continue
            cat_d = torch.cat([best_d[qs : qs + query_chunk], dv], dim=1)
            cat_i = torch.cat([best_i[qs : qs + query_chunk], di], dim=1)
            sel_d, sel = torch.topk(cat_d, k, dim=1, largest=False)
            best_d[qs : qs + query_chunk] = sel_d
            best_i[qs : qs + query_chunk] = torch.gather(cat_i, 1, sel)
    return best_i


#: gathered bank rows per chunk of ``exact_distances``, in floats. GPU: large, fewer launches. CPU:
#: 8 MiB; at 32 MiB (glibc's largest mmap threshold) every chunk was mapped afresh and every page
#: faulted (docs/BENCHMARKS.md, "HETMM's matching without page faults")
GATHER_FLOATS_CUDA = 1 << 27
GATHER_FLOATS_CPU = 1 << 21


def exact_distances(
    queries: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """||q_i - bank[idx[i, j]]|| (M,k) by differences (no cancellation), chunked, on ``device``
    (default: the bank's); only the indexed rows of the bank are moved there."""
    dev = torch.device(device) if device is not None else bank.device
    q_all = queries.detach().to(dev, torch.float32)
    idx = idx.to(bank.device)
    m, k = idx.shape
    dim = bank.shape[1]
    rows = max(1, (GATHER_FLOATS_CUDA if dev.type == "cuda" else GATHER_FLOATS_CPU) // max(1, k * dim))
    out = torch.empty(m, k, device=dev)
    for s in range(0, m, rows):
        sl = idx[s : s + rows]
        items = bank.index_select(0, sl.reshape(-1)).to(dev, torch.float32).view(sl.shape[0], k, dim)
        torch.sub(q_all[s : s + rows].unsqueeze(1), items, out=items)  # in place: one pass fewer
        torch.linalg.vector_norm(items, dim=-1, out=out[s : s + rows])  # fused square-sum-root
    return out
