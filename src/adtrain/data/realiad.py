"""Real-IAD (Wang et al., CVPR 2024): 30 categories, 5 camera views, listed by JSON files.

ROOT/realiad_<resolution>/<category>/<image_path> with the split file
ROOT/realiad_jsons/realiad_jsons/<category>.json, or ROOT/realiad_jsons/<category>.json (the release's
realiad_jsons.zip unpacks either way; the official README's): {"train": [...], "test": [...]}, each entry
{"category", "anomaly_class", "image_path", "mask_path"}, paths from realiad_<resolution>/<meta.prefix>
(the category's folder); anomaly_class "OK" (meta.normal_class) is normal, any other
code a defect type (AK pit, BX deformation, CH abrasion, HS scratch, PS damage, QS missing part,
YW foreign object, ZW contamination). Other split files of the release (single view
``realiad_jsons_sv``, the fully unsupervised ``realiad_jsons_fuiad_<ratio>``) via data.json_path.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from adtrain.data.base import AnomalyDataModule, warn_unmasked
from adtrain.data.dataset import Sample
from adtrain.errors import ConfigError, DataError

REALIAD_CATEGORIES = ("audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts",
                      "pcb", "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator",
                      "rolled_strip_base", "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy_brick",
                      "toy", "transistor1", "u_block", "usb_adaptor", "usb", "vcpill", "wooden_beads", "woodstick",
                      "zipper")
RESOLUTIONS = ("256", "512", "1024", "raw")
#: data.json_path=null looks for the split file at these, in turn
JSON_PATHS = ("realiad_jsons/realiad_jsons/{category}.json", "realiad_jsons/{category}.json")


class RealIADDataModule(AnomalyDataModule):
    """Each view is one image (the paper's image-level protocol); results.json's sample_auroc scores
    each sample (its views' folder) by its views' highest score, labelled defective if any view is
    (the paper's sample-level protocol). train_anomalies: what to do with
    training entries that are not normal ("OK") (the fully unsupervised split files have some):
    ``exclude`` (default) leaves them out; ``include`` trains on them unlabelled, as that setting
    means (the framework then sees them as normals). The held-out normals (data.val_split) are
    whole samples, all of their views together (``sample_group``): a view held out never has its
    object's other views in training. The release is given on request
    (https://realiad4ad.github.io/Real-IAD/): no automatic download."""

    known_categories = REALIAD_CATEGORIES

    def __init__(self, root: str, category: str | list[str], resolution: int | str = 256,
                 json_path: str | None = None, train_anomalies: str = "exclude",
                 download: bool = False, **common):
        super().__init__(category=category, **common)
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.resolution = str(resolution)
        if self.resolution not in RESOLUTIONS:
            raise ConfigError("data.resolution", f"{resolution!r} is not one of the release's: "
                              f"{', '.join(RESOLUTIONS)}")
        if json_path is not None and "{category}" not in str(json_path) and len(self.categories) > 1:
            raise ConfigError("data.json_path", "needs {category} where the task holds several categories")
        self.json_path = None if json_path is None else str(json_path)
        if train_anomalies not in ("exclude", "include"):
            raise ConfigError("data.train_anomalies", f"must be exclude or include, got {train_anomalies!r}")
        self.train_anomalies = train_anomalies
        self._entries: dict[str, dict] = {}

    def _describe(self) -> str:
        return str(self.root)

    def prepare_data(self) -> None:
        for cat in self.categories:
            self._read(cat)

    def _read(self, cat: str) -> dict:
        if cat in self._entries:
            return self._entries[cat]
        if not self.root.is_dir():
            raise DataError(self.root, "Real-IAD root folder not found: put the release there (with "
                            f"realiad_{self.resolution}/ and realiad_jsons/) or set data.root (or the REALIAD_ROOT "
                            "environment variable) to where it is. It is given on request at "
                            "https://realiad4ad.github.io/Real-IAD/"
                            + (" (data.download=true cannot fetch it)" if self.download else ""))
        tried = [self.root / p.format(category=cat) for p in ((self.json_path,) if self.json_path else JSON_PATHS)]
        path = next((p for p in tried if p.is_file()), tried[0])
        if not path.is_file():
            known = "" if cat in REALIAD_CATEGORIES else f" ('{cat}' is not a Real-IAD category)"
            also = f", nor {', '.join(map(str, tried[1:]))}" if len(tried) > 1 else ""
            raise DataError(path, f"split file not found{known}{also}; data.json_path chooses another")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(path, f"cannot read the split file: {e}") from None
        if not (isinstance(meta, dict) and isinstance(meta.get("train"), list) and isinstance(meta.get("test"), list)):
            raise DataError(path, "expected a JSON object with 'train' and 'test' lists")
        self._entries[cat] = {"path": path, **meta}
        return self._entries[cat]

    def _listing(self, cat: str) -> tuple[Path, str]:
        """(folder the entries' paths start from, the normal anomaly_class) from the split file's "meta":
        realiad_<res>/<meta.prefix> (the category where it is absent or empty, as the release's files
        have it) and meta.normal_class ("OK" where absent)."""
        meta = self._read(cat)
        info = meta.get("meta") if isinstance(meta.get("meta"), dict) else {}
        prefix, normal = info.get("prefix") or cat, info.get("normal_class") or "OK"
        if not isinstance(prefix, str) or not isinstance(normal, str):
            raise DataError(meta["path"], f"meta.prefix and meta.normal_class must be text, got {info!r}")
        return self._inside(self.root / f"realiad_{self.resolution}", prefix, meta["path"]), normal

    def _samples(self, cat: str, split: str) -> list[Sample]:
        meta = self._read(cat)
        folder, normal = self._listing(cat)
        out = []
        for n, e in enumerate(meta[split]):
            if not isinstance(e, dict) or not e.get("image_path") or not e.get("anomaly_class"):
                raise DataError(meta["path"], f"{split}[{n}]: an entry needs image_path and anomaly_class, got {e!r}")
            defect = str(e["anomaly_class"])
            label = int(defect != normal)
            if split == "train" and label and self.train_anomalies == "exclude":
                continue
            image = self._inside(folder, e["image_path"], meta["path"])
            if not image.is_file():
                raise DataError(image, f"image listed in {meta['path']} not found")
            mask = None
            if split == "test" and label and e.get("mask_path"):
                mask = self._inside(folder, e["mask_path"], meta["path"])
                if not mask.is_file():
                    raise DataError(mask, f"mask listed in {meta['path']} not found")
            if split == "train":
                label = 0  # include: trained on unlabelled, as the fully unsupervised setting means
            out.append(Sample(str(image), label, str(mask) if mask else None, cat, "good" if not label else defect))
        return out

    def sample_group(self, path: str) -> str | None:
        """The sample folder (realiad_<res>/<category>/{OK,NG/<code>}/S<id>) holding its 5 views."""
        return str(Path(path).parent)

    @staticmethod
    def _inside(folder: Path, listed: str, listed_in: Path) -> Path:
        """folder/listed, refused where the listed path is absolute or climbs out with "..": checked on
        the text, so a data.root whose realiad_<res>/ is a link to another disk still reads."""
        rel = PurePosixPath(str(listed).replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts:
            raise DataError(listed_in, f"lists {listed}, outside data.root: refused")
        return folder / rel

    def _train_samples(self) -> list[Sample]:
        samples = []
        for cat in self.categories:
            mine = self._samples(cat, "train")
            if not mine:
                raise DataError(self._read(cat)["path"], f"no normal training entries for '{cat}'")
            samples += mine
        return samples

    def _test_samples(self) -> list[Sample]:
        samples = [s for cat in self.categories for s in self._samples(cat, "test")]
        warn_unmasked(samples, self.root)
        return samples
