"""MVTec LOCO AD (Bergmann et al. 2022): structural and logical anomalies. ROOT/CAT/{train/good,
validation/good, test/{good,logical_anomalies,structural_anomalies}}, and one mask file per
defect region: ROOT/CAT/ground_truth/<defect>/<stem>/000.png, 001.png, ..."""

from __future__ import annotations

from pathlib import Path

from adtrain.data.mvtec import MVTecDataModule
from adtrain.errors import DataError

MVTEC_LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")


class MVTecLOCODataModule(MVTecDataModule):
    """An anomalous image's mask is its ground-truth folder; the loader reads the union of the
    region files in it (``adtrain.data.image_io.read_mask``). The official metric, sPRO, weighs
    each region by its own saturation threshold; adtrain reports its usual pixel AUROC and AUPRO
    on the union. The release's validation/good split serves as the held-out normals by default
    (data.val_split=official). Download it from MVTec's site (it asks for a licence form)."""

    dataset_name, root_env = "MVTec LOCO AD", "MVTEC_LOCO_ROOT"
    known_categories = MVTEC_LOCO_CATEGORIES
    archive = None
    homepage = "https://www.mvtec.com/company/research/datasets/mvtec-loco"
    official_val = "validation"

    def _mask(self, cat: str, defect: str, image: Path) -> Path | None:
        folder = self._gt_root(cat) / defect / image.stem
        if not folder.is_dir():
            if not folder.parent.is_dir():
                return None  # no ground truth for this defect type: image metrics only
            raise DataError(folder, f"ground-truth folder missing for test image {image}")
        return folder
