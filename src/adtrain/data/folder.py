"""Any folders: normal images, optional anomalous images, optional masks matched by file stem."""

from __future__ import annotations

import os
from pathlib import Path

from adtrain.data.base import AnomalyDataModule, seeded_rng, split_by_fraction, warn_unmasked
from adtrain.data.dataset import Sample
from adtrain.data.image_io import IMAGE_EXTENSIONS, find_file, list_images
from adtrain.errors import ConfigError, DataError


def _images(folder: Path, key: str, others: tuple[Path, ...] = ()) -> list[Path]:
    """The images under ``folder``, less those under ``others`` (the other data.*_dir folders, where
    one lies inside it: masks in the anomaly folder, anomalies in the normal folder). Inside is
    judged both as written and with links followed: a linked anomaly folder, or links to files
    kept elsewhere, are left out as real ones are."""
    if not folder.is_dir():
        raise DataError(folder, f"folder not found (data.{key})")

    def ways(x: Path) -> tuple[Path, Path]:
        return Path(os.path.abspath(x)), x.resolve()

    top = ways(folder)
    inner = [w for o in others for w, t in zip(ways(o), top) if w != t and w.is_relative_to(t)]
    images = [p for p in list_images(folder, recursive=True)
              if not any(w.is_relative_to(o) for w in ways(p) for o in inner)]
    if not images:
        raise DataError(folder, f"no image files found in this folder (data.{key})")
    return images


class FolderDataModule(AnomalyDataModule):
    """normal_dir: normal images (train, and test unless normal_test_dir is given: then a seeded
    normal_test_split fraction goes to test). abnormal_dir: anomalous test images; images in a
    subfolder take its name as defect type. mask_dir: masks named <stem>_mask.png or <stem> with any
    image extension (<stem>.png first), looked up first in the same relative subfolder, then at the
    top of mask_dir. An anomalous image without a mask gets has_mask=False (image metrics only; the
    run's log names such images)."""

    def __init__(self, normal_dir: str, abnormal_dir: str | None = None, mask_dir: str | None = None,
                 normal_test_dir: str | None = None, normal_test_split: float = 0.2,
                 category: str = "folder", **common):
        super().__init__(category=category, **common)
        if len(self.categories) != 1:
            raise ConfigError("data.category", "a folder dataset has exactly one category name")
        if not 0.0 <= float(normal_test_split) < 1.0:
            raise ConfigError("data.normal_test_split", f"must be in [0, 1), got {normal_test_split}")
        self.normal_dir = Path(normal_dir).expanduser()
        self.abnormal_dir = Path(abnormal_dir).expanduser() if abnormal_dir else None
        self.mask_dir = Path(mask_dir).expanduser() if mask_dir else None
        self.normal_test_dir = Path(normal_test_dir).expanduser() if normal_test_dir else None
        self.normal_test_split = float(normal_test_split)
        dirs = {k: v for k, v in (("normal_dir", self.normal_dir), ("abnormal_dir", self.abnormal_dir),
                                  ("mask_dir", self.mask_dir), ("normal_test_dir", self.normal_test_dir)) if v}
        seen: dict[Path, str] = {}
        for key, folder in dirs.items():
            if folder.resolve() in seen:
                raise ConfigError(f"data.{key}", f"is data.{seen[folder.resolve()]} ({folder}): give each its own folder")
            seen[folder.resolve()] = key
        self._others = tuple(dirs.values())
        self._normal_split: tuple[list[Path], list[Path]] | None = None

    def _describe(self) -> str:
        return str(self.normal_dir)

    def _split_normals(self) -> tuple[list[Path], list[Path]]:
        if self._normal_split is None:
            normals = _images(self.normal_dir, "normal_dir", self._others)
            if self.normal_test_dir is not None:
                self._normal_split = (normals, _images(self.normal_test_dir, "normal_test_dir", self._others))
            else:
                rng = seeded_rng(self.seed, "normal_test_split", self.categories[0])
                self._normal_split = split_by_fraction(normals, self.normal_test_split, rng)
        return self._normal_split

    def _train_samples(self) -> list[Sample]:
        cat = self.categories[0]
        return [Sample(str(p), 0, None, cat, "good") for p in self._split_normals()[0]]

    def _test_samples(self) -> list[Sample]:
        cat = self.categories[0]
        samples = [Sample(str(p), 0, None, cat, "good") for p in self._split_normals()[1]]
        if self.abnormal_dir is not None:
            if self.mask_dir is not None and not self.mask_dir.is_dir():
                raise DataError(self.mask_dir, "folder not found (data.mask_dir)")
            for p in _images(self.abnormal_dir, "abnormal_dir", self._others):
                rel = p.parent.relative_to(self.abnormal_dir)
                defect = rel.parts[0] if rel.parts else self.abnormal_dir.name
                mask = self._find_mask(rel, p.stem)
                samples.append(Sample(str(p), 1, str(mask) if mask else None, cat, defect))
            anomalous = [s for s in samples if s.label == 1]
            _refuse_shared_masks(anomalous)
            if self.mask_dir is not None and anomalous and not any(s.mask_path for s in anomalous):
                first = Path(anomalous[0].path)
                rel = first.parent.relative_to(self.abnormal_dir)
                raise DataError(self.mask_dir, f"holds no mask for any of the {len(anomalous)} anomalous images "
                                f"(data.mask_dir): a mask is named <stem>.png or <stem>_mask.png (or <stem> with "
                                f"another image extension), in the image's subfolder or at the top, e.g. "
                                f"{self.mask_dir / rel / (first.stem + '.png')}")
            if self.mask_dir is not None:
                warn_unmasked(samples, self.mask_dir)
        return samples

    def _find_mask(self, rel: Path, stem: str) -> Path | None:
        if self.mask_dir is None:
            return None
        for folder in dict.fromkeys([self.mask_dir / rel, self.mask_dir]):
            found = find_file(folder, (f"{stem}.png", f"{stem}_mask.png", *(stem + ext for ext in IMAGE_EXTENSIONS)))
            if found is not None:
                return found
        return None


def _refuse_shared_masks(anomalous: list[Sample]) -> None:
    """One mask file found for two anomalous images (a flat data.mask_dir beside per-defect subfolders
    of data.abnormal_dir holding the same file name, e.g. crack/000.png and hole/000.png, both given
    masks/000.png): one of them would be scored against the other's ground truth. Refused, naming both."""
    owner: dict[str, str] = {}
    for s in anomalous:
        if s.mask_path is None:
            continue
        if s.mask_path in owner:
            raise DataError(s.mask_path, f"is the mask found for two anomalous images, {owner[s.mask_path]} and "
                            f"{s.path} (data.mask_dir): give each image its own mask, in a subfolder of "
                            "data.mask_dir named as the image's subfolder of data.abnormal_dir (e.g. "
                            "<mask_dir>/<defect>/<stem>.png)")
        owner[s.mask_path] = s.path
