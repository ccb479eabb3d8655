"""MVTec AD layout: ROOT/CAT/train/good, ROOT/CAT/test/<defect>, ROOT/CAT/ground_truth/<defect>/<stem>_mask.png.

``MVTecDataModule`` reads every dataset released in this layout or a close variant; its class
attributes say how a variant differs (MPDD, BTAD, MVTec LOCO AD, MVTec 3D-AD and MVTec AD 2
subclass it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from adtrain.data.base import AnomalyDataModule
from adtrain.data.dataset import Sample
from adtrain.data.download import MVTEC_AD, ArchiveSpec, download_dataset
from adtrain.data.image_io import IMAGE_EXTENSIONS, find_file, list_images
from adtrain.errors import CategoryNotFound, DataError

log = logging.getLogger("adtrain")

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")


class MVTecDataModule(AnomalyDataModule):
    """MVTec AD (or any dataset in its layout). A test defect folder without a ground_truth
    folder is allowed: its images get has_mask=False (image metrics only)."""

    #: what the messages call the dataset, and the environment variable its config reads the root from
    dataset_name, root_env = "MVTec AD", "MVTEC_ROOT"
    #: the official categories (documentation and messages; any folder in the layout is read)
    known_categories: tuple[str, ...] = MVTEC_CATEGORIES
    #: the archive ``data.download=true`` fetches, or None (``homepage`` says where to get it)
    archive: ArchiveSpec | None = MVTEC_AD
    homepage = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
    #: the normal images' folder name under train/ and test/ ("ok" in BTAD)
    normal = "good"
    #: the images' subfolder inside each train/test folder ("rgb" in MVTec 3D-AD)
    image_subdir = ""
    #: the split of official validation normals (ROOT/CAT/<it>/<normal>), read by data.val_split=official
    official_val: str | None = None
    #: the labelled test split's folder ("test_public" in MVTec AD 2)
    test_split = "test"
    #: how the release names a test image's mask after its stem (the file a missing-mask error names)
    mask_suffix = "_mask.png"
    #: the release's image files (messages only: every image extension is read)
    image_files = "*.png"

    def __init__(self, root: str, category: str | list[str], download: bool = False, **common):
        super().__init__(category=category, **common)
        self.root = Path(root).expanduser()
        self.download = bool(download)

    @property
    def layout(self) -> str:
        return "/".join(p for p in ("<category>", "train", self.normal, self.image_subdir, self.image_files) if p)

    def _describe(self) -> str:
        return str(self.root)

    def prepare_data(self) -> None:
        self._check_categories()

    def _check_categories(self) -> None:
        missing = [c for c in self.categories if not (self.root / c).is_dir()]
        # a download brings the release's own categories only: a misspelt one is refused before
        # fetching gigabytes (on every run of a sweep) that could never contain it
        unknown = [c for c in missing if c not in self.known_categories]
        if unknown and self.download and self.archive is not None:
            raise CategoryNotFound(self.root / unknown[0], f"category folder not found, and '{unknown[0]}' is not one of "
                            f"{self.dataset_name}'s categories ({', '.join(self.known_categories)}): a download "
                            "cannot bring it, so none was started; check data.category")
        nested = self._nested_root() if missing and self.root.is_dir() else None
        if missing and self.download and nested is None:
            if self.archive is None:
                raise DataError(self.root, f"{self.dataset_name} cannot be downloaded automatically "
                                f"(data.download=true): get it from {self.homepage} and extract it so that "
                                f"{self.root}/{self.layout} exists")
            download_dataset(self.archive, self.root, self.layout, wanted=self.categories)
            missing = [c for c in self.categories if not (self.root / c).is_dir()]
        if not self.root.is_dir():
            how = ("set data.download=true to fetch it when online" if self.archive is not None
                   else f"get it from {self.homepage}")
            raise DataError(self.root, f"{self.dataset_name} root folder not found: put the extracted dataset "
                            f"there ({self.root}/{self.layout}), set data.root (or the {self.root_env} "
                            f"environment variable) to where it is, or {how}")
        for c in missing:
            found = sorted(p.name for p in self.root.iterdir() if (p / "train").is_dir())
            if nested is not None:  # a release unpacked by hand keeps its archive's top folder
                hint = f"; the dataset is one folder down: set data.root={nested}"
            elif c not in self.known_categories:
                hint = f"; '{c}' is none of them: check data.category"
            elif self.download or self.archive is None:
                hint = ""
            else:
                hint = f"; set data.download=true to fetch {self.dataset_name} when online"
            raise CategoryNotFound(self.root / c, f"category folder not found (categories found in {self.root}: "
                            f"{', '.join(found) or 'none'}; {self.dataset_name}'s: {', '.join(self.known_categories)})"
                            + hint)

    def _nested_root(self) -> Path | None:
        """The subfolder of root that holds the wanted (or the release's) category folders, if one does."""
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if any((sub / c / "train").is_dir() for c in (*self.categories, *self.known_categories)):
                return sub
        return None

    def _normals(self, split: str) -> list[Sample]:
        """The normal images of ROOT/<cat>/<split>/<normal>[/<image_subdir>] for every category."""
        self._check_categories()
        samples = []
        for cat in self.categories:
            folder = self.root / cat / split / self.normal / self.image_subdir
            what = "training" if split == "train" else split
            if not folder.is_dir():
                raise DataError(folder, f"{what} folder not found (expected {self.layout.replace('train', split)})")
            images = list_images(folder)
            if not images:
                raise DataError(folder, f"no {what} images found in this folder")
            samples += [Sample(str(p), 0, None, cat, "good") for p in images]
        return samples

    def _train_samples(self) -> list[Sample]:
        return self._normals("train")

    @property
    def has_official_val(self) -> bool:
        return self.official_val is not None

    def _official_val_samples(self) -> list[Sample]:
        return self._normals(self.official_val)

    def _test_samples(self) -> list[Sample]:
        self._check_categories()
        samples = []
        for cat in self.categories:
            test_dir = self.root / cat / self.test_split
            if not test_dir.is_dir():
                raise DataError(test_dir, f"test folder not found (expected <category>/{self.test_split}/<defect>)")
            # hidden folders (.ipynb_checkpoints, a sync tool's) are no defect type, as list_images skips hidden files
            for defect_dir in sorted(p for p in test_dir.iterdir()
                                     if p.is_dir() and p.name != "ground_truth" and not p.name.startswith(".")):
                defect = defect_dir.name
                if not (defect_dir / self.image_subdir).is_dir():
                    expected = self.layout.replace("train", self.test_split).replace(self.normal, "<defect>", 1)
                    raise DataError(defect_dir / self.image_subdir, f"test images folder not found ({expected})")
                for img in list_images(defect_dir / self.image_subdir):
                    if defect == self.normal:
                        samples.append(Sample(str(img), 0, None, cat, "good"))
                        continue
                    mask = self._mask(cat, defect, img)
                    samples.append(Sample(str(img), 1, str(mask) if mask else None, cat, defect))
            if not any(s.category == cat for s in samples):
                raise DataError(test_dir, "no test images found")
            unmasked = sorted({s.defect for s in samples if s.category == cat and s.label == 1 and not s.mask_path})
            warned = self.__dict__.setdefault("_unmasked_warned", set())  # the test set is listed more than once
            if unmasked and (cat, tuple(unmasked)) not in warned:  # allowed (image metrics only), but a renamed
                warned.add((cat, tuple(unmasked)))  # ground_truth/ folder must not pass unseen
                log.warning("%s %s: no ground-truth folder for the defect type(s) %s (expected %s/<defect>/): their "
                            "images count for the image metrics only, not the pixel metrics", self.dataset_name, cat,
                            ", ".join(unmasked), self._gt_root(cat))
        return samples

    def _mask(self, cat: str, defect: str, image: Path) -> Path | None:
        """The ground truth of an anomalous test image: None where its defect has no ground-truth
        folder (image metrics only); a DataError where the folder lacks this image's mask."""
        gt_dir = self._gt_root(cat) / defect
        if not gt_dir.is_dir():
            return None
        mask = find_mask(gt_dir, image.stem)
        if mask is None:
            raise DataError(gt_dir / self._mask_name(cat, image.stem), f"ground-truth mask missing for test image "
                            f"{image} (looked for {image.stem}_mask.png and {image.stem} with an image extension)")
        return mask

    def _mask_name(self, cat: str, stem: str) -> str:
        """The file name the release gives the mask of test image ``stem`` of ``cat``."""
        return f"{stem}{self.mask_suffix}"

    def _gt_root(self, cat: str) -> Path:
        """The folder of the per-defect ground-truth folders (MVTec AD 2 keeps it in test_public/)."""
        return self.root / cat / "ground_truth"


def find_mask(gt_dir: Path, stem: str) -> Path | None:
    """<stem>_mask.png (MVTec AD, MPDD), else <stem>.<any image extension> (BTAD, MVTec 3D-AD)."""
    return find_file(gt_dir, (f"{stem}_mask.png", *(stem + ext for ext in IMAGE_EXTENSIONS)))
