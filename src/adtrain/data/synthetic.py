"""Procedural textures with drawn defects and exact masks, generated in memory (no files).

Deterministic given (seed, category, split, index). Categories differ in texture family so
multi-task schedules can use them; defects (scratch, blob, spots) are clearly visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from adtrain.data.base import AnomalyDataModule, seeded_rng
from adtrain.data.dataset import Loaded, Sample
from adtrain.errors import ConfigError, whole_number

SYNTHETIC_CATEGORIES = ("texture", "grid", "stripes")
DEFECT_TYPES = ("scratch", "blob", "spots")
_TINT = {"texture": (1.0, 0.96, 0.9), "grid": (0.9, 0.96, 1.0), "stripes": (1.0, 1.0, 0.92)}
_PREFIX = "synthetic://"


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a cells x cells random grid upsampled bicubically."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.BICUBIC), np.float32)


def render_texture(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A normal image of the category's texture family: float32 (size, size) grey levels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if category == "texture":
        img = 128 + 22 * _smooth_noise(rng, size, 6) + 10 * _smooth_noise(rng, size, 20)
    elif category == "grid":
        period = max(8, size // 8)
        ox, oy = rng.integers(0, period, 2)
        lines = (((xx + ox) % period) < 2) | (((yy + oy) % period) < 2)
        img = 105 + 50 * lines + 8 * _smooth_noise(rng, size, 5)
    elif category == "stripes":
        period = max(8, size / 10)
        theta = np.deg2rad(30 + rng.uniform(-3, 3))
        phase = rng.uniform(0, 2 * np.pi)
        img = 128 + 40 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
        img = img + 8 * _smooth_noise(rng, size, 6)
    else:
        raise ConfigError("data.category", f"unknown synthetic category {category!r}; "
                          f"choose from {', '.join(SYNTHETIC_CATEGORIES)}")
    return (img + 3 * rng.standard_normal((size, size))).astype(np.float32)


def draw_defect(kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """A defect mask {0,1} uint8 (size, size) and its grey level (dark or bright)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    m = int(0.15 * size)
    if kind == "scratch":
        x0, y0 = rng.integers(m, size - m, 2)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.3, 0.55) * size
        x1 = int(np.clip(x0 + length * np.cos(angle), 2, size - 3))
        y1 = int(np.clip(y0 + length * np.sin(angle), 2, size - 3))
        draw.line([(int(x0), int(y0)), (x1, y1)], fill=1, width=max(2, size // 40))
    elif kind == "blob":
        cx, cy = rng.integers(m + size // 10, size - m - size // 10, 2)
        rx, ry = rng.uniform(0.06, 0.12, 2) * size
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    elif kind == "spots":
        for _ in range(int(rng.integers(3, 7))):
            cx, cy = rng.integers(m, size - m, 2)
            r = max(2.0, rng.uniform(0.02, 0.035) * size)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        raise ValueError(f"unknown defect type {kind!r}")
    level = 25.0 if rng.random() < 0.5 else 235.0
    return np.asarray(canvas, np.uint8), level


@dataclass(frozen=True)
class SyntheticRenderer:
    """Picklable loader: Sample -> (RGB uint8 image, mask or None), rebuilt from the sample."""

    size: int
    seed: int

    def __call__(self, sample: Sample) -> Loaded:
        cat, split, name = sample.path.removeprefix(_PREFIX).split("/")
        rng = seeded_rng(self.seed, "synthetic", cat, split, name)
        grey = render_texture(cat, rng, self.size)
        mask = None
        if sample.label:
            mask, level = draw_defect(sample.defect, rng, self.size)
            inside = level + 6 * rng.standard_normal((self.size, self.size))
            grey = np.where(mask > 0, inside, grey)
        rgb = grey[:, :, None] * np.asarray(_TINT[cat], np.float32)
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8), mask


class SyntheticDataModule(AnomalyDataModule):
    """In-memory procedural data; category: one of SYNTHETIC_CATEGORIES or a list of them."""

    known_categories = SYNTHETIC_CATEGORIES

    def __init__(self, category: str | list[str] = "texture", num_train: int = 64, num_test_normal: int = 16,
                 num_test_anomalous: int = 16, size: int = 128, **common):
        super().__init__(category=category, **common)
        bad = [c for c in self.categories if c not in SYNTHETIC_CATEGORIES]
        if bad:
            raise ConfigError("data.category", f"unknown synthetic categor{'ies' if len(bad) > 1 else 'y'} "
                              f"{bad}; choose from {', '.join(SYNTHETIC_CATEGORIES)}")
        for key, v in (("num_train", num_train), ("num_test_normal", num_test_normal),
                       ("num_test_anomalous", num_test_anomalous)):
            whole_number(v, f"data.{key}", least=1 if key == "num_train" else 0)
        if int(size) < 16:
            raise ConfigError("data.size", f"must be >= 16, got {size}")
        self.num_train, self.num_test_normal = int(num_train), int(num_test_normal)
        self.num_test_anomalous, self.size = int(num_test_anomalous), int(size)

    def sample_loader(self) -> SyntheticRenderer:
        return SyntheticRenderer(self.size, self.seed)

    def _train_samples(self) -> list[Sample]:
        return [Sample(f"{_PREFIX}{c}/train/{i:05d}.png", 0, None, c, "good")
                for c in self.categories for i in range(self.num_train)]

    def _test_samples(self) -> list[Sample]:
        out = []
        for c in self.categories:
            out += [Sample(f"{_PREFIX}{c}/test_good/{i:05d}.png", 0, None, c, "good")
                    for i in range(self.num_test_normal)]
            out += [Sample(f"{_PREFIX}{c}/test_defect/{i:05d}.png", 1, None, c, DEFECT_TYPES[i % len(DEFECT_TYPES)])
                    for i in range(self.num_test_anomalous)]
        return out
