"""CUDA paths end to end (skipped without a GPU; run on the lent GPU machine, see docs/BENCHMARKS.md)."""

import pytest
import torch

from tests.conftest import FAST, compose

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU = [o for o in FAST if not o.startswith("trainer.accelerator")] + [
    "trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed",
]


@pytest.mark.parametrize(
    "method, extra, min_auroc, tol",
    [  # tol: how far bf16 on the GPU may move a metric from the fp32 CPU run (trained methods more)
        ("patchcore", ["method.coreset_ratio=0.25"], 0.8, 0.05),
        ("patchcore", ["method.coreset_ratio=0.25", "method.memory.keep_on_host=true"], 0.8, 0.05),
        ("patchcore", ["method.coreset_ratio=0.25", "method.memory.backend=faiss"], 0.8, 0.05),
        ("cfa", ["trainer.max_epochs=2"], 0.7, 0.15),
        ("hetmm", ["method.templates=8"], 0.7, 0.05),
        ("stfpm", ["trainer.max_epochs=2"], None, 0.2),
        ("dfm", [], None, 0.15),
    ],
)
def test_methods_run_on_cuda_in_bf16(method, extra, min_auroc, tol, tmp_path):
    from adtrain.run import run

    res = run(compose(*GPU, f"method={method}", *extra), tmp_path / "gpu")
    cpu = run(compose(*FAST, f"method={method}", *extra), tmp_path / "cpu")  # the reference
    assert res["device"].startswith("cuda") and res["precision"] == "bf16-mixed"
    assert cpu["device"] == "cpu" and res["num_test"] == cpu["num_test"] == 16
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert abs(res[key] - cpu[key]) <= tol, (key, res[key], cpu[key])
    if min_auroc is not None:
        assert res["image_auroc"] > min_auroc


def test_coreset_on_gpu_from_host_features_matches_cpu():
    """The GPU coreset needs only the projection on the GPU: host features give the same
    selection as the CPU run (up to float near-ties late in the sequence)."""
    from adtrain.memory import MemoryBank, greedy_coreset

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6000, 256, generator=g)
    cpu = greedy_coreset(feats, 0.05)
    gpu = greedy_coreset(feats, 0.05, device="cuda")
    assert gpu.device.type == "cpu" and gpu.shape == cpu.shape
    assert torch.equal(gpu[:50], cpu[:50])
    assert len(set(gpu.tolist()) & set(cpu.tolist())) > 0.9 * cpu.numel()
    mb = MemoryBank(backend="torch").to("cuda")
    mb.add(feats)
    mb.build(coreset_ratio=0.05, device="cuda")
    assert mb.bank.is_cuda and len(mb) == cpu.numel()


@pytest.mark.parametrize("num_bins", [65536, 512])
def test_pixel_binning_on_cuda_matches_the_cpu(num_bins):
    """The pixel metrics' adaptive bins live on the GPU in a GPU test: the same bins and metrics
    as on the CPU, exact (65536) and merged (512: the merge's cumulative sums run on the GPU)."""
    from adtrain.metrics.pixel import PixelMetricAccumulator

    g = torch.Generator().manual_seed(3)
    batches = []
    for i in range(4):
        maps = torch.rand(4, 32, 32, generator=g, dtype=torch.float64) * (1 + i)
        masks = torch.zeros(4, 32, 32, dtype=torch.bool)
        masks[:2, 5:12, 8:20] = True
        masks[0, 20:24, 20:30] = True
        batches.append((maps + 0.5 * masks, masks))
    cpu, gpu = PixelMetricAccumulator(num_bins), PixelMetricAccumulator(num_bins)
    for maps, masks in batches:
        cpu.update(maps, masks)
        gpu.update(maps.cuda(), masks.cuda())
    assert gpu.bins.device.type == "cuda" and cpu.bins.device.type == "cpu"
    assert (num_bins < 4096) == (not cpu.bins.exact) == (not gpu.bins.exact)
    a, b = cpu.compute(), gpu.compute()
    assert (gpu.bins.counts["anomalous"].sum(), gpu.bins.counts["normal"].sum()) == \
        (cpu.bins.counts["anomalous"].sum(), cpu.bins.counts["normal"].sum())
    if cpu.bins.exact:  # one bin per distinct score on both devices: the same numbers
        assert all((gpu.bins.counts[c] == cpu.bins.counts[c]).all() for c in ("normal", "anomalous"))
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-12), key
    else:  # merged by cumulative mass, summed in another order on the GPU: within the bounds
        bound = cpu.error_bounds()
        assert abs(b["pixel_auroc"] - a["pixel_auroc"]) <= 2 * bound["pixel_auroc"] + 1e-12
        assert abs(b["pixel_aupro"] - a["pixel_aupro"]) <= 2 * bound["pixel_aupro"] + 1e-12


def test_held_exact_pixel_metrics_on_cuda_match_the_cpu():
    """metrics.exact_pixels on a GPU: the held scores are counted there (exact_counts' torch
    branch), the same groups and the same four figures as on the CPU."""
    from adtrain.metrics.pixel import PixelMetricAccumulator

    g = torch.Generator().manual_seed(4)
    maps = (torch.rand(8, 64, 64, generator=g) * 40).round() / 40  # ties between normal and anomalous pixels
    masks = torch.zeros(8, 64, 64, dtype=torch.bool)
    masks[:4, 10:30, 12:40] = True
    maps = maps + 0.3 * masks
    cpu, gpu = PixelMetricAccumulator(exact_pixels=1 << 20), PixelMetricAccumulator(exact_pixels=1 << 20)
    for i in range(0, 8, 2):
        cpu.update(maps[i:i + 2], masks[i:i + 2])
        gpu.update(maps[i:i + 2].cuda(), masks[i:i + 2].cuda())
    a, b = cpu.compute(), gpu.compute()
    assert cpu.exact and gpu.exact and len(gpu.bins) == 0
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-12), key
