"""MPDD (Metal Parts Defect Detection, Jezek et al. 2021): the MVTec AD layout, six metal-part
categories photographed under varying position, orientation and light."""

from __future__ import annotations

from adtrain.data.mvtec import MVTecDataModule

MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")


class MPDDDataModule(MVTecDataModule):
    """ROOT/CAT/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}. The release is
    on a shared drive with no stable file address: data.download=true says where to get it."""

    dataset_name, root_env = "MPDD", "MPDD_ROOT"
    known_categories = MPDD_CATEGORIES
    archive = None
    homepage = "https://github.com/stepanje/MPDD"
