"""Tiny on-disk datasets in the MVTec AD (and its variants') and VisA layouts, for tests and smoke runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image


def _image(rng: np.random.Generator, size: int, defect_box: tuple | None = None) -> np.ndarray:
    img = (100 + 20 * rng.standard_normal((size, size, 3))).clip(0, 255).astype(np.uint8)
    if defect_box is not None:
        y0, y1, x0, x1 = defect_box
        img[y0:y1, x0:x1] = 250
    return img


def _box(size: int, i: int) -> tuple[int, int, int, int]:
    s = max(2, size // 4)
    off = (i * 3) % (size - s)
    x0 = (i * 5 + 2) % (size - s)
    return off, off + s, x0, x0 + s


#: how each dataset of the MVTec AD family differs from it: (normal folder, image subfolder,
#: image extension, mask rule, test folder); see adtrain.data.mvtec and its subclasses
LAYOUTS = {
    "mvtec": ("good", "", ".png", "mask_suffix", "test"),  # ground_truth/<defect>/<stem>_mask.png (MPDD too)
    "btad": ("ok", "", ".bmp", "stem", "test"),             # ground_truth/<defect>/<stem>.png
    "mvtec_loco": ("good", "", ".png", "folder", "test"),   # ground_truth/<defect>/<stem>/000.png, 001.png
    "mvtec_3d": ("good", "rgb", ".png", "gt", "test"),      # test/<defect>/gt/<stem>.png beside test/<defect>/rgb
    "mvtec_ad2": ("good", "", ".png", "mask_suffix", "test_public"),  # test_public/ground_truth/<defect>/
}


def write_mvtec_tree(root: str | Path, category: str = "widget", n_train: int = 6, n_test_good: int = 2,
                     defects: dict[str, int] | None = None, defects_without_gt: dict[str, int] | None = None,
                     size: int = 32, seed: int = 0, mask_value: int = 255, layout: str = "mvtec",
                     n_val: int = 0, defects_config: bool = True) -> Path:
    """ROOT/CAT/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}; returns ROOT.
    layout: a key of LAYOUTS, for the variants (BTAD, MVTec LOCO AD, MVTec 3D-AD, MVTec AD 2); n_val:
    images in ROOT/CAT/validation/<normal> (the official validation split of LOCO, 3D-AD and AD 2).
    MVTec LOCO AD: the k-th defect type's region files hold the value mask_value - k, and (where
    defects_config) ROOT/CAT/defects_config.json gives even types a relative saturation of 0.5 and odd
    ones an absolute one of 6 pixels (sPRO: adtrain.data.regions)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    normal, sub, ext, rule, test = LAYOUTS[layout]
    defects = {"crack": 2} if defects is None else defects
    defects_without_gt = defects_without_gt or {}
    cat = root / category
    gt = cat / ("" if test == "test" else test) / "ground_truth"  # MVTec AD 2: inside test_public/

    def save(arr, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)

    for split, n in (("train", n_train), ("validation", n_val)):
        for i in range(n):
            save(_image(rng, size), cat / split / normal / sub / f"{i:03d}{ext}")
    for i in range(n_test_good):
        save(_image(rng, size), cat / test / normal / sub / f"{i:03d}{ext}")
    if rule == "folder" and defects_config:
        cat.mkdir(parents=True, exist_ok=True)
        (cat / "defects_config.json").write_text(json.dumps([
            {"defect_name": name, "pixel_value": mask_value - k, "saturation_threshold": 0.5 if k % 2 == 0 else 6,
             "relative_saturation": k % 2 == 0} for k, name in enumerate(defects)]))
    for k, (name, n) in enumerate({**defects, **defects_without_gt}.items()):
        for i in range(n):
            box = _box(size, i)
            save(_image(rng, size, box), cat / test / name / sub / f"{i:03d}{ext}")
            if name not in defects:
                continue
            mask = np.zeros((size, size), np.uint8)
            mask[box[0]:box[1], box[2]:box[3]] = mask_value - (k if rule == "folder" else 0)
            if rule == "folder":  # one file per region: the box's two halves
                half = (box[0] + box[1]) // 2
                top, bottom = mask.copy(), mask.copy()
                top[half:], bottom[:half] = 0, 0
                save(top, gt / name / f"{i:03d}" / "000.png")
                save(bottom, gt / name / f"{i:03d}" / "001.png")
                continue
            where = {"mask_suffix": gt / name / f"{i:03d}_mask.png",
                     "stem": gt / name / f"{i:03d}.png",
                     "gt": cat / test / name / "gt" / f"{i:03d}.png"}[rule]
            save(mask, where)
    return root


def write_visa_tree(root: str | Path, categories: tuple[str, ...] = ("candle",), n_train: int = 5,
                    n_test_normal: int = 2, n_test_anomaly: int = 2, size: int = 32, seed: int = 0,
                    mask_value: int = 1, split_csv: str = "split_csv/1cls.csv") -> Path:
    """VisA layout: ROOT/CAT/Data/{Images,Masks}/{Normal,Anomaly} + the split CSV; returns ROOT."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for cat in categories:
        base = root / cat / "Data"
        for d in ("Images/Normal", "Images/Anomaly", "Masks/Anomaly"):
            (base / d).mkdir(parents=True, exist_ok=True)
        for i in range(n_train + n_test_normal):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            Image.fromarray(_image(rng, size)).save(root / rel, format="JPEG")
            rows.append([cat, "train" if i < n_train else "test", "normal", rel, ""])
        for i in range(n_test_anomaly):
            box = _box(size, i)
            rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
            Image.fromarray(_image(rng, size, box)).save(root / rel, format="JPEG")
            mask = np.zeros((size, size), np.uint8)
            mask[box[0]:box[1], box[2]:box[3]] = mask_value
            mrel = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            Image.fromarray(mask).save(root / mrel)
            rows.append([cat, "test", "anomaly", rel, mrel])
    csv_path = root / split_csv
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return root


def write_realiad_tree(root: str | Path, category: str = "audiojack", n_train: int = 6, n_test_ok: int = 2,
                       defects: dict[str, int] | None = None, train_ng: int = 0, size: int = 32, seed: int = 0,
                       resolution: str = "256", views: int = 1,
                       json_dir: str = "realiad_jsons/realiad_jsons") -> Path:
    """Real-IAD layout: ROOT/realiad_<res>/CAT/{OK,NG/<code>}/S<id>/*_C<view>.jpg (+ *_mask.png) and
    the split file ROOT/<json_dir>/CAT.json (the release's zip unpacks to realiad_jsons/realiad_jsons/
    or realiad_jsons/); train_ng: defective training entries (as the fully unsupervised split files
    have); views: images of each sample, training and test (a defective sample's first view shows
    the defect, the others are entries labelled OK). Returns ROOT."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / f"realiad_{resolution}" / category
    split: dict[str, list] = {"train": [], "test": []}

    def add(which: str, code: str, i: int, box=None, view: int = 1, folder_code: str | None = None):
        folder_code = folder_code or code
        rel = f"OK/S{i:04d}/{category}_{i:04d}_OK_C{view}.jpg" if folder_code == "OK" else \
            f"NG/{folder_code}/S{i:04d}/{category}_{i:04d}_NG_C{view}.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(rng, size, box)).save(folder / rel, format="JPEG")
        entry = {"category": category, "anomaly_class": code, "image_path": rel, "mask_path": None}
        if box is not None:
            mask = np.zeros((size, size), np.uint8)
            mask[box[0]:box[1], box[2]:box[3]] = 255
            entry["mask_path"] = rel.replace(".jpg", "_mask.png")
            Image.fromarray(mask).save(folder / entry["mask_path"])
        split[which].append(entry)

    i = 0
    for which, n in (("train", n_train), ("test", n_test_ok)):
        for _ in range(n):
            for view in range(1, views + 1):
                add(which, "OK", i, view=view)
            i += 1
    for j in range(train_ng):
        add("train", "AK", i, _box(size, j))
        i += 1
    for code, n in (defects or {"AK": 2}).items():
        for j in range(n):
            add("test", code, i, _box(size, j))
            for view in range(2, views + 1):
                add("test", "OK", i, view=view, folder_code=code)
            i += 1
    path = root / json_dir / f"{category}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {"prefix": category, "normal_class": "OK", "pre_transform": None}, **split}))
    return root
