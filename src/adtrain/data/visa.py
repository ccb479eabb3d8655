"""VisA: ROOT/split_csv/1cls.csv (object,split,label,image,mask; paths relative to ROOT)."""

from __future__ import annotations

import csv
from pathlib import Path

from adtrain.data.base import AnomalyDataModule, warn_unmasked
from adtrain.data.dataset import Sample
from adtrain.data.download import VISA, download_dataset
from adtrain.errors import DataError

VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
                   "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")

_COLUMNS = ("object", "split", "label", "image", "mask")


class VisADataModule(AnomalyDataModule):
    """VisA from its split CSV. Masks are 0/255 (or small ints): >0 is defect. Rows of the train
    split labelled 'anomaly' (none in the official 1cls split) are left out of training."""

    known_categories = VISA_CATEGORIES

    def __init__(self, root: str, category: str | list[str], split_csv: str = "split_csv/1cls.csv",
                 download: bool = False, **common):
        super().__init__(category=category, **common)
        self.root = Path(root).expanduser()
        self.split_csv = str(split_csv)
        self.download = bool(download)
        self._rows: list[dict] | None = None

    def _describe(self) -> str:
        return str(self.root)

    @property
    def csv_path(self) -> Path:
        p = Path(self.split_csv).expanduser()
        return p if p.is_absolute() else self.root / p

    def prepare_data(self) -> None:
        self._read_rows()

    def _read_rows(self) -> list[dict]:
        if self._rows is not None:
            return self._rows
        unknown = [c for c in self.categories if c not in self.known_categories and not (self.root / c).is_dir()]
        if self.download and unknown:  # a download brings VisA's own objects only: none is started for a typo
            raise DataError(self.root / unknown[0], f"category folder not found, and '{unknown[0]}' is not one of "
                            f"VisA's objects ({', '.join(self.known_categories)}): a download cannot bring it, "
                            "so none was started; check data.category")
        if self.download and (not self.csv_path.is_file()
                              or any(not (self.root / c).is_dir() for c in self.categories)):
            csv_top = [] if Path(self.split_csv).is_absolute() else list(Path(self.split_csv).parts[:1])
            download_dataset(VISA, self.root, self.split_csv, wanted=self.categories + csv_top)
        if not self.root.is_dir():
            raise DataError(self.root, "VisA root folder not found: put the extracted dataset there "
                            f"(with {self.root}/{self.split_csv} and the category folders), set data.root "
                            "(or the VISA_ROOT environment variable) to where it is, or set "
                            "data.download=true to fetch it when online")
        if not self.csv_path.is_file():
            raise DataError(self.csv_path, "VisA split file not found (the official release has "
                            "split_csv/1cls.csv; set data.split_csv to use another split)")
        with open(self.csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            lacking = [c for c in _COLUMNS if c not in cols]
            if lacking:
                raise DataError(self.csv_path, f"missing column(s) {', '.join(lacking)} "
                                f"(expected {','.join(_COLUMNS)}; found {','.join(cols)})")
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
        for n, r in enumerate(rows, start=2):  # line 1 is the header
            if not r.get("image"):
                raise DataError(self.csv_path, f"line {n}: no image path ({', '.join(f'{k}={v!r}' for k, v in r.items())})")
        objects = sorted({r["object"] for r in rows})
        for cat in self.categories:
            if cat not in objects:
                raise DataError(self.csv_path, f"no rows for object '{cat}' (objects in this file: "
                                f"{', '.join(objects) or 'none'})")
        self._rows = rows
        return rows

    def _samples(self, split: str) -> list[Sample]:
        rows = self._read_rows()
        out = []
        for r in rows:
            if r["object"] not in self.categories or r["split"].lower() != split:
                continue
            label_text = r["label"].lower()
            if label_text not in ("normal", "anomaly"):
                raise DataError(self.csv_path, f"unknown label '{r['label']}' (expected normal/anomaly)")
            label = int(label_text == "anomaly")
            if split == "train" and label:
                continue
            image = self.root / r["image"]
            if not image.is_file():
                raise DataError(image, f"image listed in {self.csv_path} not found")
            mask = None
            if label and r["mask"]:
                mask = self.root / r["mask"]
                if not mask.is_file():
                    raise DataError(mask, f"mask listed in {self.csv_path} not found")
            out.append(Sample(str(image), label, str(mask) if mask else None, r["object"],
                              "anomaly" if label else "good"))
        return sorted(out, key=lambda s: (s.category, s.path))

    def _train_samples(self) -> list[Sample]:
        samples = self._samples("train")
        for cat in self.categories:
            if not any(s.category == cat for s in samples):
                raise DataError(self.csv_path, f"no normal training rows for object '{cat}'")
        return samples

    def _test_samples(self) -> list[Sample]:
        samples = self._samples("test")
        warn_unmasked(samples, self.csv_path)
        return samples
