"""Score new images with a trained run: heatmaps and a CSV of scores and decisions.

    python -m adtrain.predict checkpoint=RUN/checkpoints/model.ckpt images='DIR_OR_GLOB' [out=DIR]
        [batch_size=16] [device=auto|cpu|cuda] [heatmaps=true]

The decision threshold is the one fitted on held-out normals during training.
"""

from __future__ import annotations

import glob
import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from adtrain.errors import AdtrainError, ConfigError, DataError

log = logging.getLogger("adtrain")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
DEFAULTS = {"checkpoint": None, "images": None, "out": None, "batch_size": 16, "device": "auto", "heatmaps": True, "num_workers": 0}


def list_images(spec: str) -> list[str]:
    p = Path(spec)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(spec, "no images found (give a folder, a file or a glob such as 'dir/*.png')")
    return files


def predict(checkpoint: str, images: str, out: str | None = None, batch_size: int = 16, device: str = "auto",
            heatmaps: bool = True, num_workers: int = 0) -> Path:
    from adtrain.build import _instantiate
    from adtrain.checkpoint import load_method
    from adtrain.io import save_image
    from adtrain.run import write_scores_csv
    from adtrain.viz import denormalize, overlay_panel

    method, cfg, _ = load_method(checkpoint)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    method.to(dev)
    out_dir = Path(out) if out else Path(checkpoint).resolve().parent.parent / "predictions"
    files = list_images(images)
    dm = _instantiate(cfg.data, "data", drop=("name",))
    loader = DataLoader(dm.predict_dataset(files), batch_size=batch_size, num_workers=num_workers)
    thr = float(method.threshold)
    records = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="predict", unit="batch"):
            res = method.anomaly_output(batch["image"].to(dev))
            norm = method.normalize(res.pred_score, method.score_center).cpu()
            for i, path in enumerate(batch["path"]):
                score = float(res.pred_score[i])
                records.append({
                    "path": path, "score": score, "normalized_score": float(norm[i]),
                    "threshold": thr, "is_anomalous": int(score > thr) if thr == thr else None,
                })
                if heatmaps:
                    amap = method.normalize(res.anomaly_map[i, 0], method.map_center).clamp(0, 1).cpu().numpy()
                    panel = overlay_panel(denormalize(batch["image"][i]), amap, None, f"score {score:.4g}")
                    save_image(panel, out_dir / "heatmaps" / f"{len(records) - 1:05d}_{Path(path).stem}.png")
    write_scores_csv(out_dir / "predictions.csv", records)
    log.info("%d images scored; %s", len(records), out_dir / "predictions.csv")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv)))
    unknown = set(args.keys()) - set(DEFAULTS)
    try:
        if unknown:
            raise ConfigError(sorted(unknown)[0], f"unknown option; known: {', '.join(DEFAULTS)}")
        for key in ("checkpoint", "images"):
            if not args[key]:
                raise ConfigError(key, "required, e.g. checkpoint=RUN/checkpoints/model.ckpt images='DIR_OR_GLOB'")
        predict(**OmegaConf.to_container(args))
    except AdtrainError as err:
        print(f"adtrain.predict: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
