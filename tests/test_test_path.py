"""The batched test path (issue 14): identical metrics / records / heatmaps to the per-image
reference, background writer errors naming the file, certified low-precision k-NN search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adtrain.errors import AdtrainError, ConfigError
from adtrain.memory import MemoryBank
from adtrain.memory.index import exact_distances
from adtrain.methods.base import AnomalyModule
from adtrain.methods.output import AnomalyOutput
from adtrain.metrics import AnomalyEvaluator
from adtrain.writer import BackgroundWriter

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class _Model(torch.nn.Module):
    """Deterministic maps from the images: per-pixel mean over channels, score = map max."""

    def forward(self, images):
        amap = images.mean(dim=1, keepdim=True) * 3.0
        return AnomalyOutput(amap, amap.flatten(1).amax(dim=1))


class _Method(AnomalyModule):
    def __init__(self):
        super().__init__()
        self.model = _Model()


def _batches(n_batches=3, b=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n_batches):
        label = torch.randint(0, 2, (b,), generator=g)
        label[0] = j % 2
        mask = (torch.rand(b, 1, size, size, generator=g) > 0.8).float() * label.view(-1, 1, 1, 1)
        out.append({"image": torch.randn(b, 3, size, size, generator=g) + mask, "label": label, "mask": mask,
                    "has_mask": torch.tensor([True] * (b - 1) + [bool(j % 2)]),
                    "path": [f"/d/{j}_{i}.png" for i in range(b)], "category": ["c"] * b,
                    "defect": ["bad" if int(v) else "good" for v in label],
                    "source_size": torch.tensor([[size, 2 * size]] * b)})
    return out


def _reference(method: AnomalyModule, batches, heatmap_dir: Path | None):
    """The per-image test path as it was before the batched one (copied from base.py)."""
    from adtrain.viz import denormalize, save_heatmap

    ev, records, files = AnomalyEvaluator(pixel_metrics=True, exact_pixels=method.test_exact_pixels), [], []
    for batch in batches:
        out = method.anomaly_output(batch["image"])
        ev.update(out.pred_score, batch["label"], out.anomaly_map, batch["mask"], batch["has_mask"])
        norm = method.normalize(out.pred_score, method.score_center).cpu()
        thr = float(method.threshold)
        for i, path in enumerate(batch["path"]):
            score = float(out.pred_score[i])
            records.append({"path": path, "category": batch["category"][i], "defect": batch["defect"][i],
                            "label": int(batch["label"][i]), "score": score, "normalized_score": float(norm[i]),
                            "prediction": int(score > thr) if np.isfinite(thr) else None})
            if heatmap_dir is not None and path in method.heatmap_paths:
                level = method.display_threshold()  # the pixel threshold where fitted, else the image threshold
                norm_map = method.normalize(out.anomaly_map[i, 0], method.map_center, level).clamp(0, 1)
                if not torch.isfinite(method.threshold):
                    m = out.anomaly_map[i, 0]
                    norm_map = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
                mask = batch["mask"][i, 0].numpy() if bool(batch["has_mask"][i]) else None
                name = f"{len(files):03d}_{batch['category'][i]}_{batch['defect'][i]}_{Path(path).stem}.png"
                save_heatmap(heatmap_dir / name, image=denormalize(batch["image"][i]), norm_map=norm_map.float().numpy(),
                             mask=mask, score=score, threshold=thr, label=int(batch["label"][i]),
                             map_threshold=float(level) if torch.isfinite(method.pixel_threshold) else None,
                             defect=str(batch["defect"][i]), height=int(method.heatmap_size),
                             source_size=tuple(int(v) for v in batch["source_size"][i]))
                files.append(str(heatmap_dir / name))
    return ev.compute(), records, files


def _run_batched(method: AnomalyModule, batches):
    method.on_test_epoch_start()
    for j, batch in enumerate(batches):
        method.test_step(batch, j)
    method.on_test_epoch_end()
    return method.test_results(), method.test_records, method.heatmap_files


@pytest.mark.parametrize("threshold,pixel_threshold", [(1.5, float("nan")), (1.5, 1.2), (float("nan"), float("nan"))])
def test_batched_path_matches_per_image_reference(tmp_path, threshold, pixel_threshold):
    batches = _batches()
    method = _Method().eval()
    method.threshold.fill_(threshold)
    method.pixel_threshold.fill_(pixel_threshold)
    method.score_center.fill_(0.25)
    method.map_center.fill_(0.1)
    method.heatmap_size = 48
    method.heatmap_paths = {"/d/0_1.png", "/d/1_0.png", "/d/2_3.png"}
    (tmp_path / "ref").mkdir()
    (tmp_path / "new").mkdir()
    want = _reference(method, batches, tmp_path / "ref")
    method.heatmap_dir = tmp_path / "new"
    got = _run_batched(method, batches)
    assert got[0] == want[0] and got[0]["pixel_auroc"] is not None
    assert got[1] == want[1] and len(got[1]) == 12
    assert [Path(f).name for f in got[2]] == [Path(f).name for f in want[2]] and len(got[2]) == 3
    for a, b in zip(got[2], want[2]):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    # a second epoch starts clean
    assert _run_batched(method, batches[:1])[1] == want[1][:4]


def test_finish_test_takes_gathered_outputs():
    """The hook a multi-process run uses: replaced (gathered) outputs give the records/metrics."""
    from adtrain.methods.test_outputs import TestOutputs

    batches = _batches()
    method = _Method().eval()
    method.on_test_epoch_start()
    outs = TestOutputs()
    for batch in batches:
        outs.add(batch, method.anomaly_output(batch["image"]).pred_score)
    t = outs.tensors()
    gathered = TestOutputs()
    gathered.set({"score": t["score"].flip(0), "label": t["label"].flip(0)}, {k: v[::-1] for k, v in outs.meta.items()})
    method.finish_test(gathered)
    assert [r["path"] for r in method.test_records] == outs.meta["path"][::-1]
    assert method.evaluator.image_scores == t["score"].flip(0).double().tolist()


def test_evaluator_defers_checks_to_compute():
    ev = AnomalyEvaluator(pixel_metrics=False)
    ev.update(torch.tensor([0.5, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(AdtrainError, match="pred_score"):
        ev.compute()
    ev.reset()
    ev.update(torch.tensor([0.5]), torch.tensor([2]))
    with pytest.raises(AdtrainError, match="label must be 0"):
        ev.compute()
    with pytest.raises(AdtrainError, match="values but label"):
        ev.update(torch.tensor([0.5, 0.2]), torch.tensor([1]))


def _boom(path):
    raise OSError("disk full")


def test_writer_error_is_raised_with_the_file_name(tmp_path):
    writer = BackgroundWriter(max_pending=2)
    writer.submit(tmp_path / "a.png", lambda p: Path(p).write_text("ok"))
    writer.submit(tmp_path / "bad.png", _boom)
    writer.submit(tmp_path / "c.png", lambda p: Path(p).write_text("late"))  # skipped after the error
    with pytest.raises(AdtrainError, match=r"bad\.png.*disk full"):
        writer.close()
    assert (tmp_path / "a.png").read_text() == "ok" and not (tmp_path / "c.png").exists()
    with pytest.raises(AdtrainError, match="closed"):
        writer.submit(tmp_path / "d.png", _boom)


def test_writers_left_running_are_stopped_at_exit_after_their_queued_jobs(tmp_path):
    """A run ended by Ctrl-C or an error with heatmaps queued: the exit hook lets the queued jobs
    finish and joins the thread, instead of tearing it down mid-job (which aborted the process)."""
    import threading
    import time

    from adtrain.writer import stop_all

    gate = threading.Event()

    def slow(p):
        gate.wait(5)
        time.sleep(0.05)
        Path(p).write_text("done")

    writer = BackgroundWriter(max_pending=4)
    writer.submit(tmp_path / "a.png", slow)
    writer.submit(tmp_path / "b.png", lambda p: Path(p).write_text("done"))
    gate.set()
    stop_all()
    assert not writer._thread.is_alive()
    assert (tmp_path / "a.png").read_text() == "done" and (tmp_path / "b.png").read_text() == "done"
    stop_all()  # twice: nothing left to do


def test_heatmap_write_failure_surfaces_at_epoch_end(tmp_path):
    method = _Method().eval()
    method.heatmap_dir = tmp_path / "not_a_dir"
    method.heatmap_dir.write_text("a file where the heatmap folder should be")
    method.heatmap_paths = {"/d/0_1.png"}
    with pytest.raises(AdtrainError, match=r"not_a_dir/000_c_\w+_0_1\.png"):
        _run_batched(method, _batches(1))


# ---------------------------------------------------------------- certified low-precision search
def _fp32_reference(queries, bank, k):
    """Exact fp32 neighbours: difference distances to every row, ties by index."""
    full = exact_distances(queries, bank, torch.arange(bank.shape[0]).expand(queries.shape[0], -1))
    d, i = torch.sort(full, dim=1, stable=True)
    return d[:, :k], i[:, :k]


def _tie_data(seed=0, n=2000, dim=48):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=g) * 3
    bank = centres[torch.randint(0, 20, (n,), generator=g)] + torch.randn(n, dim, generator=g)
    bank[100:140] = bank[99]  # exact duplicates: ties
    bank[200:260] = bank[199] + 1e-5 * torch.randn(60, dim, generator=g)  # near ties
    queries = torch.cat([bank[99:100] + 0.01, bank[199:200] + 1e-3, bank[:50],
                         centres[torch.randint(0, 20, (100,), generator=g)] + torch.randn(100, dim, generator=g)])
    return queries, bank


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("k", [1, 9])
def test_low_precision_search_returns_exact_fp32_neighbours(dtype, k):
    queries, bank = _tie_data()
    mb = MemoryBank(backend="torch", distance_dtype=dtype, bank_chunk=512, search_chunk=64)
    mb.set_bank(bank)
    assert mb.low_precision(queries, torch.device("cpu")) is not None
    d, idx = mb.search(queries, k)
    rd, ri = _fp32_reference(queries, bank, k)
    assert torch.equal(idx, ri) and torch.equal(d, rd)
    ref32 = MemoryBank(backend="torch", distance_dtype="float32")
    ref32.set_bank(bank)
    assert torch.equal(ref32.search(queries, k)[1], ri)  # fp32 path breaks ties the same way


@pytest.mark.parametrize("chunks", [(64, 512), (1000, 300), (7, 2000)])
def test_nearest_pass_keeps_every_tie_across_query_and_bank_blocks(chunks, monkeypatch):
    """k = 1 without sorting (memory.lowp_nearest): the same exact neighbours as the fp32
    reference over duplicates past the cap (searched again), near ties, non-finite rows and
    running thresholds carried across bank slices; candidates per query stay few."""
    import adtrain.memory.lowp_nearest as ln
    from adtrain.memory.bank import rerank

    queries, bank = _tie_data()
    queries[5] = float("nan")
    queries[6, 3] = float("inf")
    redone = []

    def spy_exact(q, b, k, rr, device=None, center=None):
        redone.append(q.shape[0])
        return ln.exact_search.__wrapped__(q, b, k, rr, device, center)

    spy_exact.__wrapped__ = ln.exact_search
    monkeypatch.setattr(ln, "exact_search", spy_exact)
    for dtype in (torch.float16, torch.bfloat16):
        redone.clear()
        d, idx = ln.certified_nearest(queries, bank, dtype, *chunks, rerank, center=bank.mean(0), cap=33)
        rd, ri = _fp32_reference(queries, bank, 1)
        fin = torch.isfinite(queries).all(dim=1)
        assert torch.equal(idx[fin], ri[fin]) and torch.equal(d[fin], rd[fin])
        # fp16: the duplicates, the near ties, the two non-finite rows; bf16's coarser bound proves less
        assert 4 <= sum(redone) <= (4 if dtype == torch.float16 else 25)


def test_a_wider_cap_reranks_what_a_narrow_one_searches_again(monkeypatch):
    """The 40 duplicates and 60 near ties exceed a cap of 33 (a full fp32 search each) but not one
    of 128 (re-ranked over their own candidates): the same exact neighbours either way. The cap
    grows with the bank, from 33 to 256."""
    import adtrain.memory.lowp_nearest as ln
    from adtrain.memory.bank import rerank

    queries, bank = _tie_data()
    redone = []
    real = ln.exact_search
    monkeypatch.setattr(ln, "exact_search", lambda q, *a, **k: redone.append(q.shape[0]) or real(q, *a, **k))
    rd, ri = _fp32_reference(queries, bank, 1)
    for cap, searched_again in ((33, 2), (128, 0)):
        redone.clear()
        d, idx = ln.certified_nearest(queries, bank, torch.float16, 64, 512, rerank, center=bank.mean(0), cap=cap)
        assert torch.equal(idx, ri) and torch.equal(d, rd)
        assert sum(redone) == searched_again
    assert [ln.nearest_cap(n) for n in (500, 2000, 4096, 36044, 10**6)] == [33, 33, 64, 256, 256]
    queries, bank = _tie_data(n=4096)  # the bank's own search: cap 64 holds the 41 and 61 candidates
    mb = MemoryBank(backend="torch", distance_dtype="float16", bank_chunk=512, search_chunk=64)
    mb.set_bank(bank)
    redone.clear()
    d, idx = mb.search(queries, 1)
    rd, ri = _fp32_reference(queries, bank, 1)
    assert torch.equal(idx, ri) and torch.equal(d, rd) and sum(redone) == 0


def test_certificate_rejects_what_it_cannot_prove_and_fp32_redoes_it():
    from adtrain.memory.lowp import certified_search

    queries, bank = _tie_data()
    _, ok = certified_search(queries, bank, 1, 4, torch.float16, 64, 512)
    assert not bool(ok[:2].any())  # 40 duplicates / 60 near ties past a pad of 4: not provable
    assert bool(ok[2:].float().mean() > 0.9)  # bank rows themselves and well-separated queries are
    _, ok16 = certified_search(queries, bank, 1, 32, torch.bfloat16, 64, 512)
    assert ok16[52:].float().mean() < ok[52:].float().mean()  # bf16's coarser bound proves less
    # fp16 inputs out of range: no low-precision pass at all (fp32 search)
    mb = MemoryBank(backend="torch", distance_dtype="float16")
    mb.set_bank(bank * 1e4)
    assert mb.low_precision(queries * 1e4, torch.device("cpu")) is None
    assert torch.equal(mb.search(queries * 1e4, 3)[1], _fp32_reference(queries * 1e4, bank * 1e4, 3)[1])


def test_centred_pair_bounds_certify_a_dense_bank_with_a_large_mean(monkeypatch):
    """Post-ReLU features share a large mean and lie close together (a PatchCore bank of texture
    patches): bounds scaled by the raw norms prove almost no query there, bounds of each pair on
    vectors centred on the bank's mean prove them all, and the search stays the exact fp32 one."""
    from adtrain.memory.lowp import certified_search

    g = torch.Generator().manual_seed(5)
    mean = torch.rand(256, generator=g) * 2 + 1
    bank = torch.relu(mean + 0.3 * torch.randn(3000, 256, generator=g))
    queries = torch.relu(mean + 0.3 * torch.randn(400, 256, generator=g))
    _, raw = certified_search(queries, bank, 1, 32, torch.float16, 128, 1024)
    _, centred = certified_search(queries, bank, 1, 32, torch.float16, 128, 1024, center=bank.mean(0))
    assert raw.float().mean() < 0.05 and centred.float().mean() > 0.95
    mb = MemoryBank(backend="torch", distance_dtype="float16", bank_chunk=1024, search_chunk=128)
    mb.set_bank(bank)
    import adtrain.memory.bank_search as bank_mod  # the module whose search reads these names

    widths = []

    def spy(q, b, cand, k, device=None):
        widths.append((cand.shape[0], cand.shape[1]))
        return bank_mod.rerank.__wrapped__(q, b, cand, k, device)

    spy.__wrapped__ = bank_mod.rerank
    monkeypatch.setattr(bank_mod, "rerank", spy)
    for k in (1, 9):
        widths.clear()
        d, idx = mb.search(queries, k)
        rd, ri = _fp32_reference(queries, bank, k)
        assert torch.equal(idx, ri) and torch.equal(d, rd)
        # only the candidates whose lower bound reaches the k-th upper bound are re-ranked exactly
        reranked = sum(rows * width for rows, width in widths)
        assert reranked < 0.5 * len(queries) * (k + 32), (k, widths)


def test_distance_dtype_config():
    from adtrain.memory.lowp import resolve_distance_dtype

    assert resolve_distance_dtype("auto", "cpu") is None
    assert resolve_distance_dtype("auto", "cuda") is torch.float16
    assert resolve_distance_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(ConfigError, match="memory.distance_dtype"):
        MemoryBank(distance_dtype="int8")
    assert MemoryBank(index="ivf", distance_dtype="float16").low_precision(torch.zeros(1, 2), torch.device("cpu")) is None


@cuda
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_low_precision_search_on_cuda_is_exact(dtype):
    queries, bank = _tie_data()
    mb = MemoryBank(backend="torch", distance_dtype=dtype).cuda()
    mb.set_bank(bank)
    host = MemoryBank(backend="torch", distance_dtype=dtype, keep_on_host=True, bank_chunk=256).cuda()
    host.set_bank(bank)
    for k in (1, 9):  # k = 1: the row-minimum pass (lowp_nearest, fp32-output GEMM on CUDA)
        d, idx = mb.search(queries.cuda(), k)
        rd, ri = _fp32_reference(queries.cuda(), bank.cuda(), k)
        assert torch.equal(idx, ri) and torch.equal(d, rd)
        assert torch.equal(host.search(queries.cuda(), k)[1], ri)


@cuda
def test_nearest_pass_on_cuda_equals_the_sorted_pass_on_a_dense_bank():
    from adtrain.memory.bank import LOWP_PAD, rerank
    from adtrain.memory.dense_exact import certified_rerank
    from adtrain.memory.lowp import certified_pass
    from adtrain.memory.lowp_nearest import certified_nearest

    g = torch.Generator().manual_seed(5)
    mean = torch.rand(256, generator=g) * 2 + 1
    bank = torch.relu(mean + 0.3 * torch.randn(3000, 256, generator=g)).cuda()
    queries = torch.relu(mean + 0.3 * torch.randn(4000, 256, generator=g)).cuda()
    queries[7] = float("nan")
    cen = bank.mean(0)
    for chunks in ((16384, 4096), (512, 700)):
        d, i = certified_nearest(queries, bank, torch.float16, *chunks, rerank, center=cen, cap=1 + LOWP_PAD)
        cand, low, thr = certified_pass(queries, bank, 1, LOWP_PAD, torch.float16, *chunks, center=cen)
        rd, ri = certified_rerank(queries, bank, cand, low, 1, None, rerank, thr=thr)
        assert torch.equal(i, ri) and torch.equal(d[~d.isnan()], rd[~rd.isnan()])


@cuda
def test_batched_test_path_on_cuda_matches_reference(tmp_path):
    batches = _batches()
    method = _Method().eval()
    method.threshold.fill_(1.5)
    method.cuda()
    cuda_batches = [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    # the per-image path on the same device (a CUDA convolution rounds differently from the CPU's)
    want = _reference(method, cuda_batches, None)
    got = _run_batched(method, cuda_batches)
    assert got[1] == want[1]
    assert got[0]["image_auroc"] == want[0]["image_auroc"]


def test_pixel_work_skipped_only_where_no_test_image_can_have_truth():
    from types import SimpleNamespace

    from adtrain.data.dataset import Sample, load_sample
    from adtrain.engine import has_pixel_truth

    no_masks = [Sample("a.png", 0, None, "c", "good"), Sample("b.png", 1, None, "c", "bad")]
    with_mask = no_masks + [Sample("d.png", 1, "d_mask.png", "c", "bad")]
    assert not has_pixel_truth(SimpleNamespace(sample_loader=lambda: load_sample, test_samples=no_masks))
    assert has_pixel_truth(SimpleNamespace(sample_loader=lambda: load_sample, test_samples=with_mask))
    # a custom loader may make masks without files (synthetic data): never skipped
    assert has_pixel_truth(SimpleNamespace(sample_loader=lambda: (lambda s: None), test_samples=no_masks))


def test_exact_search_over_several_bank_slices_keeps_every_tie():
    from adtrain.memory.bank import rerank
    from adtrain.memory.lowp import exact_search

    g = torch.Generator().manual_seed(3)
    bank = torch.randint(-2, 3, (9000, 4), generator=g).float()  # a coarse grid: many exact ties
    queries = torch.randint(-2, 3, (20, 4), generator=g).float() + 0.5
    d, idx = exact_search(queries, bank, 5, rerank)
    rd, ri = _fp32_reference(queries, bank, 5)
    assert torch.equal(idx, ri) and torch.equal(d, rd)


class _CountingModel(_Model):
    """_Model that records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, images):
        self.calls.append(int(images.shape[0]))
        return super().forward(images)


def test_cpu_inference_runs_in_chunks_with_the_same_outputs():
    """inference.cpu_chunk_pixels: a CPU forward without gradients calls the model on at most that
    many input pixels (whole images), the outputs bit-identical to one call on the batch; with
    gradients (training) or 0, whole batches."""
    method = _Method()
    method.model = _CountingModel()
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    method.cpu_chunk_pixels = 0
    with torch.no_grad():
        whole = method.anomaly_output(images)
    assert method.model.calls == [10]
    method.model.calls.clear()
    method.cpu_chunk_pixels = 4 * 16 * 16 + 100  # 4 whole images per call
    with torch.no_grad():
        chunked = method.anomaly_output(images)
    assert method.model.calls == [4, 4, 2]
    assert torch.equal(chunked.anomaly_map, whole.anomaly_map) and torch.equal(chunked.pred_score, whole.pred_score)
    method.model.calls.clear()
    method.cpu_chunk_pixels = 10  # smaller than one image: one image per call
    with torch.no_grad():
        method.anomaly_output(images[:3])
    assert method.model.calls == [1, 1, 1]
    method.model.calls.clear()
    method.anomaly_output(images)  # gradients enabled (a training step): one call
    assert method.model.calls == [10]
    method.model.calls.clear()
    with torch.no_grad():  # traced for export: one call, no loop baked into the graph
        torch.jit.trace(lambda x: method.anomaly_output(x).pred_score, images, check_trace=False)
    assert method.model.calls == [10]


def test_cpu_chunk_config_key(tmp_path):
    from adtrain.build import build_method
    from tests.conftest import compose

    cfg = compose("method=patchcore", "backbone=resnet18", "backbone.pretrained=false", "inference.cpu_chunk_pixels=1024")
    assert build_method(cfg).cpu_chunk_pixels == 1024
    assert build_method(compose("method=patchcore", "backbone=resnet18", "backbone.pretrained=false")).cpu_chunk_pixels == 262144
    with pytest.raises(ConfigError, match="inference.cpu_chunk_pixels"):
        build_method(compose("method=patchcore", "backbone=resnet18", "backbone.pretrained=false", "inference.cpu_chunk_pixels=-1"))


def test_test_pixel_metrics_are_exact_up_to_their_budget_and_say_when_they_are_not():
    """metrics.exact_pixels: a test set past the bins' 65,536 distinct scores gets the exact pixel
    AUROC while its scores fit the budget; with budget 0 the bins stream, and pixel_exactness
    says so, with a bound the streamed figure keeps."""
    from sklearn.metrics import roc_auc_score

    from adtrain.build import build_method
    from tests.conftest import compose

    batches = _batches(n_batches=3, b=8, size=64, seed=3)  # 98,304 pixels, every score distinct
    keep = [bool(h) for batch in batches for h in batch["has_mask"]]
    scores = torch.cat([b["image"].mean(dim=1) * 3.0 for b in batches])[keep].numpy().ravel()
    truth = torch.cat([b["mask"][:, 0] for b in batches])[keep].numpy().ravel().astype(int)
    assert np.unique(scores).size > 65536
    method = _Method().eval()
    assert method.test_exact_pixels == 1 << 24
    exact = _run_batched(method, batches)[0]
    assert exact["pixel_auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert method.pixel_exactness() == {"pixel_metrics_exact": True,
                                        "pixel_error_bounds": {"pixel_auroc": 0.0, "pixel_ap": 0.0, "pixel_f1max": 0.0, "pixel_aupro": 0.0}}
    method.test_exact_pixels = 0
    streamed = _run_batched(method, batches)[0]
    state = method.pixel_exactness()
    bound = state["pixel_error_bounds"]["pixel_auroc"]
    assert state["pixel_metrics_exact"] is False and 0 < bound < 1e-3
    assert streamed["pixel_auroc"] != exact["pixel_auroc"]
    assert abs(streamed["pixel_auroc"] - exact["pixel_auroc"]) <= bound
    assert streamed["image_auroc"] == exact["image_auroc"]
    # no pixel truth: nothing to say
    method.pixel_metrics = False
    _run_batched(method, batches)
    assert method.pixel_exactness() == {"pixel_metrics_exact": None, "pixel_error_bounds": None}
    # the config key
    base = ("method=patchcore", "backbone=resnet18", "backbone.pretrained=false")
    assert build_method(compose(*base)).test_exact_pixels == 1 << 24
    assert build_method(compose(*base, "metrics.exact_pixels=1000")).test_exact_pixels == 1000
    with pytest.raises(ConfigError, match="metrics.exact_pixels"):
        build_method(compose(*base, "metrics.exact_pixels=-1"))


def test_full_fp32_search_reranks_each_query_over_its_own_candidates_only():
    """exact_search (the fallback of every certified pass): per-pair thresholds, centring on the
    bank's mean and one width per query give the exact fp32 neighbours while re-ranking a small
    fraction of what the old block-wide candidate count (max over a block of 2 eps windows at the
    bank's largest raw norm) re-ranked."""
    from adtrain.memory.bank import rerank
    from adtrain.memory.lowp import error_bound, exact_search

    g = torch.Generator().manual_seed(5)
    mean = torch.rand(256, generator=g) * 2 + 1
    bank = torch.relu(mean + 0.3 * torch.randn(3000, 256, generator=g))
    queries = torch.relu(mean + 0.3 * torch.randn(300, 256, generator=g))
    queries[3] = bank[10]  # an exact match
    widths = []

    def spy(q, b, cand, k, device=None):
        widths.append(cand.shape[0] * cand.shape[1])
        return rerank(q, b, cand, k, device)

    for k in (1, 9):
        rd, ri = _fp32_reference(queries, bank, k)
        work = {}
        for name, cen in (("raw", None), ("centred", bank.mean(0))):
            widths.clear()
            d, idx = exact_search(queries, bank, k, spy, center=cen)
            assert torch.equal(idx, ri) and torch.equal(d, rd), (k, name)
            work[name] = sum(widths)
        full = torch.cdist(queries, bank).square()
        kth = full.kthvalue(k, dim=1).values
        old_c = int((full <= (kth + 2 * error_bound(queries.norm(dim=1), float(bank.norm(dim=1).max()), 256,
                                                   torch.float32)).unsqueeze(1)).sum(dim=1).max())
        assert work["centred"] <= work["raw"] < len(queries) * old_c, (k, work, old_c)
        assert work["centred"] < 0.5 * len(queries) * old_c


def test_flat_faiss_pass_on_centred_vectors_certifies_a_dense_bank(monkeypatch):
    """The FAISS flat index holds the bank less its mean, and queries are centred the same way:
    the same neighbours, and the fp32 bound (at centred norms) proves nearly every query, where
    raw norms left most of them to the full fp32 re-search."""
    pytest.importorskip("faiss")
    import adtrain.memory.dense_exact as dense_exact
    from adtrain.memory.lowp import error_bound

    g = torch.Generator().manual_seed(5)
    mean = torch.rand(256, generator=g) * 20 + 10  # a large shared mean: raw norms ~ 300
    bank = torch.relu(mean + 0.3 * torch.randn(3000, 256, generator=g))
    queries = torch.relu(mean + 0.3 * torch.randn(400, 256, generator=g))
    redone = []
    real = dense_exact.exact_search

    def spy(q, *args, **kwargs):
        redone.append(q.shape[0])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(dense_exact, "exact_search", spy)
    mb = MemoryBank(backend="faiss", index="flat")
    mb.set_bank(bank)
    for k in (1, 9):
        redone.clear()
        d, idx = mb.search(queries, k)
        rd, ri = _fp32_reference(queries, bank, k)
        assert torch.equal(idx, ri) and torch.equal(d, rd)
        assert sum(redone) < 0.05 * len(queries), (k, sum(redone))
    # near-duplicates (clusters of 60 items, far closer together than the fp32 bound): k + 8
    # proves nothing, the second FAISS search with k + 128 kept proves them without a full pass
    import adtrain.memory.bank_search as bank_mod  # the module whose search reads these names

    searched = []
    real_faiss = bank_mod.faiss_search

    def spy_faiss(index, q, k, chunk, distances=False):
        searched.append((q.shape[0], k))
        return real_faiss(index, q, k, chunk, distances)

    monkeypatch.setattr(bank_mod, "faiss_search", spy_faiss)
    centres = torch.randn(50, 256, generator=g) + 5
    dup = centres.repeat_interleave(60, 0) + 1e-4 * torch.randn(3000, 256, generator=g)
    qd = centres[torch.arange(100) % 50] + 1e-4 * torch.randn(100, 256, generator=g)
    mb = MemoryBank(backend="faiss", index="flat")
    mb.set_bank(dup)
    redone.clear()
    d, idx = mb.search(qd, 1)
    rd, ri = _fp32_reference(qd, dup, 1)
    assert torch.equal(idx, ri) and torch.equal(d, rd)
    assert searched[-2:] == [(100, 9), (100, 129)] and sum(redone) == 0, (searched, redone)
    # the raw-norm bound of before: its 2 eps dwarfs the gap to the 9 candidates kept
    full = torch.cdist(queries, bank).square().sort(dim=1).values
    raw = 2 * error_bound(queries.norm(dim=1), float(bank.norm(dim=1).max()), 256, torch.float32)
    assert (full[:, 9] > full[:, 0] + 2 * raw).float().mean() < 0.5


def test_a_run_counts_anomalous_test_images_with_an_empty_mask(base_cfg, tmp_path, caplog):
    """An empty ground-truth mask on a defective image (its pixels then count as normal) is said in
    the log and counted in results.json, not taken silently."""
    import json
    import logging

    from adtrain.data.testing import write_mvtec_tree
    from adtrain.run import run

    root = write_mvtec_tree(tmp_path / "mvtec", "widget", n_train=8, n_test_good=2, defects={"crack": 3}, size=64)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "widget" / "ground_truth" / "crack" / "001_mask.png")
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        res = run(base_cfg("data=mvtec", f"data.root={root}", "data.category=widget", "data.num_workers=0",
                           "method=patchcore", "output.heatmaps=0"), tmp_path / "run")
    assert res["empty_anomaly_masks"] == 1 and res["pixel_auroc"] is not None
    assert json.loads((tmp_path / "run" / "results.json").read_text())["empty_anomaly_masks"] == 1
    assert "1 anomalous test image(s) have no anomalous pixel" in caplog.text


def test_threshold_fit_takes_the_true_median_of_an_even_count():
    """normalized_score is 0 at the held-out normals' median: of 4 scores 1, 2, 3, 4 that is 2.5
    (torch's .median() gave the lower middle value, 2)."""
    method = _Method().eval()
    # one-pixel images whose map (3 x the channel mean) and score are 1, 2, 3, 4
    batches = [{"image": torch.full((2, 3, 1, 1), v / 3.0) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)}
               for v in (1.0, 3.0)]  # scores 1, 2 then 3, 6 -> sorted 1, 2, 3, 6: median 2.5
    info = method.fit_threshold(batches, 0.5)
    assert info["normal_score_median"] == pytest.approx(2.5)
    assert float(method.map_center) == pytest.approx(2.5)
    assert info["threshold"] == pytest.approx(2.5)  # quantile 0.5, torch's linear interpolation
