"""Exact k-NN with the distance pass in the bank's principal subspace (adtrain.memory.projected)."""

from __future__ import annotations

import pytest
import torch

from adtrain.errors import ConfigError
from adtrain.memory import MemoryBank
from adtrain.memory import projected
from adtrain.memory.bank import rerank
from tests.test_memory import _full_reference


def _low_rank(seed=0, n=1500, dim=96, rank=6, noise=0.03):
    """Image-feature-like rows: a few strong directions plus faint isotropic noise, with exact
    duplicates (ties past any pad) and near ties, and queries on, near and between them."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=g)
    bank = torch.randn(n, rank, generator=g) @ basis + noise * torch.randn(n, dim, generator=g)
    bank[100:140] = bank[99]  # 41 exact duplicates
    bank[200:204] = bank[199] + 1e-6 * torch.randn(4, dim, generator=g)
    queries = torch.cat([bank[99:100] + 1e-3, bank[199:200] + 1e-4, bank[:30],
                         torch.randn(300, rank, generator=g) @ basis + noise * torch.randn(300, dim, generator=g),
                         3 * torch.randn(20, dim, generator=g)])  # far off the subspace
    return queries, bank


_reference = _full_reference  # fp32 difference distances of every item, ties by bank index


def test_the_bound_never_exceeds_the_exact_distance():
    queries, bank = _low_rank()
    dim = projected.choose_dim(bank)
    proj = projected.Projection(bank, dim)
    qa, q_norm = proj.query_aug(queries)
    lb = qa.double() @ proj.bank_aug.double()
    exact = torch.cdist(queries.double(), bank.double()).square()
    assert (lb - proj.bound_error(q_norm).unsqueeze(1) <= exact).all()
    assert float((exact - lb).abs().median()) < 0.05 * float(exact.median())  # and it is tight


@pytest.mark.parametrize("k", [1, 3, 9])
def test_projected_search_equals_the_full_exact_ranking_with_ties(k, monkeypatch):
    queries, bank = _low_rank()
    calls = {"pass": 0}
    real = projected.projected_search

    def counting(*args, **kwargs):
        calls["pass"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(projected, "projected_search", counting)
    mb = MemoryBank()
    mb.set_bank(bank)
    proj = mb._projection()
    assert proj is not None and proj.dim == 8  # rank 6 -> the next multiple of 8
    d, i = mb.search(queries, k)
    rd, ri = _reference(queries, bank, k)
    assert torch.equal(i, ri) and torch.equal(d, rd)  # bit for bit, ties by index
    off = MemoryBank(projection="off")
    off.set_bank(bank)
    od, oi = off.search(queries, k)
    assert torch.equal(i, oi) and torch.equal(d, od)
    assert calls["pass"] >= 1  # the 41 duplicates are past the pad: searched again (wider, then full)


def test_uncertified_queries_are_searched_again(monkeypatch):
    queries, bank = _low_rank(seed=1)
    proj = projected.Projection(bank, projected.choose_dim(bank))
    pads = []
    real = projected.projected_search

    def spy(q, b, k, p, rr, pad=projected.PROJ_PAD):
        pads.append(pad)
        return real(q, b, k, p, rr, pad)

    monkeypatch.setattr(projected, "projected_search", spy)
    d, i = spy(queries, bank, 3, proj, rerank, pad=2)
    rd, ri = _reference(queries, bank, 3)
    assert torch.equal(i, ri) and torch.equal(d, rd)
    assert pads[:3] == [2, 8, 32]  # widened 4x per round while queries stay unproven


def test_projection_is_used_only_where_it_pays():
    g = torch.Generator().manual_seed(2)
    flat = torch.randn(800, 32, generator=g)  # isotropic: no subspace holds 99.9 % of it
    assert projected.choose_dim(flat) is None
    mb = MemoryBank()
    mb.set_bank(flat)
    assert mb._projection() is None
    q = torch.randn(50, 32, generator=g)
    assert torch.equal(mb.search(q, 3)[1], _reference(q, flat, 3)[1])  # the dense pass instead
    _, bank = _low_rank()
    assert projected.choose_dim(bank) == 8
    with pytest.raises(ConfigError, match="memory.projection"):
        MemoryBank(projection="pca")
    off = MemoryBank(projection="off")
    off.set_bank(bank)
    assert off._projection() is None


def test_the_projection_follows_a_changed_bank():
    queries, bank = _low_rank()
    mb = MemoryBank()
    mb.set_bank(bank.clone())
    first = mb._projection()
    with torch.no_grad():
        mb.bank.mul_(2.0)  # in place: the cached subspace must not be reused
    assert mb._projection() is not first
    rd, ri = _reference(queries, bank * 2.0, 3)
    d, i = mb.search(queries, 3)
    assert torch.equal(i, ri) and torch.equal(d, rd)
