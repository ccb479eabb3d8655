"""Time the three parts of DFM's validation that session 21 changed (docs/BENCHMARKS.md).

    PYTHONPATH=src python benchmarks/dfm_val_parts.py [--repeat 20] [--category poly]

1. FMN matching of one batch (8 images x 28 x 28 = 6,272 patches, 152 dims) against 196 items:
   the candidates' path (top-8 of the volume, exact re-check) and the nearest-item path
   (``FeatureMatchingNetwork._match_nearest``), no gradients; checks that both give the same bits.
2. A validation batch's coarse map (8 maps, 28 x 28 -> 224 x 224 -> 64 x 64): the blurred full-size
   map then the area average, against ``reduced_map`` from the patch scores.
3. ``ValidationDataset.prefill`` of ELPV's held-out split (its synthetic anomalies), one thread
   against the default count; checks that the bytes are the same.
Prints milliseconds (1, 2) and seconds (3).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import median_ms


def matching(repeat: int) -> None:
    from adtrain.methods.dfm.fmn import FeatureMatchingNetwork

    g = torch.Generator().manual_seed(0)
    mem = torch.rand(196, 152, generator=g) * 6
    p = mem[torch.randint(0, 196, (6272,), generator=g)] + torch.randn(6272, 152, generator=g)
    fmn = FeatureMatchingNetwork(152, candidates=8)
    fmn.set_memory(mem, grid=(28, 28))
    with torch.no_grad():
        nearest = fmn._match_nearest(p)
        fmn._plain_matching = lambda: False
        cands = fmn.match(p)
        t_cand = median_ms(lambda: fmn.match(p), repeat)
        del fmn._plain_matching
        t_near = median_ms(lambda: fmn.match(p), repeat)
    same = all(torch.equal(a, b) for a, b in zip(nearest, cands))
    print(f"matching 6272 x 196: candidates {t_cand:.2f} ms, nearest item {t_near:.2f} ms, same bits: {same}")


def coarse_map(repeat: int) -> None:
    from adtrain.methods.val_maps import coarse_maps, coarse_size
    from adtrain.methods.patch_features import gaussian_blur2d, reduced_map

    s = torch.rand(8, 28, 28, generator=torch.Generator().manual_seed(0)) * 30
    mask = torch.zeros(8, 1, 224, 224)

    def full():
        amap = F.interpolate(s.unsqueeze(1), size=(224, 224), mode="bilinear", align_corners=False)
        return coarse_maps(gaussian_blur2d(amap, 4.0), mask)[0]

    diff = float((full() - reduced_map(s, (224, 224), 4.0, coarse_size(224, 224))).abs().max())
    t_full = median_ms(full, repeat)
    t_red = median_ms(lambda: reduced_map(s, (224, 224), 4.0, coarse_size(224, 224)), repeat)
    print(f"coarse map 8 x 224 x 224 -> 64 x 64: full map then pool {t_full:.2f} ms, reduced {t_red:.3f} ms, "
          f"max difference {diff:.1e}")


def prefill(category: str) -> None:
    from hydra import compose, initialize_config_dir

    from adtrain.build import build_datamodule

    conf = Path(__file__).resolve().parents[1] / "src" / "adtrain" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["method=dfm", "data=elpv", f"data.category={category}", "logger=none"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    out = {}
    for threads in (1, None):
        ds = dm.validation_dataset()
        ds._cache.clear()
        ds._cached_bytes = 0
        t0 = time.perf_counter()
        ds.prefill(threads=threads)
        seconds = time.perf_counter() - t0
        h = hashlib.sha1()
        for i in sorted(ds._cache):
            h.update(ds._cache[i][0].tobytes())
            h.update(ds._cache[i][1].tobytes())
        out[threads] = (seconds, h.hexdigest(), len(ds._cache))
    (s1, h1, n), (sd, hd, _) = out[1], out[None]
    print(f"validation anomalies, ELPV {category} ({n}): 1 thread {s1:.2f} s, default threads {sd:.2f} s, "
          f"same bytes: {h1 == hd}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--category", default="poly")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    matching(args.repeat)
    coarse_map(args.repeat)
    prefill(args.category)


if __name__ == "__main__":
    main()
