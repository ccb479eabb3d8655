"""MVTec AD 2 (Heckler-Kram et al. 2025): eight categories under harder conditions (transparent,
reflective, overlapping objects; lighting changes). ROOT/CAT/{train/good, validation/good,
test_public/{good,bad}, test_public/ground_truth/bad/<stem>_mask.png}."""

from __future__ import annotations

from pathlib import Path

from adtrain.data.download import MVTEC_AD2
from adtrain.data.mvtec import MVTecDataModule

MVTEC_AD2_CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")


class MVTecAD2DataModule(MVTecDataModule):
    """The labelled public test set (test_public) is the test set; the private test sets
    (test_private, test_private_mixed) carry no labels: score them with ``adtrain.predict`` and
    submit to MVTec's evaluation server. The release's validation/good split serves as the
    held-out normals by default (data.val_split=official)."""

    dataset_name, root_env = "MVTec AD 2", "MVTEC_AD2_ROOT"
    known_categories = MVTEC_AD2_CATEGORIES
    archive = MVTEC_AD2
    homepage = "https://www.mvtec.com/company/research/datasets/mvtec-ad-2"
    official_val = "validation"
    test_split = "test_public"

    def _gt_root(self, cat: str) -> Path:
        return self.root / cat / self.test_split / "ground_truth"
