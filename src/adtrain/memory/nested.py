"""Cross-job reuse for a sweep over PatchCore's ``coreset_ratio`` (``method.nested_cache``).

Two facts make the jobs of such a sweep share most of their work:

* **The greedy k-center order is prefix-consistent.** ``greedy_coreset(x, n=n1)`` is exactly
  ``greedy_coreset(x, n=n2)[:n1]`` for n1 <= n2 (the pool/lazy schedule of ``coreset._LazyGreedy``
  does not depend on the number asked for), and ``MemoryBank.build`` stores the coreset in
  selection order, so the bank of a smaller ratio is the first rows of the bank of a larger one.
  The order is cached on disk with the search's whole state (min distances, lazy watermarks,
  pool, tau): a job needing fewer centres takes a prefix, a job needing more resumes the loop
  exactly where the cached one stopped (``greedy_resume``; bit-identical to a fresh run).
* **The nearest neighbour in a prefix follows from the "near-records".** For a query q and
  the bank in order, let d_j be the fp32 expansion distance of row j and tol = 2 eps + a sqrt
  margin (eps: ``lowp.error_bound``, |d_j - rerank's exact value| <= eps). Row j is a near-record
  when d_j <= min(d_i, i < j) + tol. The exact neighbour j* of the prefix of length L (exact
  distance, ties by lower index: ``MemoryBank.search``'s k=1 answer) is a near-record, and it
  is among the near-records with pos < L and d <= (their min) + tol; re-ranking those exactly
  with ``bank.rerank`` returns j*. The records of each query batch are cached on disk with the
  length they cover and extended (only the rows past it scanned) when a job needs more.

Entries are keyed by SHA-256 of the collected features (coreset) or of the query batch plus the
coreset key (records), with the device type, the matmul precision and the algorithm version;
written atomically; the folder is kept under a budget (least recently used first). Results are
bit-identical to the uncached path (tests/test_nested_cache.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from adtrain.errors import ConfigError
from adtrain.memory.bank import rerank
from adtrain.memory.coreset import _LazyGreedy, coreset_size, greedy_coreset, random_projection
from adtrain.memory.fp32 import autocast_off
from adtrain.memory.graph_knn import in_graph
from adtrain.memory.lowp import error_bound, matmul_dtype

log = logging.getLogger("adtrain")

VERSION = 1  # bump when the greedy schedule, its arithmetic or the records' definition change
MODES = ("auto", "on", "off")
_BANK_BLOCK = 2048
_QUERY_CHUNK = 8192
_SUB = 64  # sub-block of bank rows whose minima pre-select the candidates
_SQRT_MARGIN = 2.0 ** -20  # rerank compares sqrt(r): equal square roots can hide r a few ulps apart
#: what an entry holds (greedy_resume's state; a batch's near-records): anything else is a damaged entry
CORESET_KEYS = ("order", "mind", "upto", "pool_idx", "pool_val", "tau")
RECORD_KEYS = ("length", "count", "pos", "d")


def nested_mode(value) -> str:
    from adtrain.cache_files import parse_mode

    return parse_mode(value, "method.nested_cache", MODES, "on")


def _digest(head: dict, *tensors: torch.Tensor) -> str:
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for t in tensors:
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ------------------------------------------------------------------ resumable greedy coreset
@torch.no_grad()
def greedy_resume(features: torch.Tensor, n_sel: int, *, projection_dim: int = 128, seed: int = 0,
                  pool: int = 4096, device=None, state: dict | None = None) -> tuple[torch.Tensor, dict]:
    """(indices (n_sel,) int64 on the CPU, state after the last centre). With ``state`` (from an
    earlier call on the same features and settings) its order is reused: a prefix when it holds
    n_sel centres or more, else the loop continues from it. Identical to ``greedy_coreset``."""
    n_points = features.shape[0]
    done = 0 if state is None else int(state["order"].shape[0])
    if done >= n_sel:
        return state["order"][:n_sel].clone(), state
    dev = torch.device(device) if device is not None else features.device
    proj = random_projection(features, projection_dim, seed, device=dev)
    st = _LazyGreedy(proj, n_sel, pool)
    if state is None:
        gen = torch.Generator().manual_seed(seed)
        chosen = [int(torch.randint(n_points, (1,), generator=gen))]
        st.add_centre(0, chosen[0])
    else:
        chosen = state["order"].tolist()
        order = state["order"].to(dev)
        st.cents[:done] = proj[order]
        st.csq[:done] = st.sq[order]
        st.mind.copy_(state["mind"].to(dev))
        st.upto.copy_(state["upto"].to(dev))
        if state["pool_idx"] is not None:
            st.pool_idx = state["pool_idx"].to(dev)
            st.pool_val = state["pool_val"].to(dev).clone()
            st.pool_p, st.pool_sq = st.p[st.pool_idx], st.sq[st.pool_idx]
            st.tau = float(state["tau"])
    for t in range(len(chosen), n_sel):
        idx = st.next_index(t)
        chosen.append(idx)
        st.add_centre(t, idx)
    pool_idx = None if st.pool_idx is None else st.pool_idx.cpu()
    new = {"order": torch.tensor(chosen, dtype=torch.long), "mind": st.mind.cpu(), "upto": st.upto.cpu(),
           "pool_idx": pool_idx, "pool_val": None if pool_idx is None else st.pool_val.cpu(), "tau": st.tau}
    return new["order"].clone(), new


# ------------------------------------------------------------------ nearest-neighbour records
def _tolerance(q32: torch.Tensor, m_norm: float, dev: torch.device) -> torch.Tensor:
    q_norm = q32.norm(dim=1)
    eps = error_bound(q_norm, m_norm, q32.shape[1], matmul_dtype(dev))
    return 2 * eps + _SQRT_MARGIN * (q_norm + m_norm) ** 2


@torch.no_grad()
def scan_records(q32: torch.Tensor, tol: torch.Tensor, run: torch.Tensor, rows: torch.Tensor, offset: int):
    """Near-records of the bank rows ``rows`` (positions offset.. in bank order) for the queries
    q32 (M,D) with running minima ``run`` (M,, updated in place). Returns (query, pos, d), each
    query's records in bank order (queries not sorted)."""
    dev = q32.device
    qsq = (q32 * q32).sum(dim=1, keepdim=True)
    out_q, out_p, out_d = [], [], []
    b0 = 0
    while b0 < rows.shape[0]:
        mb = rows[b0: b0 + _BANK_BLOCK].to(dev, torch.float32)
        msq_t, mb_t = (mb * mb).sum(dim=1).unsqueeze(0), mb.t()
        for s in range(0, q32.shape[0], _QUERY_CHUNK):
            e = min(s + _QUERY_CHUNK, q32.shape[0])
            d = torch.addmm(msq_t, q32[s:e], mb_t, alpha=-2.0).add_(qsq[s:e])  # as lowp.exact_search
            if d.shape[1] % _SUB:  # the last block: pad to whole sub-blocks (inf is never a record)
                d = torch.cat([d, d.new_full((d.shape[0], _SUB - d.shape[1] % _SUB), float("inf"))], dim=1)
            smin = d.view(d.shape[0], -1, _SUB).amin(dim=2)  # (m, sub-blocks)
            dmin = smin.amin(dim=1)
            run_s, tol_s = run[s:e], tol[s:e]
            hit = torch.nonzero(dmin <= run_s + tol_s).squeeze(1)
            if hit.numel():
                # a record is within tol of the running min before it, so of the min before its
                # sub-block; and only such candidates (at most tol above it) can lower a row's min
                # below that: the exact prefix minima are taken over them alone
                sm = smin[hit]
                before_sub = torch.cummin(sm, dim=1).values.roll(1, dims=1)
                before_sub[:, 0] = float("inf")
                thr = torch.minimum(before_sub, run_s[hit].unsqueeze(1)) + tol_s[hit].unsqueeze(1)
                sub = d[hit]
                cand = sub.view(sub.shape[0], -1, _SUB) <= thr.unsqueeze(2)
                r, c = torch.nonzero(cand.view(sub.shape[0], -1), as_tuple=True)  # by row, then column
                v = sub[r, c]
                cnt = torch.bincount(r, minlength=hit.shape[0])
                k = torch.arange(r.shape[0], device=dev) - (torch.cumsum(cnt, 0) - cnt)[r]
                pad = torch.full((hit.shape[0], int(cnt.max()) + 1), float("inf"), device=dev)
                pad[r, k + 1] = v
                before = torch.cummin(pad, dim=1).values[r, k]  # min of the row's earlier candidates
                rec = v <= torch.minimum(before, run_s[hit][r]) + tol_s[hit][r]
                out_q.append(hit[r[rec]] + s)
                out_p.append(c[rec] + (offset + b0))
                out_d.append(v[rec])
            torch.minimum(run_s, dmin, out=run_s)
        b0 += mb.shape[0]
    if not out_q:
        empty = torch.empty(0, dtype=torch.long, device=dev)
        return empty, empty, torch.empty(0, device=dev)
    return torch.cat(out_q), torch.cat(out_p), torch.cat(out_d)


@torch.no_grad()
def answer(queries: torch.Tensor, bank: torch.Tensor, q: torch.Tensor, p: torch.Tensor, d: torch.Tensor,
           tol: torch.Tensor, length: int, dev) -> torch.Tensor | None:
    """Nearest row (M,) of the first ``length`` bank rows from the near-records (q, p, d):
    the candidates within tol of the prefix's smallest record, re-ranked exactly (ties by index)."""
    m = queries.shape[0]
    if p.numel() and int(p.max()) >= length:  # records past the prefix: a longer job made them
        keep = p < length
        q, p, d = q[keep], p[keep], d[keep]
    best = torch.full((m,), float("inf"), device=d.device).scatter_reduce(0, q, d, "amin")
    c = d <= (best + tol)[q]
    q, p = q[c], p[c]
    count = torch.bincount(q, minlength=m)
    if not bool((count > 0).all()):  # cannot happen for finite inputs (row 0 is always a record)
        return None
    first = torch.cumsum(count, 0) - count
    out = p[first].clone()  # one candidate: the answer itself
    many = torch.nonzero(count > 1).squeeze(1)
    if many.numel():
        width = int(count[many].max())
        cols = torch.arange(width, device=p.device)
        at = first[many].unsqueeze(1) + torch.minimum(cols, count[many].unsqueeze(1) - 1)
        cand = p[at]  # padded with the last candidate again: a repeat changes nothing
        _, idx = rerank(queries[many.to(queries.device)], bank[:length], cand, 1, dev)
        out[many] = idx[:, 0].to(out.device)
    return out


class NestedCache:
    """The on-disk coreset states and near-record entries, and what this process did with them."""

    def __init__(self, root: str | os.PathLike, max_gb: float = 10.0):
        if isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not max_gb > 0:
            raise ConfigError("coreset_cache_max_gb", f"must be a number > 0, got {max_gb!r}")
        self.root = Path(os.path.expanduser(str(root)))
        self.max_bytes = int(float(max_gb) * 2**30)
        self.coreset_use: str | None = None  # computed | prefix | extended
        self.lookups = {"hit": 0, "extended": 0, "computed": 0}
        self._ref: dict | None = None

    def state(self) -> str:
        """off (not used) | hit (the coreset came from, or resumed, an earlier job's) | miss."""
        if self.coreset_use is None:
            return "off"
        return "miss" if self.coreset_use == "computed" else "hit"

    def report(self) -> dict:
        return {"coreset": self.coreset_use, "records": dict(self.lookups)}

    # ---------------------------------------------------------- files
    def _load(self, path: Path, keys: tuple[str, ...]):
        """The entry at path (a dict holding keys), or None: absent, or damaged (then warned about,
        deleted and computed again, adtrain.cache_files.load_entry)."""
        from adtrain.cache_files import dict_with, load_entry

        return load_entry(path, "coreset cache entry", "cpu", dict_with(keys))

    def _store(self, path: Path, obj: dict) -> None:
        from adtrain.io import torch_save

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch_save(obj, path)
            self.evict()
        except OSError as e:
            if not getattr(self, "_store_warned", False):  # once per run, not once per batch's records
                log.warning("coreset_cache_dir=%s: cannot store (%s); computed without the cache", self.root, e)
            self._store_warned = True

    def evict(self) -> int:
        from adtrain.cache_files import evict_lru
        from adtrain.io import remove_dead_temps

        if not getattr(self, "_temps_swept", False):  # once per cache, not after every stored entry
            remove_dead_temps(self.root)  # writes killed midway: nothing else removes them
            self._temps_swept = True
        return evict_lru(self.root.rglob("*.pt"), self.max_bytes)

    # ---------------------------------------------------------- coreset (MemoryBank.build's hook)
    @autocast_off
    def coreset(self, features: torch.Tensor, ratio: float, *, projection_dim: int = 128, seed: int = 0,
                device=None, pool: int = 4096) -> torch.Tensor:
        """greedy_coreset(features, ratio, ...) through the cache; remembers the bank it makes."""
        n_points = features.shape[0]
        n_sel = coreset_size(n_points, ratio)
        dev = torch.device(device) if device is not None else features.device
        if n_sel >= n_points or not bool(torch.isfinite(features.sum())):  # a finite sum: all finite
            self._ref = None
            return greedy_coreset(features, ratio, projection_dim=projection_dim, seed=seed, device=device)
        head = {"what": "greedy_coreset", "version": VERSION, "projection_dim": int(projection_dim),
                "seed": int(seed), "pool": int(pool), "shape": list(features.shape), "dtype": str(features.dtype),
                "device": dev.type, "torch": torch.__version__}
        key = _digest(head, features)
        path = self.root / f"{key}.coreset.pt"
        state = self._load(path, CORESET_KEYS)
        done = 0 if state is None else int(state["order"].shape[0])
        idx, new = greedy_resume(features, n_sel, projection_dim=projection_dim, seed=seed, pool=pool,
                                 device=dev, state=state)
        self.coreset_use = "prefix" if done >= n_sel else ("extended" if done else "computed")
        if done < n_sel:
            self._store(path, new)
        bank = features[idx].to(torch.float32)
        self._ref = {"key": key, "n": n_sel, "m_norm": float(features.float().norm(dim=1).max()),
                     "bank": _digest({}, bank), "ends": bank[[0, -1]].clone(), "seen": None}
        return idx.to(features.device)

    def _bank_matches(self, bank: torch.Tensor) -> bool:
        """Is ``bank`` the coreset built last? The verified tensor is held (its address cannot be
        reused) and re-verified when replaced or modified; a reloaded bank is hashed once."""
        ref = self._ref
        if ref is None or bank.shape[0] != ref["n"]:
            return False
        if ref["seen"] is not None and ref["seen"][0] is bank and ref["seen"][1] == bank._version:
            return True
        ends = bank[[0, -1]].detach().float().cpu()
        if not torch.equal(ends, ref["ends"]) or _digest({}, bank.detach().float()) != ref["bank"]:
            return False  # another bank (a continual task's, a shared one): searched as usual
        ref["seen"] = (bank, bank._version)
        return True

    # ---------------------------------------------------------- k=1 search (PatchCore's scoring hook)
    @torch.no_grad()
    @autocast_off  # its records' distances and tolerances are fp32 (under bf16 autocast: a dtype error)
    def nearest(self, queries: torch.Tensor, memory) -> torch.Tensor | None:
        """MemoryBank.search(queries, 1)'s indices (M,) on the queries' device, from the records; None
        when the bank is not the coreset this cache built, or its search is approximate (then search as usual)."""
        bank = memory.bank
        if in_graph() or queries.dim() != 2 or queries.shape[0] == 0 or not self._bank_matches(bank):
            return None
        if memory.resolve_index() != "flat" and memory.resolve_backend(queries) != "torch":
            return None  # an approximate index (ivf, hnsw, ivfpq; a flat one past AUTO_IVF_ABOVE) is the run's search
            # and these records are exact: the cache would change the scores, not only their cost
        dev = queries.device if queries.is_cuda and not bank.is_cuda else bank.device
        q32 = queries.detach().to(dev, torch.float32)
        if not bool(torch.isfinite(q32.sum())):
            return None
        ref, n = self._ref, bank.shape[0]
        head = {"what": "records", "version": VERSION, "coreset": ref["key"], "shape": list(queries.shape),
                "dtype": str(queries.dtype), "device": dev.type, "matmul": str(matmul_dtype(dev))}
        path = self.root / "nn" / f"{_digest(head, queries)}.nn.pt"
        tol = _tolerance(q32, ref["m_norm"], dev)
        entry = self._load(path, RECORD_KEYS)
        if entry is not None and entry["length"] >= n:
            self.lookups["hit"] += 1
            q = torch.repeat_interleave(torch.arange(q32.shape[0]), entry["count"].long()).to(dev)
            p, d = entry["pos"].to(dev).long(), entry["d"].to(dev)
        else:
            start = 0 if entry is None else int(entry["length"])
            rows = bank[start:n]
            if not bool(torch.isfinite(rows.sum())):
                return None
            if entry is None:
                self.lookups["computed"] += 1
                q0 = p0 = torch.empty(0, dtype=torch.long, device=dev)
                d0 = torch.empty(0, device=dev)
                run = torch.full((q32.shape[0],), float("inf"), device=dev)
            else:
                self.lookups["extended"] += 1
                q0 = torch.repeat_interleave(torch.arange(q32.shape[0]), entry["count"].long()).to(dev)
                p0, d0 = entry["pos"].to(dev).long(), entry["d"].to(dev)
                run = torch.full((q32.shape[0],), float("inf"), device=dev).scatter_reduce(0, q0, d0, "amin")
            q1, p1, d1 = scan_records(q32, tol, run, rows, start)
            q, p, d = torch.cat([q0, q1]), torch.cat([p0, p1]), torch.cat([d0, d1])
            order = torch.sort(q, stable=True).indices  # each query's records stay in bank order
            q, p, d = q[order], p[order], d[order]
            count = torch.bincount(q, minlength=q32.shape[0])
            self._store(path, {"length": n, "count": count.int().cpu(), "pos": p.int().cpu(), "d": d.cpu()})
        out = answer(q32, bank, q, p, d, tol, n, dev)
        return None if out is None else out.to(queries.device)


def attach_nested_cache(method: torch.nn.Module, cfg) -> NestedCache | None:
    """Give PatchCore's model the cache when ``method.nested_cache`` is on (auto: with feature_cache=on)."""
    from adtrain.backbones.feature_cache import feature_cache_enabled

    mode = nested_mode(cfg.method.get("nested_cache", "auto"))
    on = mode == "on" or (mode == "auto" and feature_cache_enabled(cfg.get("feature_cache", False)))
    model = getattr(method, "model", None)
    if not on or not hasattr(model, "nested_cache"):
        return None
    root = cfg.get("coreset_cache_dir")
    if not root:
        raise ConfigError("coreset_cache_dir", "missing: where method.nested_cache keeps coresets and neighbours")
    model.nested_cache = NestedCache(root, cfg.get("coreset_cache_max_gb", 10.0))
    return model.nested_cache
