"""MemoryBank's k-NN search: which exact or approximate pass runs for these queries on this
device (FAISS or torch, certified low precision, the small-bank pass, the projected pass), and
the exact re-ranking of their candidates. ``BankSearch`` is MemoryBank's search half; it reads
the bank and the settings the bank module holds (adtrain.memory.bank)."""

from __future__ import annotations

import torch

from adtrain.errors import AdtrainError
from adtrain.memory.dense_exact import certified_rerank, cpu_matmul_dtype, dense_certified_search, dense_nearest
from adtrain.memory.fp32 import autocast_off
from adtrain.memory.graph_knn import graph_knn, in_graph
from adtrain.memory.index import (ADD_BYTES, build_faiss_index, exact_distances, faiss_available, faiss_num_gpus,
                                  faiss_search, index_to_gpu, torch_search)
from adtrain.memory.lowp import (certified_from_rerank, certified_pass, exact_search, fits_dtype, matmul_dtype,
                                 max_norm, pair_bound, pair_eps, resolve_distance_dtype)
from adtrain.memory.lowp_nearest import certified_nearest, nearest_cap
from adtrain.memory.projected import Projection, projected_search, projection_for

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


class BankSearch:
    """The search half of MemoryBank (its ``bank`` buffer and settings; see its docstring)."""

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
            bank, center = self.bank.detach(), self._bank_center()
            step = max(1, ADD_BYTES // (4 * max(1, bank.shape[1])))  # slices: the whole centred copy
            # was a second bank held for one number
            self._index_cache[key] = max((max_norm(bank[s:s + step].float() - center)
                                          for s in range(0, bank.shape[0], step)), default=0.0)
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
            cpu = build_faiss_index(bank, kind, self.nlist, self.nprobe, self.hnsw_m, self.pq_m,
                                    self.hnsw_ef_search, self.seed, center=self._bank_center())
            self._index_cache[key] = cpu
        if not use_gpu:
            return cpu
        gkey = key + (str(device),)
        if gkey not in self._index_cache:
            self._index_cache[gkey] = index_to_gpu(cpu, device) or cpu
        return self._index_cache[gkey]

    @torch.no_grad()
    @autocast_off  # its certificates bound fp32 (or their own low precision), not an autocast's bf16
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
                                       center=self._bank_center(),
                                       cap=nearest_cap(bank.shape[0], 1 + LOWP_PAD))
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
