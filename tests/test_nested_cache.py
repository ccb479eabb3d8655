"""memory.nested: the sweep's shared coreset order and nearest-neighbour records are bit-identical
to the uncached path (prefixes, resumed extensions, exact and near ties)."""

from __future__ import annotations

import json

import pytest
import torch

from adtrain.memory import MemoryBank
from adtrain.memory.coreset import greedy_coreset
from adtrain.memory.nested import NestedCache, greedy_resume


def _data(kind: str, n: int = 800, dim: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, dim, generator=g)
    if kind == "dup":  # many exact duplicates and a coarse grid: ties everywhere
        x = x.round()
        x[n // 2:] = x[: n - n // 2]
    if kind == "rep":  # 60 distinct rows: past them the greedy picks points at distance 0 (all tied)
        x = x[:60].repeat(n // 60 + 1, 1)[:n]
    return x


@pytest.fixture
def one_thread():
    """Thousands of tiny ops: one thread (OpenMP wake-ups crawl on shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["random", "dup", "rep"])
def test_greedy_prefix_and_resume_bit_identical(kind, one_thread):
    x = _data(kind)
    fresh = {n: greedy_coreset(x, n=n, pool=32, progress=False) for n in (15, 100, 250)}
    assert torch.equal(fresh[15], fresh[250][:15]) and torch.equal(fresh[100], fresh[250][:100])
    part, state = greedy_resume(x, 100, pool=32)
    assert torch.equal(part, fresh[100])
    prefix, same = greedy_resume(x, 15, pool=32, state=state)
    assert torch.equal(prefix, fresh[15]) and same is state
    more, state2 = greedy_resume(x, 250, pool=32, state=state)  # resumed: as one uninterrupted run
    assert torch.equal(more, fresh[250])
    again, _ = greedy_resume(x, 251, pool=32, state=state2)
    assert torch.equal(again, greedy_coreset(x, n=251, pool=32, progress=False))


def _bank(rows: torch.Tensor) -> MemoryBank:
    mem = MemoryBank(backend="faiss" if _faiss() else "torch")
    mem.set_bank(rows)
    return mem


def _faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("kind", ["random", "dup"])
def test_records_answer_equals_search_for_every_prefix(kind, tmp_path, one_thread):
    x = _data(kind, n=4000, dim=12)
    cache = NestedCache(tmp_path / "c")
    full = cache.coreset(x, 0.25, projection_dim=128, seed=0)  # 1000 rows: the largest job
    g = torch.Generator().manual_seed(2)
    q = torch.cat([x[torch.randint(4000, (300,), generator=g)],  # exact hits, duplicated rows
                   torch.randn(300, 12, generator=g),
                   x[:50] + 1e-7 * torch.randn(50, 12, generator=g)])  # near ties
    q = torch.cat([q, q[:40]])  # duplicate queries
    ratios = (0.05, 0.25, 0.01, 0.1, 0.2)  # computed, extended, prefix, prefix, prefix
    for ratio in ratios:
        idx = cache.coreset(x, ratio, projection_dim=128, seed=0)
        assert torch.equal(idx, full[: idx.shape[0]])
        mem = _bank(x[idx])
        got = cache.nearest(q, mem)
        _, ref = mem.search(q, 1)
        assert got is not None and torch.equal(got, ref[:, 0]), ratio
    assert cache.lookups == {"computed": 1, "extended": 1, "hit": 3}
    assert cache.coreset_use == "prefix" and cache.state() == "hit"
    assert cache.nearest(q, _bank(x[:50])) is None  # not the coreset built last: searched as usual
    assert cache.nearest(q, _bank(x[idx].flip(0))) is None  # same size, other rows (another task's bank)
    again = _bank(x[idx].clone())  # the same rows in a new tensor (a reloaded checkpoint): served
    assert torch.equal(cache.nearest(q, again), mem.search(q, 1)[1][:, 0])


def test_records_with_repeated_bank_rows(tmp_path, one_thread):
    """Late in a coreset of coarse data the bank repeats rows (equal distances): the lower index
    wins, as in MemoryBank.search, for every prefix length."""
    cache = NestedCache(tmp_path / "c")
    x = torch.randn(100, 6, generator=torch.Generator().manual_seed(3)).round().repeat(4, 1)
    q = torch.cat([x, x.flip(0) + 0.5])
    for length in (360, 1, 7, 100, 359):
        idx = cache.coreset(x, (length + 0.5) / 400, projection_dim=128, seed=3)
        assert idx.shape[0] == length
        mem = _bank(x[idx])
        got = cache.nearest(q, mem)
        assert torch.equal(got, mem.search(q, 1)[1][:, 0]), length
    assert len(set(map(tuple, x[idx].tolist()))) < idx.shape[0]  # the bank does repeat rows


@pytest.mark.parametrize("damage", ["random_bytes", "other_layout"])
def test_a_damaged_entry_is_named_deleted_and_recomputed(tmp_path, caplog, one_thread, damage):
    """Every coreset and records entry overwritten (random bytes: torch's UnpicklingError; or a
    loadable dict without the entry's keys): each named in a warning and deleted, the coreset and
    the neighbours computed again as if the cache were empty, and the entries stored whole."""
    import logging
    import random

    x = _data("random", n=600, dim=8)
    q = torch.randn(50, 8, generator=torch.Generator().manual_seed(4))
    first = NestedCache(tmp_path / "c")
    idx = first.coreset(x, 0.1, seed=0)
    mem = _bank(x[idx])
    ref = first.nearest(q, mem)
    entries = sorted((tmp_path / "c").rglob("*.pt"))
    assert len(entries) == 2  # the coreset's and the query batch's records
    for path in entries:
        if damage == "random_bytes":
            path.write_bytes(random.Random(0).randbytes(200))
        else:
            torch.save({"order": torch.zeros(3, dtype=torch.long)}, path)
    cache = NestedCache(tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        assert torch.equal(cache.coreset(x, 0.1, seed=0), idx)
        assert torch.equal(cache.nearest(q, _bank(x[idx])), ref)
    for path in entries:
        assert f"coreset cache entry {path} unreadable" in caplog.text
    assert cache.coreset_use == "computed" and cache.lookups == {"hit": 0, "extended": 0, "computed": 1}
    warm = NestedCache(tmp_path / "c")  # stored again: served
    assert torch.equal(warm.coreset(x, 0.1, seed=0), idx) and warm.coreset_use == "prefix"
    assert torch.equal(warm.nearest(q, _bank(x[idx])), ref) and warm.lookups["hit"] == 1


def _sweep_job(fast_cfg, tmp_path, name, ratio, on: bool):
    from adtrain.run import run

    base = ["method=patchcore", "backbone=resnet18", "backbone.pretrained=false", "method.image_size=[64,64]",
            "method.center_crop=null", "output.heatmaps=0", "data.num_test_normal=6", "data.num_test_anomalous=6",
            f"paths.cache_dir={tmp_path / 'cache'}", "data.cache=off", f"method.coreset_ratio={ratio}"]
    caches = ["feature_cache=on"] if on else ["feature_cache=off"]
    return run(fast_cfg(*base, *caches), tmp_path / name)


def test_sweep_results_identical_with_nested_cache(fast_cfg, tmp_path):
    keys = ("image_auroc", "image_ap", "image_f1max", "val_image_auroc", "threshold")
    jobs = {}
    for ratio in (0.05, 0.1):
        jobs[f"off{ratio}"] = _sweep_job(fast_cfg, tmp_path, f"off{ratio}", ratio, False)
        jobs[f"on{ratio}"] = _sweep_job(fast_cfg, tmp_path, f"on{ratio}", ratio, True)
        assert [jobs[f"off{ratio}"][k] for k in keys] == [jobs[f"on{ratio}"][k] for k in keys]
        assert ((tmp_path / f"off{ratio}" / "scores.csv").read_text()
                == (tmp_path / f"on{ratio}" / "scores.csv").read_text())
    assert jobs["off0.05"]["nested_cache"] == "off"
    assert jobs["on0.05"]["nested_cache"] == "miss"
    second = jobs["on0.1"]
    assert second["nested_cache"] == "hit" and second["nested_cache_lookups"]["coreset"] == "extended"
    assert second["nested_cache_lookups"]["records"]["extended"] > 0
    saved = json.loads((tmp_path / "on0.1" / "results.json").read_text())
    assert saved["nested_cache"] == "hit"


def test_records_under_a_bf16_autocast_are_the_fp32_answers(tmp_path, one_thread):
    """trainer.precision=bf16-mixed with the nested cache on (it is with feature_cache=on): the records'
    distances came out of an autocast addmm in bf16 and failed to go into their fp32 buffer."""
    x = _data("random", n=2000, dim=12)
    q = torch.randn(200, 12, generator=torch.Generator().manual_seed(3))
    plain = NestedCache(tmp_path / "a")
    want_idx = plain.coreset(x, 0.1, projection_dim=64, seed=0)
    want = plain.nearest(q, _bank(x[want_idx]))
    mixed = NestedCache(tmp_path / "b")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = mixed.coreset(x, 0.1, projection_dim=64, seed=0)
        got = mixed.nearest(q, _bank(x[idx]))
    assert torch.equal(idx, want_idx) and got is not None and torch.equal(got, want)



@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_an_approximate_index_is_searched_as_configured_not_answered_from_exact_records(index, tmp_path, one_thread):
    """The records are exact; an IVF / HNSW run's own search is not: answering from them changed 1,462 of
    2,000 neighbours (and PatchCore's figures) with the cache on. Now they leave it to the configured index."""
    g = torch.Generator().manual_seed(0)
    feats, queries = torch.randn(4000, 32, generator=g), torch.randn(500, 32, generator=g)
    cache = NestedCache(tmp_path / "c")
    extra = {"nlist": 64, "nprobe": 1} if index == "ivf" else {"hnsw_m": 4, "hnsw_ef_search": 4}
    approx = MemoryBank(backend="faiss", index=index, **extra)
    approx.add(feats)
    approx.build(coreset_ratio=0.25, coreset=cache.coreset)
    assert cache.nearest(queries, approx) is None
    exact = MemoryBank(backend="torch", index=index)  # the torch backend searches exactly whatever the index
    exact.set_bank(approx.bank.clone())
    assert torch.equal(cache.nearest(queries, exact), exact.search(queries, 1)[1][:, 0])
