"""Exact searches stay exact where features are tiny or far from the origin beside their spread.

The certified passes' error bounds need a term no norm scales (a product rounded into a format's
subnormal range is off by a fixed amount), and every search path that ranks by the expansion
||q||^2 - 2 q.m + ||m||^2 must centre first: each case below returned wrong neighbours before.
"""

from __future__ import annotations

import pytest
import torch

from adtrain.memory import MemoryBank, nearest_distances
from adtrain.memory.graph_knn import graph_knn
from adtrain.memory.index import exact_distances

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _reference(q, bank, k):
    """The fp32 neighbours by differences over the whole bank, ties by index."""
    full = exact_distances(q.float(), bank.float(), torch.arange(bank.shape[0]).expand(q.shape[0], -1))
    d, i = torch.sort(full, dim=1, stable=True)
    return d[:, :k], i[:, :k]


def _offset_bank(n, dim, offset, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    return offset + spread * torch.randn(n, dim, generator=g), offset + spread * torch.randn(60, dim, generator=g)


@pytest.mark.parametrize("dtype,projection,offset,spread", [
    ("float16", "off", 0.5, 1e-4),      # centred norms ~1e-3: fp16 products in the subnormal range
    ("bfloat16", "off", 0.0, 1e-20),    # bf16 / fp32 products below the smallest normal
    ("float32", "auto", 0.0, 1e-23),    # the projected pass's bound, distances flushing to zero
])
@pytest.mark.parametrize("k", [1, 4])
def test_certified_passes_hold_on_tiny_centred_norms(dtype, projection, offset, spread, k):
    bank, q = _offset_bank(800, 48, offset, spread)
    if projection == "auto":  # a low-rank bank, so the projected pass is the one taken
        bank = bank[:, :6].repeat(1, 8)
        q = q[:, :6].repeat(1, 8)
    mb = MemoryBank(backend="torch", distance_dtype=dtype, projection=projection)
    mb.set_bank(bank)
    if projection == "auto":
        assert mb._projection() is not None
    d, i = mb.search(q, k)
    want_d, want_i = _reference(q, bank, k)
    assert torch.equal(i, want_i)


def test_graph_search_and_a_tensor_bank_centre_a_bank_far_from_the_origin():
    """Offset 100, spread 0.01: the uncentred expansion lost the order to cancellation (99 of 100
    traced rows and 98 of 100 tensor-bank rows wrong before), the eager MemoryBank did not."""
    bank, q = _offset_bank(1500, 64, 100.0, 0.01, seed=1)
    want_d, want_i = _reference(q, bank, 3)
    _, gi = graph_knn(q, bank, 3)
    assert torch.equal(gi, want_i)
    d, ti = nearest_distances(q, bank, 3)
    assert torch.equal(ti, want_i) and torch.allclose(d, want_d, rtol=1e-5)


def test_a_bank_set_under_inference_mode_sees_its_in_place_changes():
    """An inference tensor has no version counter, so the FAISS index cached for it survived an
    in-place change and was searched stale; set_bank now keeps a tensor that has one."""
    g = torch.Generator().manual_seed(3)
    x, q = torch.randn(300, 16, generator=g), torch.randn(20, 16, generator=g)
    with torch.inference_mode():
        mb = MemoryBank(backend="faiss")
        mb.set_bank(x.clone())
        mb.search(q[:2], 1)  # the index is built and cached
        mb.bank.mul_(-1.0).add_(3.0)
        _, i = mb.search(q, 3)
    assert torch.equal(i, _reference(q, 3.0 - x, 3)[1])
