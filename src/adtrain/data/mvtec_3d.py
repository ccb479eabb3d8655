"""MVTec 3D-AD (Bergmann et al. 2022), its RGB images: ROOT/CAT/{train,validation}/good/rgb,
ROOT/CAT/test/<defect>/{rgb,gt}/<stem>.png. The point clouds (xyz/*.tiff) are not read."""

from __future__ import annotations

from pathlib import Path

from adtrain.data.download import MVTEC_3D
from adtrain.data.mvtec import MVTecDataModule
from adtrain.errors import DataError

MVTEC_3D_CATEGORIES = ("bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope",
                       "tire")


class MVTec3DDataModule(MVTecDataModule):
    """RGB only (an image-based detector's view of the dataset). The release's validation/good split
    serves as the held-out normals by default (data.val_split=official)."""

    dataset_name, root_env = "MVTec 3D-AD", "MVTEC_3D_ROOT"
    known_categories = MVTEC_3D_CATEGORIES
    archive = MVTEC_3D
    homepage = "https://www.mvtec.com/company/research/datasets/mvtec-3d-ad"
    image_subdir = "rgb"
    official_val = "validation"

    def _mask(self, cat: str, defect: str, image: Path) -> Path | None:
        mask = image.parent.parent / "gt" / image.name
        if not mask.is_file():
            raise DataError(mask, f"ground-truth mask missing for test image {image}")
        return mask
