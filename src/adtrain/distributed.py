"""DDP helpers: who writes, and per-sample results gathered back into the dataset's order.

Every batch carries each sample's dataset ``index``. Lightning's DistributedSampler gives each
rank a strided shard, padded with repeats of the first samples so every rank has as many batches;
what is gathered here is keyed by ``index``: repeats are dropped and the dataset order restored,
so every rank ends with exactly what a single process would have seen (docs/ARCHITECTURE.md,
"Distributed").
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any

import torch
import torch.distributed as dist

from adtrain.methods.test_outputs import META_KEYS

_OWN = threading.local()  # inside own_outputs() (per thread): this rank writes what it alone produced (heatmaps)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    """The global rank once the process group exists; before, from the launcher's environment: 0 for the
    process that owns the run, non-zero for the others (Lightning gives the processes it starts
    LOCAL_RANK and WORLD_SIZE, another node is started with NODE_RANK, torchrun sets RANK)."""
    if initialized():
        return dist.get_rank()
    env = {k: int(os.environ.get(k) or 0) for k in ("RANK", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")}
    if env["WORLD_SIZE"] <= 1 and env["NODE_RANK"] == 0:
        return 0  # a stray RANK/LOCAL_RANK (a cluster's environment) does not make a single run a rank
    return next((env[k] for k in ("RANK", "NODE_RANK", "LOCAL_RANK") if env[k]), 0)


def is_writer() -> bool:
    """Rank 0 writes the run's files (results.json, checkpoints, scores.csv); the others do not."""
    return rank() == 0 or getattr(_OWN, "on", False)


@contextlib.contextmanager
def own_outputs():
    """Let this rank (this thread) write files only it produces (the heatmaps of the test images it scored)."""
    before, _OWN.on = getattr(_OWN, "on", False), True
    try:
        yield
    finally:
        _OWN.on = before


def as_own_output(fn):
    """fn run inside own_outputs() (in whichever thread calls it: the background heatmap writer)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with own_outputs():
            return fn(*args, **kwargs)
    return run


def barrier() -> None:
    if initialized() and world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """obj from every rank, in rank order ([obj] without a process group)."""
    if not initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def by_index(pairs_per_rank: list[list[tuple[int, Any]]]) -> list[Any]:
    """(index, item) pairs from every rank -> items in index order, each index once (the
    DistributedSampler's padding repeats dropped)."""
    seen: dict[int, Any] = {}
    for pairs in pairs_per_rank:
        for index, item in pairs:
            seen.setdefault(int(index), item)
    return [seen[i] for i in sorted(seen)]


def gather_batch(batch: dict, seen: set[int]) -> list[dict]:
    """A training batch from every rank (same step), as the batches a single unshuffled process
    sees: samples in index order, those in ``seen`` (the padding repeats) dropped, cut into the local
    batch size. The DistributedSampler must not shuffle (AnomalyDataModule.train_dataloader)."""
    if world_size() == 1:
        return [batch]
    size = len(batch["index"])
    gathered = {}
    for k in [k for k, v in batch.items() if isinstance(v, torch.Tensor)]:
        parts = [torch.empty_like(batch[k]) for _ in range(world_size())]
        dist.all_gather(parts, batch[k].detach().contiguous())
        gathered[k] = torch.cat(parts)
    order = []
    for i in torch.argsort(gathered["index"], stable=True).tolist():
        if int(gathered["index"][i]) not in seen:
            seen.add(int(gathered["index"][i]))
            order.append(i)
    merged = {k: v[order] for k, v in gathered.items()}
    return [{k: v[i:i + size] for k, v in merged.items()} for i in range(0, len(order), size)]


class RecordingEvaluator:
    """Stands in for AnomalyEvaluator under DDP: keeps each sample's inputs with its dataset index
    (``next_index``, set before the step); ``merged`` replays every rank's samples, each once and in
    dataset order, in batches of the loader's size into a fresh evaluator: the single-process figures."""

    def __init__(self, make):
        self.make = make
        self.pixel_metrics = make().pixel_metrics
        self.next_index: torch.Tensor | None = None
        self.batch_size = 1
        self.items: list[tuple[int, tuple]] = []

    def update_pixels(self, anomaly_map, label, mask=None, has_mask=None, groups=None, spro=None) -> None:
        """Pixel inputs alone (the test path adds image scores at epoch end from TestOutputs)."""
        self.update(None, label, anomaly_map, mask, has_mask, groups, spro)

    def update(self, pred_score, label, anomaly_map=None, mask=None, has_mask=None, groups=None, spro=None) -> None:
        index = self.next_index.tolist()
        self.batch_size = max(self.batch_size, len(index))
        cols = [t.detach().cpu() if isinstance(t, torch.Tensor) else t
                for t in (pred_score, label, anomaly_map, mask, has_mask)] + [groups]
        spro = None if spro is None else [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in spro]
        for i, idx in enumerate(index):  # each sample its own tensors: a view would pickle its whole batch
            self.items.append((idx, tuple(None if c is None else _own(c[i]) for c in cols)
                               + (None if spro is None else tuple(_own(c[i]) for c in spro),)))

    def record_source(self, anomaly_map, batch: dict, geometry, by_category: bool, spro: bool) -> None:
        """A test batch at its images' own sizes (metrics.resolution=source): each image small
        (``source_resolution.pack_batch``), replayed by ``merged`` through ``update_at_source``."""
        from adtrain.metrics.source_resolution import pack_batch

        self.source = (geometry, by_category, spro)
        index = self.next_index.tolist()
        self.batch_size = max(self.batch_size, len(index))
        self.items.extend(zip(index, pack_batch(anomaly_map, batch, spro)))

    def merged(self):
        gathered = all_gather_objects((self.batch_size, self.items))
        size = max(b for b, _ in gathered)
        samples = by_index([items for _, items in gathered])
        ev = self.make()
        if samples and isinstance(samples[0], dict):  # recorded at source sizes: replayed as the test step counts them
            from adtrain.metrics.source_resolution import unpack_batch, update_at_source

            geometry, by_category, spro = self.source
            for start in range(0, len(samples), size):
                maps, batch = unpack_batch(samples[start:start + size], spro)
                update_at_source(ev, maps, batch, geometry, by_category, spro)
            return ev
        for start in range(0, len(samples), size):
            self._replay(ev, samples[start:start + size])
        return ev

    @staticmethod
    def _replay(ev, chunk: list) -> None:
        """One update of the fresh evaluator with a chunk of recorded samples."""
        cols = [None if chunk[0][j] is None else torch.stack([s[j] for s in chunk]) for j in range(5)]
        groups = None if chunk[0][5] is None else [s[5] for s in chunk]
        spro = None if chunk[0][6] is None else (torch.stack([s[6][0] for s in chunk]),
                                                 torch.stack([s[6][1] for s in chunk]),
                                                 [s[6][2] for s in chunk], [s[6][3] for s in chunk])
        if cols[0] is None:  # pixel inputs alone (update_pixels)
            ev.update_pixels(cols[2], cols[1], cols[3], cols[4], groups, spro)
        else:
            ev.update(*cols)


def _own(x):
    """A sample's tensor as its own copy (not a view of its batch's storage); anything else as it is."""
    return x.clone() if isinstance(x, torch.Tensor) else x


def wrap_evaluator(make):
    """A RecordingEvaluator under DDP (more than one process), else the plain evaluator."""
    return RecordingEvaluator(make) if world_size() > 1 else make()


def note_batch(module, evaluator, batch: dict) -> None:
    """Before a validation/test step: the batch's dataset indices, for the evaluator and the records."""
    if isinstance(evaluator, RecordingEvaluator):
        evaluator.next_index = batch["index"]
        evaluator.batch_size = max(evaluator.batch_size, len(batch["index"]))  # the loader's, replayed alike
        module.sample_index.extend(int(i) for i in batch["index"])


def _in_order(module, items: list) -> list:
    return by_index(all_gather_objects(list(zip(module.sample_index, items))))


def sync_validation(module) -> None:
    """The validation evaluator, normal scores and item kinds of every rank, in dataset order."""
    ev = module._val_evaluator
    if not isinstance(ev, RecordingEvaluator):
        return
    module._val_defects = _in_order(module, module._val_defects)
    module._val_map_means = _in_order(module, module._val_map_means)
    module._val_evaluator = ev = ev.merged()
    normal = [s for s, label in zip(ev.image_scores, ev.image_labels) if label == 0]
    module._val_scores = [torch.tensor(normal, dtype=torch.float32)]


def sync_test(module) -> None:
    """The test outputs (TestOutputs), pixel evaluator and heatmap files of every rank: each test image
    once, in order."""
    if not isinstance(module.evaluator, RecordingEvaluator):
        return
    outputs = module.test_outputs
    t = outputs.tensors()
    cal = t.get("calibration")  # a routed model's per-image threshold and centre, if any
    cal_rows = list(cal.cpu()) if cal is not None else [None] * len(t["score"])
    rows = list(zip(t["score"].cpu(), t["label"].cpu(), cal_rows, *(outputs.meta[k] for k in META_KEYS)))
    rows = _in_order(module, rows)
    scores = torch.stack([r[0] for r in rows]) if rows else torch.empty(0)
    labels = torch.stack([r[1] for r in rows]) if rows else torch.empty(0, dtype=torch.long)
    gathered = {"score": scores, "label": labels}
    if rows and all(r[2] is not None for r in rows):
        gathered["calibration"] = torch.stack([r[2] for r in rows])
    outputs.set(gathered, {k: [r[3 + j] for r in rows] for j, k in enumerate(META_KEYS)})
    module.evaluator = module.evaluator.merged()
    # once each: the sampler pads the last rank with repeats of the first images, which drew theirs again
    module.heatmap_files = sorted({f for files in all_gather_objects(module.heatmap_files) for f in files})


def check_agree(values: dict, what: str) -> None:
    """Every rank computed the same values (e.g. the test metrics); a TrainingError naming them if not."""
    gathered = all_gather_objects(values)
    if any(repr(g) != repr(gathered[0]) for g in gathered[1:]):  # repr: NaN equals NaN
        from adtrain.errors import TrainingError

        raise TrainingError(f"DDP ranks disagree on the {what}: {gathered}; please report this with the config")


def check_parameters_agree(module: torch.nn.Module) -> None:
    """After a DDP fit every rank must hold the same parameters (gradients are averaged, so they move
    alike); a rank that trained alone (a parameter DDP does not know) raises a TrainingError here."""
    if world_size() == 1:
        return
    digest = {name: float(p.detach().double().sum()) for name, p in module.named_parameters()}
    check_agree(digest, "parameters after fit (sums per tensor)")


def broadcast_buffers(module: torch.nn.Module, names=("threshold", "score_center", "map_center")) -> None:
    """Rank 0's fitted values on every rank."""
    if world_size() == 1:
        return
    for name in names:
        buf = getattr(module, name, None)
        if isinstance(buf, torch.Tensor):
            dist.broadcast(buf.data, src=0)
