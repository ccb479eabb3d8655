"""MVTec LOCO AD (Bergmann et al. 2022): structural and logical anomalies. ROOT/CAT/{train/good,
validation/good, test/{good,logical_anomalies,structural_anomalies}}, and one mask file per
defect region: ROOT/CAT/ground_truth/<defect>/<stem>/000.png, 001.png, ..."""

from __future__ import annotations

from pathlib import Path

from adtrain.data.mvtec import MVTecDataModule
from adtrain.data.regions import RegionReader
from adtrain.errors import DataError

MVTEC_LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")


class MVTecLOCODataModule(MVTecDataModule):
    """An anomalous image's mask is its ground-truth folder; the loader reads the union of the
    region files in it (``adtrain.data.image_io.read_mask``): the usual pixel metrics are of that
    union. The official metric, AU-sPRO, weighs each region by the saturation area of its defect
    type, from the category's defects_config.json (``spro_regions``; adtrain.metrics.spro); it is
    computed for every category that has that file. The release's validation/good split serves as
    the held-out normals by default (data.val_split=official). Download it from MVTec's site (it
    asks for a licence form)."""

    dataset_name, root_env = "MVTec LOCO AD", "MVTEC_LOCO_ROOT"
    known_categories = MVTEC_LOCO_CATEGORIES
    archive = None
    homepage = "https://www.mvtec.com/company/research/datasets/mvtec-loco"
    official_val = "validation"

    def _defects_configs(self) -> dict[str, Path]:
        return {c: p for c in self.categories if (p := self.root / c / "defects_config.json").is_file()}

    def spro_regions(self) -> RegionReader | None:
        configs = self._defects_configs()
        return RegionReader(configs) if configs else None

    def spro_groups(self) -> dict[str, list[str]]:
        configs = self._defects_configs()
        groups = {c: sorted({s.defect for s in self.test_samples if s.category == c and s.mask_path is not None})
                  for c in configs}
        return {c: types for c, types in groups.items() if types}

    def _mask(self, cat: str, defect: str, image: Path) -> Path | None:
        folder = self._gt_root(cat) / defect / image.stem
        if not folder.is_dir():
            if not folder.parent.is_dir():
                return None  # no ground truth for this defect type: image metrics only
            raise DataError(folder, f"ground-truth folder missing for test image {image}")
        return folder
