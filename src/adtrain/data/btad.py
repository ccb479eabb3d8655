"""BTAD (beanTech Anomaly Detection, Mishra et al. 2021): three products in the MVTec AD layout
with "ok" / "ko" folders: ROOT/CAT/{train/ok, test/ok, test/ko, ground_truth/ko/<stem>.<png|bmp>}."""

from __future__ import annotations

from adtrain.data.download import BTAD
from adtrain.data.mvtec import MVTecDataModule
from adtrain.data.transforms import to_plain

BTAD_CATEGORIES = ("01", "02", "03")


class BTADDataModule(MVTecDataModule):
    """Images and masks are read as released (product 01 and 03 images are .bmp, 02 .png): no
    conversion step. data.download=true fetches btad.zip (sha256-checked) and extracts its
    BTech_Dataset_transformed/ folder's categories into data.root."""

    dataset_name, root_env = "BTAD", "BTAD_ROOT"
    known_categories = BTAD_CATEGORIES
    archive = BTAD
    homepage = "https://avires.dimi.uniud.it/papers/btad/btad.zip"
    normal = "ok"
    mask_suffix = ".png"  # ground_truth/ko/<stem>.png (.bmp for product 03: _mask_name)
    image_files = "*.bmp (01, 03) or *.png (02)"

    def _mask_name(self, cat: str, stem: str) -> str:
        return f"{stem}{'.bmp' if cat == '03' else self.mask_suffix}"

    def __init__(self, root: str, category: str | int | list, download: bool = False, **common):
        # data.category=1 (a YAML or Python integer) names the released folder "01": renamed before
        # the base class checks the list, so [1, "01"] is refused as one product named twice
        category = to_plain(category)
        if isinstance(category, (list, tuple)):
            category = [_released_name(c) for c in category]
        else:
            category = _released_name(category)
        super().__init__(root=root, category=category, download=download, **common)


def _released_name(category) -> str:
    c = str(category)
    return f"{int(c):02d}" if c.isdigit() and len(c) < 2 else c
