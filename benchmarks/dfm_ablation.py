"""DFM design ablation on cached frozen features (docs/methods/dfm.md, "Design measurements").

The backbone is frozen and DFM's CNN adapters are 1x1 convolutions, which commute with the host's
local average pooling and bilinear resize (up to the zero padding at the border), so the pooled
per-layer features of every image are extracted once and each variant trains its adapters and FMN
on them in seconds. Per variant it prints the validation image AUROC (held-out normals + CutPaste
and Perlin anomalies made from them: what selection sees) and the test image AUROC (never used to
choose), for the untrained host and the trained state, over the given seeds.

    .venv/bin/python benchmarks/dfm_ablation.py --category mono --seeds 0 1 --variants host paper memory
    .venv/bin/python benchmarks/dfm_ablation.py --category mono --seeds 0 1 2 --variants compress --per-stage --monitor all

``compress*`` variants: the defaults' stage 2 (the memory trained on normal images with stage 1's
hinge, plain learning rates); ``--monitor all`` selects per stage on the whole validation set, as
the defaults do (``perlin``: its Perlin half, as the supervised stage 2 needs).
"""

from __future__ import annotations

import argparse
import copy
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adtrain.data.cutpaste import cutpaste_batch
from adtrain.metrics.bootstrap import paired_auroc_confidence
from adtrain.metrics.image import image_metrics


def compose(overrides):
    from hydra import compose as hc, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "src" / "adtrain" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hc("config", overrides=list(overrides))


@torch.no_grad()
def pooled_layers(model, images):
    """Per-layer pooled features on the host grid (pre-adapter), list of (B,C_l,h,w)."""
    feats = model.extractor(images)
    out, grid = [], None
    for name in model.layers:
        f = feats[name].float()
        if model.pool_size > 1:
            f = F.avg_pool2d(f, model.pool_size, stride=1, padding=model.pool_size // 2)
        grid = grid or f.shape[-2:]
        if f.shape[-2:] != grid:
            f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
        out.append(f)
    return out


def extract(model, loader, anomalies_per_image=0, gen=None):
    from adtrain.data.device_norm import device_normalizer

    feats, labels, masks = [], [], []
    for batch in loader:
        x = device_normalizer()(batch["image"])  # uint8 under data.device_normalize=auto (ImageNet stats)
        feats.append(torch.cat(pooled_layers(model, x), 1))
        labels.append(batch["label"])
        masks.append(batch["mask"])
        for _ in range(anomalies_per_image):
            xa, ma = cutpaste_batch(x, generator=gen)
            feats.append(torch.cat(pooled_layers(model, xa), 1))
            labels.append(torch.ones(x.shape[0], dtype=torch.long))
            masks.append(ma)
    return torch.cat(feats), torch.cat(labels), torch.cat(masks)


def cache(cfg_overrides, seed, path):
    if path.exists():
        return torch.load(path, weights_only=True)
    from adtrain.build import build_datamodule, build_method

    cfg = compose([*cfg_overrides, f"seed={seed}"])
    torch.manual_seed(seed)
    dm = build_datamodule(cfg)
    method = build_method(cfg).eval()
    model = method.model
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    train = extract(model, dm.make_dataloader(dm.train_samples, train=False))
    anom = extract(model, dm.make_dataloader(dm.train_samples, train=False), 2, gen)
    anom = tuple(t[train[0].shape[0]:] for t in anom)  # only the CutPaste copies
    val = extract(model, dm.val_dataloader())
    test = extract(model, dm.test_dataloader())
    data = {"train": train[0], "anom": anom[0], "anom_mask": anom[2], "val": val[0], "val_label": val[1],
            "val_mask": val[2], "test": test[0], "test_label": test[1],
            "channels": torch.tensor([int(model.extractor.channels[n]) for n in model.layers])}
    torch.save(data, path)
    print(f"features cached in {time.perf_counter() - t0:.1f} s -> {path}")
    return data


class Variant:
    """One DFM design: which parts train, with which losses."""

    def __init__(self, name, rounds=2, e1=3, e2=5, lr_adapter=1e-4, lr_fmn=1e-3, modulates=True, stage1="hinge",
                 lambda_normal=0.0, lambda_id=0.0, beta=0.9, gamma=1.1, memory="coreset", stage2="supervised"):
        self.__dict__.update(locals())
        del self.__dict__["self"]


VARIANTS = {
    "host": Variant("host", rounds=0),
    "paper": Variant("paper"),
    "memory": Variant("memory", modulates=False, lr_fmn=1e-2),
    "memory_lr3": Variant("memory_lr3", modulates=False, lr_fmn=3e-2),
    "memory_lr10": Variant("memory_lr10", modulates=False, lr_fmn=1e-1),
    "memory_pull": Variant("memory_pull", modulates=False, lr_fmn=1e-2, lambda_normal=1.0),
    "stage1_only": Variant("stage1_only", rounds=1, e2=0),
    "stage1_only_r2": Variant("stage1_only_r2", rounds=2, e2=0),
    "stage1_lr3": Variant("stage1_lr3", rounds=1, e2=0, lr_adapter=1e-3),
    "stage1_e6": Variant("stage1_e6", rounds=1, e1=6, e2=0),
    "relative_r2": Variant("relative_r2", rounds=2, e2=0, stage1="relative"),
    "relative_r2_lr3": Variant("relative_r2_lr3", rounds=2, e2=0, stage1="relative", lr_adapter=1e-3),
    "stage1_r2_lr3": Variant("stage1_r2_lr3", rounds=2, e2=0, lr_adapter=1e-3),
    "compress": Variant("compress", rounds=1, e1=0, e2=5, modulates=False, lr_fmn=3e-2, stage2="compress"),
    "compress_lr3e3": Variant("compress_lr3e3", rounds=1, e1=0, e2=5, modulates=False, lr_fmn=3e-3, stage2="compress"),
    "compress_lr1e2": Variant("compress_lr1e2", rounds=1, e1=0, e2=5, modulates=False, lr_fmn=1e-2, stage2="compress"),
    "compress_lr1e1": Variant("compress_lr1e1", rounds=1, e1=0, e2=5, modulates=False, lr_fmn=1e-1, stage2="compress"),
    "compress_e10": Variant("compress_e10", rounds=1, e1=0, e2=10, modulates=False, lr_fmn=3e-2, stage2="compress"),
    "compress_beta05": Variant("compress_beta05", rounds=1, e1=0, e2=5, modulates=False, lr_fmn=3e-2,
                               stage2="compress", beta=0.5),
    "stage1_compress": Variant("stage1_compress", rounds=2, e1=3, e2=5, modulates=False, lr_fmn=3e-2,
                               stage2="compress"),
    "memory_lr1": Variant("memory_lr1", modulates=False, lr_fmn=1e-3),
    "memory_only_s2": Variant("memory_only_s2", modulates=False, lr_fmn=1e-2, e1=0),
    "sup_adapter": Variant("sup_adapter", modulates=False, lr_fmn=1e-2, stage1="supervised", lambda_id=1.0,
                           lr_adapter=1e-3),
    "sup_adapter_pull": Variant("sup_adapter_pull", modulates=False, lr_fmn=1e-2, stage1="supervised",
                                lambda_id=1.0, lr_adapter=1e-3, lambda_normal=1.0),
}


def tail_hinge(maps, scores, beta):
    """Stage 1's compress hinge: patch and image scores above beta * the batch's max pushed down."""
    return (F.relu(scores - (beta * scores.max()).detach()).mean()
            + F.relu(maps - (beta * maps.max()).detach()).mean())


def run_variant(v: Variant, data, model0, seed, batch=8, on_stage_end=None):
    """Train one variant; ``on_stage_end(label, model, adapt)`` is called after the start and after
    every stage (stage 1 with its memory rebuild), the states a per-stage selection sees."""
    from adtrain.methods.dfm.torch_model import _rows

    torch.manual_seed(seed)
    model = copy.deepcopy(model0)
    chans = data["channels"].tolist()
    adapters = [model.adapters.conv[n] for n in model.layers]

    def adapt(f):
        parts = torch.split(f, chans, dim=1)
        return torch.cat([a(p) for a, p in zip(adapters, parts)], 1)

    fmn = model.fmn

    def build_memory():
        with torch.no_grad():
            emb = torch.cat([adapt(data["train"][i:i + 64]) for i in range(0, len(data["train"]), 64)])
            from adtrain.memory import greedy_coreset

            rows = _rows(emb)
            idx = greedy_coreset(rows, n=196, seed=seed, progress=False)
            mem = rows[idx]
            ref = float(torch.cdist(rows[:16384], mem).min(1).values.mean())
            fmn.set_memory(mem, grid=tuple(emb.shape[-2:]), dist_ref=ref, reset_patch=True)

    build_memory()
    if on_stage_end is not None:
        on_stage_end("start", model, adapt)
    if not v.modulates:
        for p in (fmn.mem_scale, fmn.mem_shift, fmn.patch_scale, fmn.patch_shift):
            p.requires_grad_(False)
    n, na = len(data["train"]), len(data["anom"])
    ad_params = [p for a in adapters for p in a.parameters()]
    opt1 = torch.optim.Adam(ad_params, lr=v.lr_adapter)
    ref = fmn.dist_ref
    for rnd in range(v.rounds):
        for _ in range(v.e1):
            fmn.requires_grad_(False)
            for p in ad_params:
                p.requires_grad_(True)
            for i in torch.randperm(n).split(batch):
                emb_n = adapt(data["train"][i])
                maps, scores = fmn(emb_n)
                if v.stage1 == "relative":  # scale-free: the tail against the batch's own mean patch score
                    unit = maps.mean()
                    loss = tail_hinge(maps / unit, scores / unit, v.beta)
                else:
                    loss = tail_hinge(maps, scores, v.beta) / ref
                if v.stage1 == "supervised":
                    j = torch.randint(na, (len(i),))
                    ma, sa = fmn(adapt(data["anom"][j]))
                    w = F.adaptive_avg_pool2d(data["anom_mask"][j], ma.shape[-2:]).squeeze(1)
                    loss = loss + (F.relu(v.gamma * scores.max().detach() - sa).mean()
                                   + (w * F.relu(v.gamma * maps.max().detach() - ma)).sum() / w.sum().clamp_min(1e-6)) / ref
                if v.lambda_id:
                    loss = loss + v.lambda_id * sum((p ** 2).sum() for p in ad_params)
                opt1.zero_grad()
                loss.backward()
                opt1.step()
        if v.e1:
            build_memory()
            if on_stage_end is not None:
                on_stage_end(f"round {rnd + 1} stage 1", model, adapt)
        params = list(fmn.parameters()) if v.modulates else [fmn.memory]
        for p in params:
            p.requires_grad_(True)
        for p in ad_params:
            p.requires_grad_(False)
        opt2 = torch.optim.Adam(params, lr=v.lr_fmn)
        for _ in range(v.e2):
            for i in torch.randperm(n).split(batch):
                if v.stage2 == "compress":  # normal-only: the memory moves to cover the tail of normal distances
                    with torch.no_grad():
                        emb_n = adapt(data["train"][i])
                    maps, scores = fmn(emb_n)
                    loss = tail_hinge(maps, scores, v.beta) / ref
                    opt2.zero_grad()
                    loss.backward()
                    opt2.step()
                    continue
                j = torch.randint(na, (len(i),))
                with torch.no_grad():
                    emb_n, emb_a = adapt(data["train"][i]), adapt(data["anom"][j])
                maps, scores = fmn(torch.cat([emb_n, emb_a]))
                k = len(i)
                s_n, s_a, m_n, m_a = scores[:k], scores[k:], maps[:k], maps[k:]
                w = F.adaptive_avg_pool2d(data["anom_mask"][j], m_a.shape[-2:]).squeeze(1)
                l_det = (F.relu(v.gamma * s_n.max().detach() - s_a).mean() + (s_n - s_n.mean()).abs().mean()) / ref
                l_seg = (w * F.relu(v.gamma * m_n.max().detach() - m_a)).sum() / w.sum().clamp_min(1e-6) / ref
                loss = l_det + l_seg + v.lambda_normal * m_n.mean() / ref
                opt2.zero_grad()
                loss.backward()
                opt2.step()
        if v.e2 and on_stage_end is not None:
            on_stage_end(f"round {rnd + 1} stage 2", model, adapt)
    return model, adapt


@torch.no_grad()
def scores_of(model, adapt, feats):
    return torch.cat([model.fmn(adapt(feats[i:i + 64]))[1] for i in range(0, len(feats), 64)])


def auroc(scores, labels, keep=None):
    keep = torch.ones_like(labels, dtype=torch.bool) if keep is None else keep
    return image_metrics(scores[keep].tolist(), labels[keep].tolist())["image_auroc"]


def families(overrides, seed):
    """The family of each validation item (None: a held-out normal), in the cached order."""
    from adtrain.build import build_datamodule

    dm = build_datamodule(compose([*overrides, f"seed={seed}"]))
    return [f for _, f, _ in dm.val_anomalies.plan(dm.val_samples, dm.seed)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="elpv")
    ap.add_argument("--category", default="mono")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--cache-dir", default="/tmp/dfm_ablation")
    ap.add_argument("--override", nargs="*", default=[])
    ap.add_argument("--confidence", type=float, nargs="+", default=[0.0, 0.9],
                    help="with --per-stage: the bootstrap confidence a state needs to replace the start")
    ap.add_argument("--monitor", choices=["perlin", "all"], default="perlin",
                    help="with --per-stage: the validation items selection sees (Perlin half or all)")
    ap.add_argument("--per-stage", action="store_true",
                    help="also validate after every stage and print the state a Perlin-val selection keeps")
    args = ap.parse_args()
    torch.set_num_threads(2)
    overrides = ["method=dfm", f"data={args.data}", f"data.category={args.category}", "data.num_workers=0",
                 "logger=none", *args.override]
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    rows = {}
    for seed in args.seeds:
        tag = f"{args.data}_{args.category}_{seed}_{zlib.crc32(' '.join(args.override).encode()):08x}"
        data = cache(overrides, seed, Path(args.cache_dir) / f"{tag}.pt")
        from adtrain.build import build_method

        model0 = build_method(compose([*overrides, f"seed={seed}"])).model.eval()
        fam = families(overrides, seed)
        lab = data["val_label"]
        normal = torch.tensor([f is None for f in fam])
        perlin = normal | torch.tensor([f == "perlin" for f in fam])
        seen = perlin if args.monitor == "perlin" else torch.ones_like(perlin)
        for name in args.variants:
            t0 = time.perf_counter()
            states = []

            def record(label, model, adapt):
                sv = scores_of(model, adapt, data["val"])[seen]
                conf = (paired_auroc_confidence(sv.numpy(), states[0][3].numpy(), lab[seen].numpy())
                        if states else 0.5)
                states.append((label, auroc(sv, lab[seen]),
                               auroc(scores_of(model, adapt, data["test"]), data["test_label"]), sv, conf))

            model, adapt = run_variant(VARIANTS[name], data, model0, seed,
                                       on_stage_end=record if args.per_stage else None)
            if args.per_stage:
                for need in args.confidence:
                    best = states[0]
                    for st in states[1:]:  # the start kept unless strictly better (and confidently so)
                        best = st if st[1] > best[1] and st[4] >= need else best
                    rows.setdefault(f"{name} (per-stage selection, confidence {need})", []).append(
                        (best[1], best[1], best[1], best[2]))
                print(f"seed {seed} {name:18s} per stage ({args.monitor} val / confidence vs start / test): "
                      + "; ".join(f"{st[0]}: {st[1]:.4f}/{st[4]:.2f}/{st[2]:.4f}" for st in states), flush=True)
            sv = scores_of(model, adapt, data["val"])
            val = auroc(sv, lab)
            cp = auroc(sv, lab, normal | torch.tensor([f == "cutpaste" for f in fam]))
            pn = auroc(sv, lab, normal | torch.tensor([f == "perlin" for f in fam]))
            test = auroc(scores_of(model, adapt, data["test"]), data["test_label"])
            rows.setdefault(name, []).append((val, cp, pn, test))
            print(f"seed {seed} {name:18s} val {val:.4f} (cutpaste {cp:.4f}, perlin {pn:.4f}) test {test:.4f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    print("\n| variant | val image AUROC | val CutPaste | val Perlin | test image AUROC |\n|---|---|---|---|---|")
    for name, vals in rows.items():
        cols = np.array(vals).T
        print(f"| {name} | " + " | ".join(f"{c.mean():.4f} ± {c.std():.4f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
