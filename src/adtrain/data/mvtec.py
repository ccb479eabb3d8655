"""MVTec AD layout: ROOT/CAT/train/good, ROOT/CAT/test/<defect>, ROOT/CAT/ground_truth/<defect>/<stem>_mask.png."""

from __future__ import annotations

from pathlib import Path

from adtrain.data.base import AnomalyDataModule
from adtrain.data.dataset import Sample
from adtrain.data.download import MVTEC_AD, download_dataset
from adtrain.data.image_io import list_images
from adtrain.errors import DataError

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")

_LAYOUT = "<category>/train/good/*.png"


class MVTecDataModule(AnomalyDataModule):
    """MVTec AD (or any dataset in its layout). A test defect folder without a ground_truth
    folder is allowed: its images get has_mask=False (image metrics only)."""

    def __init__(self, root: str, category: str | list[str], download: bool = False, **common):
        super().__init__(category=category, **common)
        self.root = Path(root).expanduser()
        self.download = bool(download)

    def _describe(self) -> str:
        return str(self.root)

    def prepare_data(self) -> None:
        self._check_categories()

    def _check_categories(self) -> None:
        missing = [c for c in self.categories if not (self.root / c).is_dir()]
        if missing and self.download:
            download_dataset(MVTEC_AD, self.root, _LAYOUT, wanted=self.categories)
            missing = [c for c in self.categories if not (self.root / c).is_dir()]
        if not self.root.is_dir():
            raise DataError(self.root, "MVTec AD root folder not found: put the extracted dataset there "
                            f"({self.root}/{_LAYOUT}), set data.root (or the MVTEC_ROOT environment "
                            "variable) to where it is, or set data.download=true to fetch it when online")
        for c in missing:
            found = sorted(p.name for p in self.root.iterdir() if (p / "train").is_dir())
            raise DataError(self.root / c, f"category folder not found (categories found in {self.root}: "
                            f"{', '.join(found) or 'none'})"
                            + ("" if self.download else "; set data.download=true to fetch MVTec AD when online"))

    def _train_samples(self) -> list[Sample]:
        self._check_categories()
        samples = []
        for cat in self.categories:
            folder = self.root / cat / "train" / "good"
            if not folder.is_dir():
                raise DataError(folder, "training folder not found (expected <category>/train/good)")
            images = list_images(folder)
            if not images:
                raise DataError(folder, "no training images found in this folder")
            samples += [Sample(str(p), 0, None, cat, "good") for p in images]
        return samples

    def _test_samples(self) -> list[Sample]:
        self._check_categories()
        samples = []
        for cat in self.categories:
            test_dir = self.root / cat / "test"
            if not test_dir.is_dir():
                raise DataError(test_dir, "test folder not found (expected <category>/test/<defect>)")
            for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
                defect = defect_dir.name
                gt_dir = self.root / cat / "ground_truth" / defect
                for img in list_images(defect_dir):
                    if defect == "good":
                        samples.append(Sample(str(img), 0, None, cat, "good"))
                        continue
                    mask = _find_mask(gt_dir, img.stem) if gt_dir.is_dir() else None
                    if gt_dir.is_dir() and mask is None:
                        raise DataError(gt_dir / f"{img.stem}_mask.png",
                                        f"ground-truth mask missing for test image {img}")
                    samples.append(Sample(str(img), 1, str(mask) if mask else None, cat, defect))
            if not any(s.category == cat for s in samples):
                raise DataError(test_dir, "no test images found")
        return samples


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (gt_dir / name).is_file():
            return gt_dir / name
    return None
