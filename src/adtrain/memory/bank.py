"""MemoryBank: streamed feature collection, optional compression, k-NN search."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from adtrain.errors import AdtrainError, ConfigError
from adtrain.memory.coreset import greedy_coreset, kmeans
from adtrain.memory.dense_exact import certified_rerank, cpu_matmul_dtype, dense_certified_search, dense_nearest
from adtrain.memory.graph_knn import graph_knn, in_graph
from adtrain.memory.projected import PROJECTIONS, Projection, projected_search, projection_for
from adtrain.memory.lowp import (DISTANCE_DTYPES, certified_from_rerank, certified_pass,
                             exact_search, fits_dtype, matmul_dtype, max_norm, pair_bound, pair_eps,
                             resolve_distance_dtype)
from adtrain.memory.lowp_nearest import certified_nearest
from adtrain.memory.index import (
    BACKENDS,
    INDEXES,
    build_faiss_index,
    exact_distances,
    faiss_available,
    faiss_num_gpus,
    faiss_search,
    index_to_gpu,
    torch_search,
)

_CPU = torch.device("cpu")
RERANK_PAD = 8  # extra candidates re-ranked by exact distance
LOWP_PAD = 32  # candidates past k kept by the low-precision pass (its certificate needs a gap)
DENSE_PAD = 8  # candidates past k kept by the small-bank CPU pass (memory.dense_exact)
#: candidates past k kept by the flat FAISS pass's second search, of the queries that k + 8 did not
#: certify: only the needed ones are re-ranked exactly, and on dense banks (many items within the
#: fp32 bound of the nearest) a wider gap certifies more queries (each uncertified one costs a
#: full fp32 pass; docs/BENCHMARKS.md)
FLAT_PAD = 128


def tensor_version(t: torch.Tensor) -> int:
    """In-place version counter of ``t``; -1 for an inference tensor (created under
    ``torch.inference_mode``), which has none and cannot be changed in place outside it."""
    try:
        return int(t._version)
    except RuntimeError:
        return -1


def rerank(queries: torch.Tensor, bank: torch.Tensor, cand: torch.Tensor, k: int, device=None):
    """Exact distances of candidate indices, sorted (equal distances by bank index, so every
    backend breaks ties alike); first k columns (d (M,k), idx (M,k)), computed on ``device``
    (default: the bank's)."""
    cand, _ = torch.sort(cand.to(device if device is not None else bank.device), dim=1)
    d = exact_distances(queries, bank, cand, device)
    cand = cand.to(d.device)
    d, order = torch.sort(d, dim=1, stable=True)
    return d[:, :k].contiguous(), torch.gather(cand, 1, order)[:, :k].contiguous()


class MemoryBank(nn.Module):
    """A bank of feature vectors (buffer ``bank``, (K,D) fp32) with k-NN search.

    backend: ``torch`` (exact chunked search on the bank's device), ``faiss`` (CPU FAISS, or
    FAISS GPU when it has GPUs and the queries are on CUDA) or ``auto``: torch when the
    queries are on CUDA and FAISS has no GPU (or FAISS is missing), else FAISS with ``index``,
    except that a ``flat`` index over more than ``AUTO_IVF_ABOVE`` (2,000,000) vectors becomes
    ``ivf``. index: ``flat`` (exact), ``ivf``, ``hnsw``, ``ivfpq`` (approximate). Every
    backend's candidates (k + 8 of them) are re-ranked by exact Euclidean distance.
    keep_on_host: the bank stays in (pinned) host memory when the module moves to a GPU; the
    torch backend then streams it to the queries' GPU in ``bank_chunk`` slices, so GPU memory
    is bounded by the slices, not by the bank (banks larger than the GPU's memory).
    distance_dtype: ``float16`` / ``bfloat16`` run an exact flat search's distance pass in that
    precision, certified per query (memory.lowp) and re-searched in fp32 where not certified,
    so the neighbours are the fp32 ones; ``float32`` never; ``auto`` = float16 for CUDA
    queries, float32 on the CPU. projection: ``auto`` searches a CPU bank of at most
    ``DENSE_MAX_ROWS`` in its principal subspace first, where its spectrum makes that at least
    twice cheaper (memory.projected: a certified lower bound, then the exact re-ranking; the
    same neighbours), ``off`` never.
    """

    AUTO_IVF_ABOVE = 2_000_000
    #: CPU exact search of a bank of at most this many rows (backend auto or torch): one fused,
    #: certified fp32 pass re-ranked only as wide as each query needs (memory.dense_exact)
    DENSE_MAX_ROWS = 8192

    def __init__(
        self,
        backend: str = "auto",
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 8,
        hnsw_m: int = 32,
        pq_m: int = 16,
        search_chunk: int = 16384,
        max_features: int | None = None,
        seed: int = 0,
        bank_chunk: int = 4096,
        hnsw_ef_search: int = 128,
        keep_on_host: bool = False,
        distance_dtype: str = "auto",
        projection: str = "auto",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError("memory.backend", f"'{backend}' is not one of {BACKENDS}")
        if index not in INDEXES:
            raise ConfigError("memory.index", f"'{index}' is not one of {INDEXES}")
        if backend == "faiss" and not faiss_available():
            raise ConfigError("memory.backend", "'faiss' requested but faiss is not installed")
        for key, val in (("search_chunk", search_chunk), ("bank_chunk", bank_chunk), ("nprobe", nprobe)):
            if int(val) < 1:
                raise ConfigError(f"memory.{key}", f"must be >= 1, got {val}")
        if max_features is not None and int(max_features) < 1:
            raise ConfigError("memory.max_features", f"must be >= 1 or null, got {max_features}")
        if distance_dtype not in DISTANCE_DTYPES:
            raise ConfigError("memory.distance_dtype", f"'{distance_dtype}' is not one of {DISTANCE_DTYPES}")
        if projection not in PROJECTIONS:
            raise ConfigError("memory.projection", f"'{projection}' is not one of {PROJECTIONS}")
        self.distance_dtype = distance_dtype
        self.projection = projection
        self.backend, self.index = backend, index
        self.nlist, self.nprobe, self.hnsw_m, self.pq_m = nlist, int(nprobe), int(hnsw_m), int(pq_m)
        self.hnsw_ef_search = int(hnsw_ef_search)
        self.search_chunk, self.bank_chunk = int(search_chunk), int(bank_chunk)
        self.max_features = None if max_features is None else int(max_features)
        self.seed = int(seed)
        self.keep_on_host = bool(keep_on_host)
        self.register_buffer("bank", torch.empty(0, 0))
        self.reset()
        self._invalidate()

    # ---------------------------------------------------------------- collection
    def reset(self) -> None:
        """Forget the features added so far (not the built bank)."""
        self._chunks: list[torch.Tensor] = []
        self._count = 0  # rows held in _chunks
        self._seen = 0  # rows offered to add()
        self._dim: int | None = None
        self._reservoir: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(self.seed)

    @property
    def num_added(self) -> int:
        """Rows offered to add() since the last build() / reset()."""
        return self._seen

    @torch.no_grad()
    def add(self, features: torch.Tensor) -> None:
        """Stream (N,D) features in; they are kept as fp32 chunks on the CPU. With
        ``max_features`` a uniform reservoir sample (seeded) of that size is kept."""
        if features.dim() != 2:
            raise AdtrainError(f"MemoryBank.add: expected (N,D) features, got {tuple(features.shape)}")
        if self._dim is not None and features.shape[1] != self._dim:
            raise AdtrainError(f"MemoryBank.add: feature dim {features.shape[1]} != earlier {self._dim}")
        self._dim = int(features.shape[1])
        f = features.detach().to(_CPU, torch.float32, copy=True)
        start = self._seen
        self._seen += f.shape[0]
        cap = self.max_features
        if self._reservoir is not None:
            self._replace(f, start)
            return
        self._chunks.append(f)
        self._count += f.shape[0]
        if cap is not None and self._count > cap:
            allf = torch.cat(self._chunks)
            self._chunks, self._count = [], 0
            self._reservoir = allf[:cap].clone()
            self._replace(allf[cap:], cap)

    def _replace(self, batch: torch.Tensor, start: int) -> None:
        """Reservoir step for rows start.. start+len(batch)-1 (Algorithm R, vectorised)."""
        cap = self.max_features
        pos = torch.arange(start, start + batch.shape[0], dtype=torch.float64)
        slot = torch.floor(torch.rand(batch.shape[0], generator=self._gen, dtype=torch.float64) * (pos + 1)).long()
        keep = torch.nonzero(slot < cap).squeeze(1)
        if keep.numel() == 0:
            return
        slots = slot[keep].numpy()
        _, last = np.unique(slots[::-1], return_index=True)  # later rows win a shared slot
        rows = keep[torch.from_numpy(len(slots) - 1 - last)]
        self._reservoir[slot[rows]] = batch[rows]

    def _collect(self) -> torch.Tensor:
        if self._reservoir is not None:
            out = self._reservoir
        elif self._chunks:
            out = torch.empty(self._count, self._dim)
            s = 0
            while self._chunks:  # free chunks while copying: peak ~1x the features
                c = self._chunks.pop(0)
                out[s : s + c.shape[0]] = c
                s += c.shape[0]
        else:
            raise AdtrainError("MemoryBank.build: no features were added")
        self.reset()
        return out

    # ---------------------------------------------------------------- bank
    @torch.no_grad()
    def build(
        self,
        coreset_ratio: float | None = None,
        kmeans_k: int | None = None,
        projection_dim: int = 128,
        seed: int = 0,
        device: torch.device | str | None = None,
        coreset=None,
    ) -> "MemoryBank":
        """Concatenate the added features, optionally compress them (greedy coreset of that
        ratio, or k-means to kmeans_k centres), store them as ``bank`` and build the index.
        Compression runs on ``device`` (default: the bank buffer's device); for the coreset only
        the features' (N, projection_dim) random projection is moved there. ``coreset``: a
        callable with greedy_coreset's signature to use instead (memory.nested's cache)."""
        if coreset_ratio is not None and kmeans_k is not None:
            raise ConfigError("memory", "give coreset_ratio or kmeans_k, not both")
        if coreset_ratio is not None and not 0.0 < float(coreset_ratio) <= 1.0:
            raise ConfigError("coreset_ratio", f"must be in (0, 1], got {coreset_ratio}")
        feats = self._collect()
        dev = torch.device(device) if device is not None else self.bank.device
        if coreset_ratio is not None and float(coreset_ratio) < 1.0:
            # only the (N, projection_dim) projection goes to `dev`; the features stay on the host
            idx = (coreset or greedy_coreset)(feats, float(coreset_ratio), projection_dim=projection_dim, seed=seed, device=dev)
            bank = feats[idx]
        elif kmeans_k is not None:
            bank = kmeans(feats, int(kmeans_k), seed=seed)
        else:
            bank = feats
        self.set_bank(bank)
        if self.backend != "torch" and faiss_available():
            self._faiss_index(self.bank.device)
        return self

    @torch.no_grad()
    def set_bank(self, bank: torch.Tensor) -> None:
        """Use ``bank`` (K,D) as the memory (copied to fp32 on this module's device)."""
        if bank.dim() != 2 or bank.shape[0] == 0:
            raise AdtrainError(f"MemoryBank.set_bank: expected non-empty (K,D), got {tuple(bank.shape)}")
        bank = bank.detach().to(self.bank.device, torch.float32).contiguous()
        if self.keep_on_host and torch.cuda.is_available() and not bank.is_pinned():
            bank = bank.pin_memory()  # asynchronous slice copies to the GPU
        self.bank = bank
        self._invalidate()

    def __len__(self) -> int:
        return int(self.bank.shape[0])

    def __bool__(self) -> bool:  # a module is truthy even while its bank is empty
        return True

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Bank items at ``indices`` (any shape) -> indices.shape + (D,), on the indices' device."""
        return self.bank[indices.to(self.bank.device)].to(indices.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "bank"
        if key in state_dict:
            src = state_dict[key]
            self.bank = torch.empty(src.shape, dtype=torch.float32, device=self.bank.device)
            self._invalidate()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        bank = self.bank
        out = super()._apply(fn, *args, **kwargs)
        if self.keep_on_host:  # .to(cuda) / .half() leave a host bank where and what it is
            self.bank = bank
        self._invalidate()
        return out

    # ---------------------------------------------------------------- search
    def _invalidate(self) -> None:
        self._index_cache: dict = {}

    def _require_bank(self) -> torch.Tensor:
        if self.bank.numel() == 0:
            raise AdtrainError("MemoryBank: the bank is empty; call build() or set_bank() first")
        return self.bank

    def resolve_backend(self, queries: torch.Tensor) -> str:
        """'torch' or 'faiss' for these queries (see the class docstring)."""
        if self.backend == "torch" or not faiss_available():
            return "torch"
        if self.backend == "auto" and queries.is_cuda and faiss_num_gpus() == 0:
            return "torch"
        return "faiss"

    def low_precision(self, queries: torch.Tensor, device: torch.device) -> torch.dtype | None:
        """The certified low-precision pass's dtype for these queries, or None (fp32 search):
        only for an exact (flat) search not forced onto FAISS, inputs within the dtype's range."""
        low = resolve_distance_dtype(self.distance_dtype, device)
        if low is None or self.backend == "faiss" or self.resolve_index() != "flat":
            return None
        shift = float(self._bank_center().norm())  # the pass centres both sides on the bank's mean
        return low if fits_dtype(queries, self._bank_max_norm(), low, shift) else None

    def _bank_center(self) -> torch.Tensor:
        """The bank's mean row (fp32, on the bank's device), cached per bank: the low-precision
        pass subtracts it from queries and items (the same distances, smaller norms and bounds)."""
        key = ("center", self.bank.data_ptr(), tuple(self.bank.shape), tensor_version(self.bank))
        if key not in self._index_cache:
            self._index_cache[key] = self.bank.detach().float().mean(dim=0)
        return self._index_cache[key]

    def _centred_max_norm(self) -> float:
        """The largest norm of the bank's rows less their mean (cached per bank)."""
        key = ("centred_max_norm", self.bank.data_ptr(), tuple(self.bank.shape), tensor_version(self.bank))
        if key not in self._index_cache:
            self._index_cache[key] = max_norm(self.bank.detach().float() - self._bank_center())
        return self._index_cache[key]

    def _bank_max_norm(self) -> float:
        key = ("max_norm", self.bank.data_ptr(), tensor_version(self.bank))
        if key not in self._index_cache:
            self._index_cache[key] = max_norm(self.bank)
        return self._index_cache[key]

    def _projection(self) -> Projection | None:
        """The bank's principal subspace for the projected pass (memory.projected), or None
        (``projection=off``, or a spectrum too flat for the pass to pay off); cached per bank."""
        if self.projection == "off":
            return None
        key = ("projection", self.bank.data_ptr(), tuple(self.bank.shape), tensor_version(self.bank))
        if key not in self._index_cache:
            self._index_cache[key] = projection_for(self.bank)
        return self._index_cache[key]

    def dense_exact(self, queries: torch.Tensor, device: torch.device) -> bool:
        """Whether these queries take the small-bank CPU pass (see ``DENSE_MAX_ROWS``)."""
        return (device.type == "cpu" and not queries.is_cuda and self.backend != "faiss"
                and self.resolve_index() == "flat" and len(self) <= self.DENSE_MAX_ROWS
                and self.low_precision(queries, device) is None and cpu_matmul_dtype() == torch.float32)

    def resolve_index(self) -> str:
        if self.backend == "auto" and self.index == "flat" and len(self) > self.AUTO_IVF_ABOVE:
            return "ivf"
        return self.index

    def _faiss_index(self, device: torch.device):
        bank = self._require_bank()
        kind = self.resolve_index()
        key = (kind, bank.data_ptr(), tuple(bank.shape), tensor_version(bank))
        use_gpu = device.type == "cuda" and faiss_num_gpus() > 0 and kind != "hnsw"
        cpu = self._index_cache.get(key)
        if cpu is None:
            self._index_cache = {}
            # centred on the bank's mean (queries too, in search): the same distances, smaller
            # norms, so the flat pass's error bound certifies far more queries (_rerank_flat)
            centred = bank.detach().float() - self._bank_center()
            arr = np.ascontiguousarray(centred.cpu().numpy(), dtype=np.float32)
            cpu = build_faiss_index(arr, kind, self.nlist, self.nprobe, self.hnsw_m, self.pq_m,
                                    self.hnsw_ef_search, self.seed)
            self._index_cache[key] = cpu
        if not use_gpu:
            return cpu
        gkey = key + (str(device),)
        if gkey not in self._index_cache:
            self._index_cache[gkey] = index_to_gpu(cpu, device) or cpu
        return self._index_cache[gkey]

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest bank items of each query: (distances (M,k) Euclidean, indices (M,k) int64),
        ascending, on the queries' device. Chunked over queries (``search_chunk``)."""
        bank = self._require_bank()
        if queries.dim() != 2 or queries.shape[1] != bank.shape[1]:
            raise AdtrainError(
                f"MemoryBank.search: queries {tuple(queries.shape)} do not match bank dim {bank.shape[1]}"
            )
        if not 1 <= k <= bank.shape[0]:
            raise AdtrainError(f"MemoryBank.search: k={k} outside [1, {bank.shape[0]}] (bank size)")
        if queries.shape[0] == 0:
            return (torch.empty(0, k, device=queries.device),
                    torch.empty(0, k, dtype=torch.long, device=queries.device))
        if in_graph():  # traced for export: FAISS and in-place chunking cannot be recorded
            return graph_knn(queries, bank, k, RERANK_PAD, self.bank_chunk)
        kc = min(bank.shape[0], k + RERANK_PAD)
        # a host bank searched by CUDA queries is streamed to their GPU; else the bank's device
        dev = queries.device if queries.is_cuda and not bank.is_cuda else bank.device
        if self.dense_exact(queries, dev):
            proj = self._projection()
            if proj is not None:
                return projected_search(queries, bank, k, proj, rerank)
            if k == 1:
                return dense_nearest(queries, bank, DENSE_PAD, rerank, self._bank_max_norm())
            return dense_certified_search(queries, bank, k, DENSE_PAD, rerank, self._bank_max_norm())
        low = self.low_precision(queries, dev)
        if low is not None and k == 1:  # the nearest item alone: a row minimum, no sort (lowp_nearest)
            d, idx = certified_nearest(queries, bank, low, self.search_chunk, self.bank_chunk, rerank, dev,
                                       center=self._bank_center(), cap=1 + LOWP_PAD)
            return d.to(queries.device), idx.to(queries.device)
        if low is not None:  # certified low-precision pass, re-ranked only as wide as each query needs
            cand, lows, thr = certified_pass(queries, bank, k, LOWP_PAD, low, self.search_chunk, self.bank_chunk,
                                             dev, center=self._bank_center())
            d, idx = certified_rerank(queries, bank, cand, lows, k, None, rerank, dev, thr=thr,
                                      center=self._bank_center())
            return d.to(queries.device), idx.to(queries.device)
        if self.resolve_backend(queries) == "torch":
            cand = torch_search(queries, bank, kc, self.search_chunk, self.bank_chunk, dev)
        else:
            centred = queries.detach().float() - self._bank_center().to(queries.device)
            cand, approx = faiss_search(self._faiss_index(queries.device), centred, kc, self.search_chunk,
                                        distances=True)
            cand = cand.to(dev)
            short = torch.nonzero((cand < 0).any(dim=1)).squeeze(1)
            if short.numel():  # IVF probed lists held fewer than kc items: exact fallback
                cand[short] = torch_search(queries[short.to(queries.device)], bank, kc,
                                           self.search_chunk, self.bank_chunk, dev)
            if self.resolve_index() == "flat" and not short.numel() and kc > k:
                return self._rerank_flat(queries, bank, cand, approx.to(dev), k, dev)
        d, idx = rerank(queries, bank, cand, cand.shape[1], dev)
        if self.resolve_index() == "flat":  # an exact search: prove it, redo what is not proven
            q_norm = queries.detach().float().norm(dim=1)
            ok = certified_from_rerank(d, k, q_norm, self._bank_max_norm(), bank.shape[1], matmul_dtype(dev))
            redo = torch.nonzero(~ok.to(d.device)).squeeze(1)
            d, idx = d[:, :k].contiguous(), idx[:, :k].contiguous()
            if redo.numel():
                d[redo], idx[redo] = exact_search(queries[redo.to(queries.device)], bank, k, rerank, dev,
                                                      self._bank_center())
        d, idx = d[:, :k].contiguous(), idx[:, :k].contiguous()
        return d.to(queries.device), idx.to(queries.device)

    def _rerank_flat(self, queries, bank, cand, approx, k: int, dev):
        """Exact neighbours from an exact (flat) FAISS pass, re-ranking only what can matter:
        with eps the fp32 error bound of FAISS's squared distances of the centred vectors
        (memory.lowp.pair_bound, which has the centring's margin, at the query's centred norm and
        the bank's largest centred norm), the candidates within approx[:, k-1] + 2 eps, certified
        by the last one (memory.dense_exact.certified_rerank, as the small-bank pass). Queries
        that k + 8 candidates do not certify (a dense bank: many items within the bound of the
        nearest) are searched again with k + ``FLAT_PAD`` kept before any full fp32 pass."""
        center = self._bank_center()
        qn = (queries.detach().to(dev, torch.float32) - center.to(dev)).norm(dim=1)
        mn = self._centred_max_norm()
        eps = pair_eps(qn, mn, pair_bound(bank.shape[1], torch.float32))
        wide = min(bank.shape[0], k + FLAT_PAD)
        weak = torch.zeros(cand.shape[0], dtype=torch.bool, device=dev)
        if cand.shape[1] < wide:
            weak = ~(torch.isfinite(approx).all(dim=1) & (approx[:, -1] > approx[:, k - 1] + 2 * eps))
        if not bool(weak.any()):
            d, idx = certified_rerank(queries, bank, cand, approx, k, eps, rerank, dev, center=center)
            return d.to(queries.device), idx.to(queries.device)
        d = torch.empty(cand.shape[0], k, device=dev)
        idx = torch.empty(cand.shape[0], k, dtype=torch.long, device=dev)
        strong = torch.nonzero(~weak).squeeze(1)
        if strong.numel():
            d[strong], idx[strong] = certified_rerank(queries[strong.to(queries.device)], bank, cand[strong],
                                                      approx[strong], k, eps[strong], rerank, dev, center=center)
        weak = torch.nonzero(weak).squeeze(1)
        qw = queries[weak.to(queries.device)]
        c2, a2 = faiss_search(self._faiss_index(queries.device), qw.detach().float() - center.to(qw.device), wide,
                              self.search_chunk, distances=True)
        d[weak], idx[weak] = certified_rerank(qw, bank, c2.to(dev), a2.to(dev), k, eps[weak], rerank, dev,
                                              center=center)
        return d.to(queries.device), idx.to(queries.device)

    def extra_repr(self) -> str:
        size = "empty" if self.bank.numel() == 0 else f"{len(self)}x{self.dim}"
        host = ", keep_on_host=True" if self.keep_on_host else ""
        host += f", distance_dtype={self.distance_dtype}" if self.distance_dtype != "auto" else ""
        return f"bank={size}, backend={self.backend}, index={self.index}{host}"
