"""MemoryBank: streamed feature collection, optional compression, k-NN search (the search
itself: adtrain.memory.bank_search)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from adtrain.errors import AdtrainError, ConfigError
# re-exported: the pads, rerank and tensor_version are read from this module elsewhere
from adtrain.memory.bank_search import (DENSE_PAD, FLAT_PAD, LOWP_PAD, RERANK_PAD, BankSearch,  # noqa: F401
                                        rerank, tensor_version)
from adtrain.memory.coreset import greedy_coreset, kmeans
from adtrain.memory.fp32 import autocast_off
from adtrain.memory.index import BACKENDS, INDEXES, faiss_available
from adtrain.memory.ram import check_room
from adtrain.memory.lowp import DISTANCE_DTYPES
from adtrain.memory.projected import PROJECTIONS

_CPU = torch.device("cpu")


class MemoryBank(BankSearch, nn.Module):
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
    same neighbours), ``off`` never. ram_check: ``check_room`` refuses a collection that will
    not fit in host memory at its first batch, not after an hour in the OOM killer.
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
        ram_check: bool = True,
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
        if not isinstance(ram_check, bool):
            raise ConfigError("memory.ram_check", f"must be true or false, got {ram_check!r}")
        self.ram_check = ram_check
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

    def check_room(self, rows: int, projection_dim: int, key: str, switch: str, copies: int = 1) -> None:
        """Refuse (ConfigError naming ``key``) before ``rows`` collected rows (capped at max_features)
        outgrow the host memory still available: held as fp32, plus their coreset projection of
        ``projection_dim`` (adtrain.memory.ram). ``switch``: the config key of ``ram_check``.
        ``copies``: processes on this machine collecting the same rows (DDP ranks)."""
        if not self.ram_check or self._dim is None:
            return
        check_room(self.capped(rows), self.row_bytes(projection_dim) * max(int(copies), 1), self.held_rows, key,
                   "the memory bank's patch features" + (f" (one copy in each of {copies} processes)"
                                                          if copies > 1 else ""), switch)

    def capped(self, rows: int) -> int:
        """The rows kept of ``rows`` offered (max_features)."""
        return int(rows) if self.max_features is None else min(int(rows), self.max_features)

    @property
    def held_rows(self) -> int:
        return self._reservoir.shape[0] if self._reservoir is not None else self._count

    def row_bytes(self, projection_dim: int) -> int:
        """Host bytes per collected row: fp32 features, their coreset projection, a distance."""
        return 4 * ((self._dim or 0) + max(int(projection_dim), 0) + 2)

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
    @autocast_off
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
        """Use ``bank`` (K,D) as the memory: fp32, contiguous, on this module's device (converted
        where it is not, else taken as it is: the caller's later in-place changes then reach the
        memory, and the search caches follow them by the tensor's version counter). An inference
        tensor (made under ``torch.inference_mode``) has no such counter and is copied into one
        that has."""
        if bank.dim() != 2 or bank.shape[0] == 0:
            raise AdtrainError(f"MemoryBank.set_bank: expected non-empty (K,D), got {tuple(bank.shape)}")
        bank = bank.detach().to(self.bank.device, torch.float32).contiguous()
        if bank.is_inference():
            with torch.inference_mode(False):
                bank = bank.clone()
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

    def extra_repr(self) -> str:
        size = "empty" if self.bank.numel() == 0 else f"{len(self)}x{self.dim}"
        host = ", keep_on_host=True" if self.keep_on_host else ""
        host += f", distance_dtype={self.distance_dtype}" if self.distance_dtype != "auto" else ""
        return f"bank={size}, backend={self.backend}, index={self.index}{host}"
