"""Share of queries the certified search proves exact, on a PatchCore run's real bank.

    python benchmarks/certified_share.py RUN_DIR [--images 4]

RUN_DIR: a finished PatchCore run on ELPV mono with EfficientNet-Lite0 (e.g. the directory
`adtrain.bench method=patchcore data=elpv data.category=mono backbone=efficientnet_lite0
method.center_crop=null` prints). Embeds the first --images test cells, then prints, for
float16 / bfloat16 and k = 1 / 9, the share of their patches whose low-precision candidates
(k + memory.bank.LOWP_PAD) are proven to hold the exact fp32 neighbours, and the share the
default fp32 pass (k + 8 FAISS candidates, re-ranked) proves at k = 1. Device-independent
arithmetic: a CPU measures the shares a GPU would get (not its speed).
"""

from __future__ import annotations

import argparse

import torch

import adtrain
from adtrain.build import build_datamodule, build_method
from adtrain.loading import read_checkpoint
from adtrain.memory.bank import LOWP_PAD, RERANK_PAD, rerank
from adtrain.memory.index import faiss_search
from adtrain.memory.lowp import certified_from_rerank, certified_search


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--images", type=int, default=4)
    args = ap.parse_args()
    cfg = adtrain.compose(["method=patchcore", "data=elpv", "backbone=efficientnet_lite0", "method.center_crop=null"])
    method = build_method(cfg).eval()
    bank = read_checkpoint(f"{args.run_dir}/checkpoints/model.ckpt")["state_dict"]["model.memory.bank"]
    mem = method.model.memory
    mem.set_bank(bank)
    dm = build_datamodule(cfg)
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        emb = method.model.embed(dm.input_normalizer(batch["image"][: args.images]))  # uint8: data.device_normalize
    q = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    print(f"bank {tuple(bank.shape)}, queries {tuple(q.shape)}")
    for dtype in (torch.float16, torch.bfloat16):
        for k in (1, 9):
            _, ok = certified_search(q, bank, k, LOWP_PAD, dtype, 16384, 4096)
            print(f"{dtype} k={k}: certified {float(ok.float().mean()):.4f}")
    d, _ = rerank(q, bank, faiss_search(mem._faiss_index(q.device), q, 1 + RERANK_PAD, 16384), 1 + RERANK_PAD)
    ok = certified_from_rerank(d, 1, q.norm(dim=1), float(bank.norm(dim=1).max()), q.shape[1], torch.float32)
    print(f"fp32 pass k=1: certified {float(ok.float().mean()):.4f}")


if __name__ == "__main__":
    main()
