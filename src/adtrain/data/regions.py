"""Ground-truth regions with saturation areas, for MVTec LOCO AD's sPRO metric (adtrain.metrics.spro).

An anomalous LOCO image's ground truth is a folder of mask files, one per defect region; a file's
pixels carry one value, the defect type's ``pixel_value`` in the category's ``defects_config.json``:

    [{"defect_name": "1_additional_pushpin", "pixel_value": 255,
      "saturation_threshold": 6300, "relative_saturation": false}, ...]

A region's saturation area is ``int(saturation_threshold * area)`` where ``relative_saturation`` is
true, else ``min(saturation_threshold, area)`` (pixels at the file's resolution), as in the dataset's
official evaluation. Each region is read with its saturation *fraction* (saturation area / area),
which the metric applies to the region's area at the anomaly map's size.

The dataset hands the regions over packed: ``spro_code`` (H,W) int64, bit r set where region r is,
and ``spro_fraction`` (MAX_REGIONS,) float64, region r's fraction (0: no region r).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adtrain.data.image_io import mask_files, mask_values
from adtrain.errors import DataError

#: regions of one image the packed code holds (bits of an int64, sign bit unused)
MAX_REGIONS = 63


@dataclass(frozen=True)
class Saturation:
    defect_name: str
    threshold: float
    relative: bool

    def fraction(self, area: int) -> float:
        """The saturation area over the region's area (in (0, 1]), at the file's resolution."""
        if self.relative:
            return max(int(self.threshold * area), 1) / area  # at least one pixel (never 0 / 0)
        return min(self.threshold, area) / area


def load_defects_config(path: str | Path) -> dict[int, Saturation]:
    """``defects_config.json`` -> {pixel value: Saturation}; anything malformed -> DataError naming it."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"cannot read the defects config: {e}") from None
    if not isinstance(entries, list):
        raise DataError(path, "expected a list of defect entries")
    out: dict[int, Saturation] = {}
    for k, e in enumerate(entries):
        where = f"entry {k}"
        if not isinstance(e, dict) or not {"pixel_value", "saturation_threshold", "relative_saturation"} <= set(e):
            raise DataError(path, f"{where}: expected pixel_value, saturation_threshold and relative_saturation")
        value, thr, rel = e["pixel_value"], e["saturation_threshold"], e["relative_saturation"]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 255:
            raise DataError(path, f"{where}: pixel_value must be an integer in 1..255, got {value!r}")
        if not isinstance(rel, bool):
            raise DataError(path, f"{where}: relative_saturation must be true or false, got {rel!r}")
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not thr > 0 or (rel and thr > 1):
            raise DataError(path, f"{where}: saturation_threshold must be " +
                            ("in (0, 1] (relative)" if rel else "a positive pixel count") + f", got {thr!r}")
        if value in out:
            raise DataError(path, f"{where}: pixel_value {value} appears twice")
        out[value] = Saturation(str(e.get("defect_name", value)), float(thr), rel)
    return out


def _region_array(path: Path) -> np.ndarray:
    """A region file's values, one channel (``image_io.mask_values``, as ``read_mask`` reads them)."""
    arr = mask_values(path)
    return arr.max(axis=2) if arr.ndim == 3 else arr


def read_regions(folder: str | Path, config: dict[int, Saturation],
                 config_path: str | Path) -> list[tuple[np.ndarray, float]]:
    """Each region file of a ground-truth folder: ({0,1} uint8 mask at the file's size, saturation
    fraction). A file must hold one defect value, listed in the config."""
    out = []
    for f in mask_files(folder):
        arr = _region_array(f)
        values = np.unique(arr[arr > 0])
        if values.size != 1:
            raise DataError(f, "a region file must hold exactly one defect pixel value, found "
                            + (", ".join(str(int(v)) for v in values[:8]) if values.size else "none"))
        value = int(values[0])
        if value not in config:
            raise DataError(f, f"pixel value {value} is not listed in {config_path}")
        region = (arr > 0).astype(np.uint8)
        out.append((region, config[value].fraction(int(region.sum()))))
    if len(out) > MAX_REGIONS:
        raise DataError(folder, f"{len(out)} region files; sPRO takes at most {MAX_REGIONS} per image")
    return out


class RegionReader:
    """Picklable Sample -> regions (``read_regions``) or None (no ground-truth folder, or no
    defects config for the sample's category). configs: {category: defects_config.json path}."""

    def __init__(self, configs: dict[str, Path]):
        self.configs = {c: Path(p) for c, p in configs.items()}
        self._loaded: dict[str, dict[int, Saturation]] = {}

    def config(self, category: str) -> dict[int, Saturation]:
        if category not in self._loaded:
            self._loaded[category] = load_defects_config(self.configs[category])
        return self._loaded[category]

    def check(self) -> None:
        """Read every category's config now (before training: adtrain.data.file_checks)."""
        for category in self.configs:
            self.config(category)

    def __call__(self, sample) -> list[tuple[np.ndarray, float]] | None:
        path = self.configs.get(sample.category)
        if path is None or sample.mask_path is None or not Path(sample.mask_path).is_dir():
            return None
        return read_regions(sample.mask_path, self.config(sample.category), path)


def pack_regions(masks, fractions, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Region masks (each (H,W), already at the batch's size) and their fractions -> the batch's
    ``spro_code`` and ``spro_fraction``."""
    code = torch.zeros(size, dtype=torch.int64)
    frac = torch.zeros(MAX_REGIONS, dtype=torch.float64)
    for r, (m, f) in enumerate(zip(masks, fractions)):
        code |= (torch.as_tensor(np.asarray(m)) > 0).to(torch.int64) << r
        frac[r] = f
    return {"spro_code": code, "spro_fraction": frac}
