"""Memory bank: exact/approximate search, coreset, k-means, reservoir, state dict, gradients."""

from __future__ import annotations

import pytest
import torch

from adtrain.errors import AdtrainError, ConfigError
from adtrain.memory import MemoryBank, greedy_coreset, kmeans, nearest_distances, random_projection
from adtrain.memory.coreset import greedy_coreset_reference

import faiss  # noqa: E402,F401 - a hard dependency: an import error must fail, not skip


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _clustered(n, dim=32, clusters=50, seed=0):
    centres = torch.randn(clusters, dim, generator=_gen(1234)) * 4  # same centres for every seed
    g = _gen(seed)
    labels = torch.randint(clusters, (n,), generator=g)
    return centres[labels] + torch.randn(n, dim, generator=g)


def _reference(queries, bank, k):
    d = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    dist, idx = torch.topk(d, k + 1, dim=1, largest=False)
    return dist, idx


@pytest.mark.parametrize("backend", ["faiss", "torch", "auto"])
def test_exact_backends_match_bruteforce(backend):
    g = _gen(0)
    bank, queries, k = torch.randn(1500, 24, generator=g), torch.randn(300, 24, generator=g), 5
    mb = MemoryBank(backend=backend, index="flat")
    for chunk in bank.split(400):
        mb.add(chunk)
    mb.build()
    d, idx = mb.search(queries, k)
    assert d.shape == (300, k) and idx.shape == (300, k) and idx.dtype == torch.int64
    ref_d, ref_i = _reference(queries, bank, k)
    torch.testing.assert_close(d.double(), ref_d[:, :k], atol=1e-5, rtol=1e-5)
    # the returned items really are at those distances (robust to ties)
    true_d = (queries.unsqueeze(1).double() - bank[idx].double()).norm(dim=-1)
    torch.testing.assert_close(true_d, ref_d[:, :k], atol=1e-5, rtol=1e-5)
    clear = (ref_d[:, 1:] - ref_d[:, :-1]).min(dim=1).values > 1e-4  # rows without near-ties
    assert clear.float().mean() > 0.9
    assert torch.equal(idx[clear], ref_i[clear, :k])


@pytest.mark.parametrize(
    "index, n, min_recall",
    [("ivf", 5000, 0.9), ("hnsw", 5000, 0.9), ("ivfpq", 2000, 0.5)],
)
def test_approximate_indexes_recall(index, n, min_recall):
    bank, queries = _clustered(n, seed=0), _clustered(400, seed=1)
    mb = MemoryBank(backend="faiss", index=index, nprobe=8)
    mb.set_bank(bank)
    d, idx = mb.search(queries, 1)
    exact = torch.cdist(queries, bank).argmin(dim=1)
    recall = (idx[:, 0] == exact).float().mean().item()
    assert recall >= min_recall, f"{index}: recall@1 {recall:.3f} < {min_recall}"
    # distances are exact for the returned items, whatever the index approximates
    torch.testing.assert_close(d[:, 0], (queries - bank[idx[:, 0]]).norm(dim=1), atol=1e-4, rtol=1e-5)


def test_ivf_short_lists_fall_back_to_exact():
    bank = torch.randn(1000, 8, generator=_gen(3))
    mb = MemoryBank(backend="faiss", index="ivf", nlist=20, nprobe=1)
    mb.set_bank(bank)
    d, idx = mb.search(torch.randn(50, 8, generator=_gen(4)), 100)  # > most single lists
    assert (idx >= 0).all()
    assert all(len(set(row.tolist())) == 100 for row in idx)
    assert (d[:, 1:] >= d[:, :-1]).all()


def test_torch_chunking_is_identical():
    g = _gen(5)
    bank, queries = torch.randn(700, 16, generator=g), torch.randn(120, 16, generator=g)
    big = MemoryBank(backend="torch")
    tiny = MemoryBank(backend="torch", search_chunk=7, bank_chunk=5)
    big.set_bank(bank)
    tiny.set_bank(bank)
    d1, i1 = big.search(queries, 9)
    d2, i2 = tiny.search(queries, 9)
    assert torch.equal(i1, i2)
    assert torch.equal(d1, d2)


def test_search_errors():
    mb = MemoryBank()
    with pytest.raises(AdtrainError, match="empty"):
        mb.search(torch.randn(3, 4), 1)
    with pytest.raises(AdtrainError, match="no features"):
        mb.build()
    mb.set_bank(torch.randn(5, 4))
    with pytest.raises(AdtrainError, match="k=6"):
        mb.search(torch.randn(3, 4), 6)
    with pytest.raises(AdtrainError, match="do not match"):
        mb.search(torch.randn(3, 5), 1)
    with pytest.raises(ConfigError, match="memory.backend"):
        MemoryBank(backend="annoy")
    with pytest.raises(ConfigError, match="memory.index"):
        MemoryBank(index="lsh")


def _covering_radius(points, centres):
    return torch.cdist(points, centres).min(dim=1).values.max().item()


def test_greedy_coreset_properties():
    x = _clustered(3000, dim=40, seed=2)
    idx = greedy_coreset(x, 0.05, seed=0)
    assert idx.dtype == torch.int64 and idx.numel() == 150
    assert len(set(idx.tolist())) == 150
    assert torch.equal(idx, greedy_coreset(x, 0.05, seed=0))
    assert not torch.equal(idx, greedy_coreset(x, 0.05, seed=1))
    assert greedy_coreset(x, n=17).numel() == 17
    # covers the data far better than a random subset of the same size
    rand = torch.randperm(3000, generator=_gen(0))[:150]
    assert _covering_radius(x, x[idx]) < 0.75 * _covering_radius(x, x[rand])


def test_greedy_coreset_matches_plain_greedy_loop():
    x = torch.randn(4000, 64, generator=_gen(7))
    fast = greedy_coreset(x, n=400, projection_dim=32, seed=3, pool=64)  # small pool: many re-forms
    slow = greedy_coreset_reference(x, 400, projection_dim=32, seed=3)
    assert fast[0] == slow[0]
    shared = len(set(fast.tolist()) & set(slow.tolist())) / 400
    assert shared > 0.95  # identical up to float rounding on near-ties
    proj = random_projection(x, 32, seed=3)
    r_fast, r_slow = _covering_radius(proj, proj[fast]), _covering_radius(proj, proj[slow])
    assert abs(r_fast - r_slow) <= 0.01 * r_slow


def test_greedy_coreset_with_duplicate_points_stays_unique():
    x = torch.randn(50, 16, generator=_gen(6)).repeat(20, 1)  # 1000 points, 50 distinct
    idx = greedy_coreset(x, n=200, pool=16)
    assert len(set(idx.tolist())) == 200
    assert len({tuple(row) for row in x[idx[:50]].tolist()}) == 50  # all distinct ones first


def test_coreset_errors():
    x = torch.randn(10, 4)
    with pytest.raises(AdtrainError):
        greedy_coreset(x, 0.0)
    with pytest.raises(AdtrainError):
        greedy_coreset(x, 0.5, n=3)
    assert torch.equal(greedy_coreset(x, 1.0), torch.arange(10))


def test_kmeans_returns_k_centres_near_the_clusters():
    g = _gen(8)
    true = torch.randn(6, 16, generator=g) * 10
    x = true.repeat_interleave(200, dim=0) + 0.1 * torch.randn(1200, 16, generator=g)
    centres = kmeans(x, 6, niter=30, seed=0)
    assert centres.shape == (6, 16)
    assert torch.cdist(true, centres).min(dim=1).values.max() < 1.0
    with pytest.raises(AdtrainError):
        kmeans(x, 0)


def test_kmeans_and_search_without_faiss(monkeypatch):
    """The default install has no FAISS (it is an extra): k-means and search fall back to torch."""
    import builtins
    import sys

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "faiss", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_faiss)
    from adtrain.memory.index import faiss_available

    assert not faiss_available()
    g = _gen(8)
    true = torch.randn(6, 16, generator=g) * 10
    x = true.repeat_interleave(200, dim=0) + 0.1 * torch.randn(1200, 16, generator=g)
    centres = kmeans(x, 6, niter=30, seed=0)
    assert centres.shape == (6, 16) and torch.cdist(true, centres).min(dim=1).values.max() < 1.0
    mb = MemoryBank()
    mb.add(x)
    mb.build(coreset_ratio=0.1)
    q = x[:50] + 0.01
    dist, _ = mb.search(q, k=1)
    ref = torch.cdist(q.double(), mb.bank.double()).min(dim=1).values
    assert torch.allclose(dist.reshape(-1).double(), ref, atol=1e-4)


def test_build_with_coreset_and_kmeans():
    x = torch.randn(1000, 12, generator=_gen(9))
    mb = MemoryBank()
    mb.add(x)
    mb.build(coreset_ratio=0.1)
    assert len(mb) == 100
    exact = torch.cdist(mb.bank, x, compute_mode="donot_use_mm_for_euclid_dist")
    assert (exact.min(dim=1).values == 0).all()  # rows of the input
    mb.add(x)
    mb.build(kmeans_k=20)
    assert mb.bank.shape == (20, 12)
    with pytest.raises(ConfigError):
        mb.build(coreset_ratio=0.1, kmeans_k=3)


def test_reservoir_cap_is_a_uniform_seeded_sample():
    def fill(seed):
        mb = MemoryBank(max_features=200, seed=seed)
        for start in range(0, 2000, 100):
            ids = torch.arange(start, start + 100, dtype=torch.float32)
            mb.add(torch.stack([ids, -ids], dim=1))
        assert mb.num_added == 2000
        mb.build()
        return mb.bank[:, 0]

    a = fill(0)
    assert a.numel() == 200 and len(set(a.tolist())) == 200
    assert torch.equal(a, fill(0)) and not torch.equal(a, fill(1))
    late = (a >= 1000).float().mean().item()
    assert 0.35 < late < 0.65  # not just the first (or last) rows


def test_available_bytes_reads_meminfo_and_the_container_limit(tmp_path, monkeypatch):
    from adtrain.memory import ram

    assert ram.available_bytes() > 0  # this machine's own: a Linux MemAvailable
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:   50 kB\n")
    (tmp_path / "max").write_text("40960\n")
    (tmp_path / "current").write_text("20480\n")
    monkeypatch.setattr(ram, "_MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(ram, "_CGROUPS", ((str(tmp_path / "max"), str(tmp_path / "current")),))
    assert ram.available_bytes() == 20480  # the container's 40 kB limit less its 20 kB use
    (tmp_path / "max").write_text("max\n")  # cgroup v2: no limit
    assert ram.available_bytes() == 50 * 1024


def test_a_collection_the_host_cannot_hold_is_refused_with_a_cap_that_fits(monkeypatch):
    from adtrain.memory import ram

    monkeypatch.setattr(ram, "available_bytes", lambda: 100_000)
    mb = MemoryBank(seed=0)
    mb.add(torch.randn(100, 30, generator=_gen(0)))  # a first batch of 100 rows
    row = mb.row_bytes(16)
    assert row == 4 * (30 + 16 + 2)
    mb.check_room(100 + 100_000 // row - 1, 16, "method.memory.max_features", "method.memory.ram_check")  # fits
    with pytest.raises(ConfigError, match="each of 2 processes"):  # DDP ranks on one machine: a copy each
        mb.check_room(100 + 100_000 // row - 1, 16, "method.memory.max_features", "method.memory.ram_check", copies=2)
    with pytest.raises(ConfigError, match=r"method.memory.max_features.*1,000,000 rows.*about [0-9,]+ fit.*"
                                          r"method.memory.ram_check=false") as err:
        mb.check_room(1_000_000, 16, "method.memory.max_features", "method.memory.ram_check")
    fits = int(str(err.value).split("about ")[1].split(" fit")[0].replace(",", ""))
    assert 100 < fits < 100 + 100_000 // row  # the rows held count, with a margin
    capped = MemoryBank(seed=0, max_features=fits)
    capped.add(torch.randn(100, 30, generator=_gen(0)))
    capped.check_room(1_000_000, 16, "k", "s")  # the cap bounds what will be held
    MemoryBank(seed=0, ram_check=False).check_room(1_000_000, 16, "k", "s")  # nothing added yet: nothing known
    off = MemoryBank(seed=0, ram_check=False)
    off.add(torch.randn(100, 30, generator=_gen(0)))
    off.check_room(1_000_000, 16, "k", "s")  # switched off
    with pytest.raises(ConfigError, match="memory.ram_check"):
        MemoryBank(ram_check="yes")


def test_state_dict_round_trip_with_different_bank_size():
    mb = MemoryBank(backend="faiss")
    mb.set_bank(torch.randn(300, 32, generator=_gen(10)))
    queries = torch.randn(20, 32, generator=_gen(11))
    d, idx = mb.search(queries, 3)
    fresh = MemoryBank(backend="faiss")
    fresh.set_bank(torch.randn(10, 32))  # a different size than the checkpoint's
    fresh.search(queries, 1)  # builds an index over the old bank
    fresh.load_state_dict(mb.state_dict())
    assert fresh.bank.shape == (300, 32)
    d2, idx2 = fresh.search(queries, 3)
    assert torch.equal(idx, idx2) and torch.equal(d, d2)
    empty = MemoryBank(backend="torch")
    empty.load_state_dict(mb.state_dict())
    assert torch.equal(empty.search(queries, 3)[1], idx)


def test_index_rebuilt_after_in_place_change():
    mb = MemoryBank(backend="faiss")
    mb.set_bank(torch.zeros(4, 2))
    q = torch.tensor([[5.0, 5.0]])
    mb.search(q, 1)
    mb.bank[2] = torch.tensor([5.0, 5.0])
    assert mb.search(q, 1)[1].item() == 2


@pytest.mark.parametrize("squared", [False, True])
def test_nearest_distances_gradients_match_bruteforce(squared):
    g = _gen(12)
    q0, b0 = torch.randn(64, 10, generator=g), torch.randn(200, 10, generator=g)
    w = torch.rand(64, 4, generator=g)  # a non-uniform upstream gradient
    q, b = q0.clone().requires_grad_(), b0.clone().requires_grad_()
    d, idx = nearest_distances(q, b, 4, squared=squared)
    (d * w).sum().backward()
    qr, br = q0.clone().requires_grad_(), b0.clone().requires_grad_()
    dr = torch.cdist(qr, br, compute_mode="donot_use_mm_for_euclid_dist").topk(4, largest=False).values
    dr = dr**2 if squared else dr
    (dr * w).sum().backward()
    torch.testing.assert_close(d, dr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.grad, qr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.grad, br.grad, atol=1e-5, rtol=1e-4)


def test_nearest_distances_with_memory_bank_reaches_queries_only():
    g = _gen(13)
    mb = MemoryBank(backend="faiss")
    mb.set_bank(torch.randn(100, 6, generator=g))
    q = torch.randn(30, 6, generator=g).requires_grad_()
    d, idx = nearest_distances(q, mb, 2)
    d.sum().backward()
    expected = ((q.detach().unsqueeze(1) - mb.bank[idx]) / d.detach().unsqueeze(-1)).sum(1)
    torch.testing.assert_close(q.grad, expected)
    assert not mb.bank.requires_grad


def test_host_bank_streamed_search_matches_resident():
    """keep_on_host: the bank stays put when the module moves; streamed slices give the same
    neighbours (here the 'device' is the CPU; the CUDA run is the test below)."""
    from adtrain.memory.index import torch_search

    g = _gen(6)
    bank, queries = torch.randn(900, 16, generator=g), torch.randn(150, 16, generator=g)
    ref = torch_search(queries, bank, 4, 1000, 1000)
    streamed = torch_search(queries, bank, 4, 33, 17, device="cpu")
    assert torch.equal(ref, streamed)
    mb = MemoryBank(backend="torch", keep_on_host=True, bank_chunk=64)
    mb.set_bank(bank)
    mb.to(torch.float64)  # module conversions leave a host bank as it is
    assert mb.bank.dtype == torch.float32 and mb.bank.device.type == "cpu"
    assert "keep_on_host=True" in repr(mb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("keep_on_host", [False, True])
def test_cuda_search_matches_cpu(keep_on_host):
    g = _gen(7)
    bank, queries = torch.randn(5000, 64, generator=g), torch.randn(700, 64, generator=g)
    cpu = MemoryBank(backend="torch")
    cpu.set_bank(bank)
    d0, i0 = cpu.search(queries, 3)
    gpu = MemoryBank(backend="torch", keep_on_host=keep_on_host, bank_chunk=512).to("cuda")
    gpu.set_bank(bank)
    assert gpu.bank.is_cuda != keep_on_host
    d1, i1 = gpu.search(queries.cuda(), 3)
    assert d1.is_cuda and i1.is_cuda
    torch.testing.assert_close(d1.cpu(), d0, atol=1e-4, rtol=1e-4)
    assert (i1.cpu() == i0).float().mean() > 0.99
    d2, _ = nearest_distances(queries.cuda().requires_grad_(), gpu, 1)
    assert d2.is_cuda
    torch.testing.assert_close(d2.detach().cpu(), d0[:, :1], atol=1e-4, rtol=1e-4)


def test_backend_routing_and_faiss_gpu_wiring(monkeypatch):
    """auto: torch for CUDA queries when FAISS has no GPU, FAISS otherwise; with faiss-gpu the
    CPU index is copied once per device and cached (faiss-gpu itself is stood in for here)."""
    from adtrain.memory import bank_search as bank_mod  # the module whose search reads these names

    mb = MemoryBank(backend="auto")
    mb.set_bank(torch.randn(200, 8, generator=_gen(8)))
    class FakeCuda:  # resolve_backend only reads .is_cuda
        is_cuda = True

    monkeypatch.setattr(bank_mod, "faiss_num_gpus", lambda: 0)
    assert mb.resolve_backend(FakeCuda()) == "torch"
    assert mb.resolve_backend(torch.zeros(1, 8)) == "faiss"
    monkeypatch.setattr(bank_mod, "faiss_num_gpus", lambda: 1)
    assert mb.resolve_backend(FakeCuda()) == "faiss"
    copies = []

    def fake_to_gpu(index, device):
        copies.append(str(device))
        return ("gpu-index", index)

    monkeypatch.setattr(bank_mod, "index_to_gpu", fake_to_gpu)
    gpu_index = mb._faiss_index(torch.device("cuda", 0))
    assert gpu_index[0] == "gpu-index" and mb._faiss_index(torch.device("cuda", 0)) is gpu_index
    assert copies == ["cuda:0"]  # built and copied once, then cached
    assert mb._faiss_index(torch.device("cpu")) is gpu_index[1]  # CPU searches use the CPU index
    mb_h = MemoryBank(backend="auto", index="hnsw")
    mb_h.set_bank(torch.randn(200, 8, generator=_gen(9)))
    assert not isinstance(mb_h._faiss_index(torch.device("cuda", 0)), tuple)  # no HNSW on FAISS GPU


def test_both_faiss_builds_installed_is_warned_once(monkeypatch, caplog):
    """faiss-cpu and faiss-gpu-* are exclusive extras: both installed overwrite one module."""
    import logging
    from types import SimpleNamespace

    import adtrain.memory.index as index

    dists = [SimpleNamespace(metadata={"Name": n}) for n in ("faiss-cpu", "faiss-gpu-cu12", "torch")]
    monkeypatch.setattr("importlib.metadata.distributions", lambda: dists)
    monkeypatch.setattr(index, "_BUILDS_CHECKED", False)
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        index._warn_if_both_builds()
        index._warn_if_both_builds()
    warned = [r.getMessage() for r in caplog.records if "faiss-cpu and faiss-gpu-cu12" in r.getMessage()]
    assert len(warned) == 1
    monkeypatch.setattr(index, "_BUILDS_CHECKED", False)
    monkeypatch.setattr("importlib.metadata.distributions", lambda: dists[:1])
    caplog.clear()
    index._warn_if_both_builds()
    assert not caplog.records


def test_a_bank_set_under_inference_mode_can_be_searched():
    """Inference tensors have no version counter: the index cache must not read one."""
    from adtrain.memory.bank import MemoryBank

    torch.manual_seed(0)
    bank, q = torch.randn(50, 8), torch.randn(7, 8)
    mem = MemoryBank()
    with torch.inference_mode():
        mem.set_bank(bank)
        d, i = mem.search(q, 1)
    want = torch.cdist(q, bank).min(dim=1)
    assert torch.equal(i[:, 0], want.indices) and torch.allclose(d[:, 0], want.values, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_flat_faiss_search_equals_the_full_exact_ranking_with_ties(k):
    """The narrowed re-rank of an exact FAISS pass (MemoryBank._rerank_flat) returns what
    ranking every bank item by its exact distance returns, ties to the lower index."""
    pytest.importorskip("faiss")
    from adtrain.memory.bank import MemoryBank, rerank

    torch.manual_seed(0)
    bank = torch.randn(1500, 32).round(decimals=1)
    bank[700:760] = bank[:60]  # duplicate rows: exact ties
    q = torch.cat([torch.randn(600, 32), bank[:40] + 1e-7, bank[300:310]])  # near ties, exact hits
    mem = MemoryBank(backend="faiss")
    mem.set_bank(bank)
    d, i = mem.search(q, k)
    dr, ir = rerank(q, bank, torch.arange(len(bank)).expand(len(q), -1), k)
    assert torch.equal(i, ir) and torch.equal(d, dr)


# ---------------------------------------------------------------- small-bank CPU pass (memory.dense_exact)
def _dense_ties(seed=0, n=1200, dim=24):
    """Clusters plus exact duplicates and near ties, and queries on and between them."""
    g = _gen(seed)
    centres = torch.randn(15, dim, generator=g) * 3
    bank = centres[torch.randint(0, 15, (n,), generator=g)] + torch.randn(n, dim, generator=g)
    bank[100:130] = bank[99]  # 31 exact duplicates: past any pad, only the full pass can rank them
    bank[200:204] = bank[199] + 1e-6 * torch.randn(4, dim, generator=g)  # near ties within the pad
    queries = torch.cat([bank[99:100] + 0.01, bank[199:200] + 1e-3, bank[:40],
                         centres[torch.randint(0, 15, (80,), generator=g)] + torch.randn(80, dim, generator=g)])
    return queries, bank


def _full_reference(queries, bank, k):
    from adtrain.memory.index import exact_distances

    full = exact_distances(queries, bank, torch.arange(bank.shape[0]).expand(queries.shape[0], -1))
    d, i = torch.sort(full, dim=1, stable=True)  # fp32 difference distances, ties by bank index
    return d[:, :k], i[:, :k]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_dense_cpu_pass_equals_faiss_path_and_full_reference(k, monkeypatch):
    from adtrain.memory import dense_exact

    queries, bank = _dense_ties()
    calls = {"redo": 0}
    real_exact = dense_exact.exact_search

    def counting(*args, **kwargs):
        calls["redo"] += 1
        return real_exact(*args, **kwargs)

    monkeypatch.setattr(dense_exact, "exact_search", counting)
    dense, flat = MemoryBank(backend="auto"), MemoryBank(backend="faiss")
    dense.set_bank(bank)
    flat.set_bank(bank)
    assert dense.dense_exact(queries, torch.device("cpu")) and not flat.dense_exact(queries, torch.device("cpu"))
    d, idx = dense.search(queries, k)
    dense_redos = calls["redo"]  # the FAISS path below redoes through the same certified_rerank
    rd, ri = _full_reference(queries, bank, k)
    assert torch.equal(idx, ri) and torch.equal(d, rd)  # bit for bit, ties by index
    fd, fi = flat.search(queries, k)
    assert torch.equal(idx, fi) and torch.equal(d, fd)  # what the general path returned before
    assert dense_redos == 1  # the 31 duplicates cannot be certified within the pad: full pass


def test_dense_cpu_pass_reranks_only_as_wide_as_needed(monkeypatch):
    from adtrain.memory import bank as bank_mod
    from adtrain.memory.dense_exact import dense_certified_search, widths

    assert widths(3, 11) == [3, 4, 5, 7, 11] and widths(1, 9) == [1, 2, 3, 5, 9] and widths(3, 3) == [3]
    queries, bank = _dense_ties(seed=1)
    seen = []

    def spy(q, b, cand, k, device=None):
        seen.append(cand.shape[1])
        return bank_mod.rerank(q, b, cand, k, device)

    d, idx = dense_certified_search(queries, bank, 3, 8, spy, float(bank.norm(dim=1).max()))
    rd, ri = _full_reference(queries, bank, 3)
    assert torch.equal(idx, ri) and torch.equal(d, rd)
    assert seen[0] == 3 and max(seen[:-1]) <= 11  # most queries need just their k candidates
    assert seen[-1] >= 31  # the duplicates: the full pass (exact_search) ranks every tie
    # a bank no larger than k + pad: every item is a candidate, nothing to certify
    small = bank[:6]
    d, idx = dense_certified_search(queries, small, 3, 8, bank_mod.rerank, float(small.norm(dim=1).max()))
    rd, ri = _full_reference(queries, small, 3)
    assert torch.equal(idx, ri) and torch.equal(d, rd)


def test_nearest_pass_without_sorting_equals_the_sorted_pass(monkeypatch):
    """k = 1 (dense_exact.dense_nearest): group minima instead of topk, over several query blocks
    and a bank that is no multiple of the group; the same neighbours and distances bit for bit
    as the sorted pass and the full reference, duplicates past the pad searched in full, a NaN
    query and huge inputs handed to the sorted pass."""
    from adtrain.memory import bank_search as bank_mod
    from adtrain.memory import dense_exact

    queries, bank = _dense_ties(seed=2, n=1201)
    monkeypatch.setattr(dense_exact, "NEAREST_BLOCK_FLOATS", 40 * 1216)  # 40-query blocks: 4 blocks
    widths_seen = []

    def spy(q, b, cand, k, device=None):
        widths_seen.append(cand.shape[1])
        return bank_mod.rerank(q, b, cand, k, device)

    m_max = float(bank.norm(dim=1).max())
    d, idx = dense_exact.dense_nearest(queries, bank, 8, spy, m_max)
    rd, ri = _full_reference(queries, bank, 1)
    assert torch.equal(idx, ri) and torch.equal(d, rd)
    sd, si = dense_exact.dense_certified_search(queries, bank, 1, 8, bank_mod.rerank, m_max)
    assert torch.equal(idx, si) and torch.equal(d, sd)
    assert widths_seen[0] == 1  # most queries: their nearest item alone
    assert 5 in widths_seen  # the 5 near ties of bank[199]: all of them, no more
    assert widths_seen[-1] >= 31  # the 31 exact duplicates: the full pass ranks every tie
    # a NaN query: no item lies at or below its threshold; it is searched again in full
    nan_q = queries[:3].clone()
    nan_q[1, 0] = float("nan")
    d, idx = dense_exact.dense_nearest(nan_q, bank, 8, bank_mod.rerank, m_max)
    sd, si = dense_exact.dense_certified_search(nan_q, bank, 1, 8, bank_mod.rerank, m_max)
    assert torch.equal(idx, si) and torch.equal(d[[0, 2]], sd[[0, 2]]) and torch.isnan(d[1]).all() == torch.isnan(sd[1]).all()
    # the search takes it for k = 1 on the CPU
    calls = []
    monkeypatch.setattr(bank_mod, "dense_nearest", lambda *a: calls.append(1) or dense_exact.dense_nearest(*a))
    mb = MemoryBank()
    mb.set_bank(bank)
    assert torch.equal(mb.search(queries, 1)[1], ri) and calls == [1]


def test_dense_cpu_pass_selection():
    queries, bank = _dense_ties()
    cpu = torch.device("cpu")
    for backend in ("auto", "torch"):
        mb = MemoryBank(backend=backend)
        mb.set_bank(bank)
        assert mb.dense_exact(queries, cpu)
    for kwargs in ({"backend": "faiss"}, {"index": "ivf"}, {"distance_dtype": "bfloat16"}):
        mb = MemoryBank(**kwargs)
        mb.set_bank(bank)
        assert not mb.dense_exact(queries, cpu), kwargs
    big = MemoryBank()
    big.set_bank(torch.randn(MemoryBank.DENSE_MAX_ROWS + 1, 4, generator=_gen(5)))
    assert not big.dense_exact(torch.zeros(2, 4), cpu)  # larger banks: FAISS flat (faster there)
    mb = MemoryBank()
    mb.set_bank(bank)
    before = torch.get_float32_matmul_precision()
    try:  # a reduced-precision fp32 matmul (oneDNN bf16) would break the fp32 bound: not taken
        torch.set_float32_matmul_precision("medium")
        assert not mb.dense_exact(queries, cpu)
        rd, ri = _full_reference(queries, bank, 3)
        assert torch.equal(mb.search(queries, 3)[1], ri)
    finally:
        torch.set_float32_matmul_precision(before)
    assert mb.dense_exact(queries, cpu)


@pytest.mark.parametrize("floats", [1, 24 * 7, 24 * 5 * 13])
def test_exact_distances_are_the_same_in_any_chunking(floats, monkeypatch):
    """exact_distances gathers the indexed rows chunk by chunk (8 MiB on the CPU, not 32: page
    faults); any chunk size, one row at a time included, gives the same bits as one chunk."""
    from adtrain.memory import index

    g = _gen(3)
    queries, bank = torch.randn(37, 24, generator=g), torch.randn(50, 24, generator=g)
    idx = torch.randint(0, 50, (37, 5), generator=g)
    monkeypatch.setattr(index, "GATHER_FLOATS_CPU", 1 << 30)
    whole = index.exact_distances(queries, bank, idx)
    monkeypatch.setattr(index, "GATHER_FLOATS_CPU", floats)
    assert torch.equal(index.exact_distances(queries, bank, idx), whole)
    assert torch.equal(whole, (queries.unsqueeze(1) - bank[idx]).norm(dim=-1))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_searches_and_coresets_under_a_bf16_autocast_are_the_fp32_answers(backend):
    """trainer.precision=bf16-mixed runs test_step under autocast: the projected CPU pass failed
    (topk's fp32 out buffers got bf16), and a search or coreset done in bf16 would break the
    certificates' fp32 bounds. Under any autocast they now give the fp32 answer, bit for bit."""
    from adtrain.methods.patch_features import _axis_operator, _axis_operator_on, reduced_map

    feats = _clustered(3000, dim=64, seed=3)
    queries = _clustered(400, dim=64, seed=4)
    picked = greedy_coreset(feats, n=300, projection_dim=32, seed=0)

    def bank():
        mb = MemoryBank(backend=backend)
        mb.add(feats)
        mb.build(coreset_ratio=0.1, projection_dim=32, seed=0)
        return mb

    plain = bank()
    want = [plain.search(queries, k) for k in (1, 3)]
    want_nd = nearest_distances(queries, plain, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(greedy_coreset(feats, n=300, projection_dim=32, seed=0), picked)
        mixed = bank()
        assert torch.equal(mixed.bank, plain.bank)
        got = [mixed.search(queries, k) for k in (1, 3)]
        got_nd = nearest_distances(queries, mixed, 3)
        _axis_operator.cache_clear()
        _axis_operator_on.cache_clear()  # built afresh under the autocast: cached for every later call
        blurred = reduced_map(torch.rand(2, 8, 8), (32, 32), 4.0, (32, 32))
    for (d0, i0), (d1, i1) in zip(want, got):
        assert d1.dtype == torch.float32 and torch.equal(i0, i1) and torch.equal(d0, d1)
    assert torch.equal(want_nd[1], got_nd[1]) and torch.equal(want_nd[0], got_nd[0])
    assert _axis_operator(8, 32, 4.0, 32).dtype == torch.float32 and blurred.dtype == torch.float32
    reduced_map(torch.rand(2, 8, 8), (32, 32), 4.0, (32, 32))  # outside the autocast: fp32 operators still


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_a_faiss_index_built_slice_by_slice_equals_one_built_from_the_whole_centred_bank(kind, monkeypatch):
    """The centred rows reach FAISS a slice at a time (the flat index's storage filled in place): the
    whole centred copy beside the bank and FAISS's own held the bank 3x at the build. The index must
    be the very one a single add of the centred bank makes."""
    import numpy as np

    import adtrain.memory.index as index_mod

    monkeypatch.setattr(index_mod, "ADD_BYTES", 4 * 24 * 1000)  # slices of 1,000 rows of 24: 7 of them
    torch.manual_seed(0)
    bank = torch.randn(6500, 24) * 3 + 40  # far from the origin: the centring matters
    center = bank.mean(dim=0)
    whole = np.ascontiguousarray((bank - center).numpy())
    built = index_mod.build_faiss_index(bank, kind, nlist=16, pq_m=4, center=center)
    ref = index_mod.build_faiss_index(whole, kind, nlist=16, pq_m=4)
    monkeypatch.setattr(index_mod, "ADD_BYTES", 1 << 40)
    one = index_mod.build_faiss_index(whole, kind, nlist=16, pq_m=4)  # one add, one slice
    q = np.ascontiguousarray((torch.randn(300, 24) * 3 + 40 - center).numpy())
    assert built.ntotal == ref.ntotal == one.ntotal == 6500
    for other in (ref, one):
        d1, i1 = built.search(q, 4)
        d2, i2 = other.search(q, 4)
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    if kind == "flat":  # the storage itself: the centred rows, in order
        stored = faiss.rev_swig_ptr(built.codes.data(), whole.nbytes).view(np.float32).reshape(whole.shape)
        assert np.array_equal(stored, whole)
