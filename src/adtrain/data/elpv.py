"""ELPV solar cells (PyPI package elpv-dataset): 300x300 grayscale cells, defect probabilities
0, 1/3, 2/3, 1 per cell, types mono and poly. No masks: anomalies have has_mask=False."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from adtrain.data.base import AnomalyDataModule, seeded_rng, split_by_fraction
from adtrain.data.dataset import Sample
from adtrain.errors import ConfigError, DataError

ELPV_TYPES = ("mono", "poly")
UNCERTAIN_CHOICES = ("exclude", "anomalous", "normal")


def elpv_labels_file() -> Path:
    """labels.csv inside the installed elpv_dataset package (without importing it)."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("elpv_dataset", "the ELPV package is not installed: pip install elpv-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "labels.csv"
    if not path.is_file():
        raise DataError(path, "ELPV labels file not found in the installed elpv_dataset package "
                              "(reinstall it: pip install --force-reinstall elpv-dataset)")
    return path


def read_elpv_labels(path: Path) -> list[tuple[str, float, str]]:
    """(image path, defect probability, type) per line of the whitespace-separated labels file."""
    rows = []
    with open(path, newline="") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3:
                raise DataError(path, f"line {n}: expected 'path probability type', got {line.strip()!r}")
            try:
                prob = float(parts[1])
            except ValueError:
                raise DataError(path, f"line {n}: bad probability {parts[1]!r}") from None
            rows.append((str(path.parent / parts[0]), prob, parts[2]))
    return rows


def _defect_name(prob: float) -> str:
    return "defective" if prob >= 1.0 - 1e-6 else f"uncertain_{prob:.2f}"


class ElpvDataModule(AnomalyDataModule):
    """category: 'mono', 'poly', 'all' (both; each cell keeps its type as category) or a list.

    Per type, normal cells (probability 0) are split train / test by test_normal_fraction (seeded,
    independent of which types are chosen); probability 1 cells are test anomalies. Cells with 1/3
    or 2/3: uncertain='exclude' drops them, 'anomalous' makes them test anomalies, 'normal' test
    normals (never training).
    """

    known_categories = ELPV_TYPES

    def __init__(self, category: str | list[str] = "mono", uncertain: str = "exclude",
                 test_normal_fraction: float = 0.4, **common):
        super().__init__(category=category, **common)
        cats = list(ELPV_TYPES) if self.categories == ["all"] else self.categories
        bad = [c for c in cats if c not in ELPV_TYPES]
        if bad:
            raise ConfigError("data.category", f"unknown ELPV type(s) {bad}; use mono, poly or all")
        self.categories = cats
        if uncertain not in UNCERTAIN_CHOICES:
            raise ConfigError("data.uncertain", f"{uncertain!r}; choose one of {', '.join(UNCERTAIN_CHOICES)}")
        self.uncertain = uncertain
        if not 0.0 < float(test_normal_fraction) < 1.0:
            raise ConfigError("data.test_normal_fraction", f"must be in (0, 1), got {test_normal_fraction}")
        self.test_normal_fraction = float(test_normal_fraction)
        self._split: tuple[list[Sample], list[Sample]] | None = None

    def _describe(self) -> str:
        return "elpv_dataset"

    def _build(self) -> tuple[list[Sample], list[Sample]]:
        if self._split is not None:
            return self._split
        labels = elpv_labels_file()
        rows = read_elpv_labels(labels)
        train, test = [], []
        for cat in self.categories:
            cells = sorted((r for r in rows if r[2] == cat), key=lambda r: r[0])
            if not cells:
                raise DataError(labels, f"no cells of type '{cat}'")
            normals = [Sample(p, 0, None, cat, "good") for p, prob, _ in cells if prob == 0.0]
            tr, te = split_by_fraction(normals, self.test_normal_fraction,
                                       seeded_rng(self.seed, "elpv_test_normals", cat))
            train += tr
            test += te
            for p, prob, _ in cells:
                if prob == 0.0:
                    continue
                uncertain = prob < 1.0 - 1e-6
                if uncertain and self.uncertain == "exclude":
                    continue
                if uncertain and self.uncertain == "normal":
                    test.append(Sample(p, 0, None, cat, "good"))
                else:
                    test.append(Sample(p, 1, None, cat, _defect_name(prob)))
        self._split = (train, sorted(test, key=lambda s: (s.category, s.path)))
        return self._split

    def _train_samples(self) -> list[Sample]:
        return self._build()[0]

    def _test_samples(self) -> list[Sample]:
        return self._build()[1]
