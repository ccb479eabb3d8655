"""Time the two parts of a validation pass that session 22 changed (docs/BENCHMARKS.md).

    PYTHONPATH=src python benchmarks/val_pass_parts.py [--category poly] [--passes 3]

1. The data of a pass over ELPV's validation set (held-out normals and their anomalies): a new
   DataLoader with ``data.num_workers`` workers over the made anomalies (each fit or validate
   call made its own loader, so each pass started its workers), against the items kept as served
   (``ValidationDataset.hold``) read with no workers. Checks that the batches are the same bytes.
2. The pixel metrics of a pass: the same number of 64 x 64 maps streamed batch by batch through
   the adaptive bins (``exact_pixels=0``, the test's path) against held and counted in one sort
   (validation's ``VAL_EXACT_PIXELS``). Prints both figures and the bins' error bound.
Prints seconds (1) and milliseconds (2), medians over ``--passes``.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import torch
from _timing import median_ms


def _datamodule(category: str):
    from hydra import compose, initialize_config_dir

    from adtrain.build import build_datamodule

    conf = Path(__file__).resolve().parents[1] / "src" / "adtrain" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["method=dfm", "data=elpv", f"data.category={category}", "logger=none"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    return dm


def _pass(loader) -> tuple[float, str, int]:
    t0, h, n = time.perf_counter(), hashlib.sha1(), 0
    for batch in loader:
        h.update(batch["image"].numpy().tobytes())
        h.update(batch["mask"].numpy().tobytes())
        n += len(batch["label"])
    return time.perf_counter() - t0, h.hexdigest(), n


def data_pass(category: str, passes: int):
    from adtrain.data.validation import ValidationDataset

    dm = _datamodule(category)
    held = dm.validation_dataset()
    t0 = time.perf_counter()
    assert held.hold(), "the validation set does not fit in data.val_anomalies.cache_mb"
    t_hold = time.perf_counter() - t0
    made = ValidationDataset(held.base, held.items, held.spec, held.seed)
    t0 = time.perf_counter()
    made.prefill()
    t_made = time.perf_counter() - t0
    workers = [_pass(dm._loader(made, False, dm.eval_batch_size)) for _ in range(passes)]
    memory = [_pass(dm._loader(held, False, dm.eval_batch_size, num_workers=0)) for _ in range(passes)]
    same = len({h for _, h, _ in workers + memory}) == 1
    print(f"validation data, ELPV {category} ({workers[0][2]} items): making the anomalies {t_made:.2f} s, "
          f"making and keeping every item {t_hold:.2f} s; a pass with a new loader of {dm.num_workers} workers "
          f"{statistics.median(s for s, _, _ in workers):.3f} s, from memory with no workers "
          f"{statistics.median(s for s, _, _ in memory):.3f} s; same bytes: {same}")
    return workers[0][2]


def pixel_metrics(images: int, passes: int) -> None:
    from adtrain.methods.base import VAL_EXACT_PIXELS
    from adtrain.metrics.evaluator import AnomalyEvaluator

    g = torch.Generator().manual_seed(0)
    maps = torch.nn.functional.interpolate(torch.rand(images, 1, 16, 16, generator=g), size=(64, 64),
                                           mode="bilinear") * 30  # smooth maps, every score distinct
    masks = torch.zeros(images, 1, 64, 64)
    for i in range(images // 2):  # half the items anomalous, as the validation set
        r, c = torch.randint(0, 48, (2,), generator=g).tolist()
        masks[i, 0, r:r + 12, c:c + 16] = 1
        maps[i, 0, r:r + 12, c:c + 16] += 3
    labels = (masks.flatten(1).amax(1) > 0).long()

    def one_pass(exact_pixels: int):
        ev = AnomalyEvaluator(exact_pixels=exact_pixels)
        for s in range(0, images, 8):
            ev.update(maps[s:s + 8].amax((1, 2, 3)), labels[s:s + 8], maps[s:s + 8], masks[s:s + 8])
        return ev, ev.compute()

    times = {e: median_ms(lambda e=e: one_pass(e), passes) for e in (0, VAL_EXACT_PIXELS)}
    (stream, m_s), (_, m_h) = one_pass(0), one_pass(VAL_EXACT_PIXELS)
    bound = stream.pixel.error_bounds()["pixel_auroc"]
    print(f"pixel metrics of a pass ({images} maps of 64 x 64): streamed through the bins {times[0]:.1f} ms, "
          f"held and counted exactly {times[VAL_EXACT_PIXELS]:.1f} ms; pixel AUROC {m_s['pixel_auroc']:.7f} "
          f"(bins, bound {bound:.1e}) against {m_h['pixel_auroc']:.7f} (exact)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--category", default="poly")
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    n = data_pass(args.category, args.passes)
    pixel_metrics(n, args.passes)


if __name__ == "__main__":
    main()
