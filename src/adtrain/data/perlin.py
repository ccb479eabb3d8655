"""DRAEM-style Perlin-noise synthetic anomalies (Zavrtanik, Kristan, Skocaj: "DRAEM - A
discriminatively trained reconstruction embedding for surface anomaly detection", ICCV 2021).

As in DRAEM: a 2-D Perlin noise map with a random lattice scale per axis (2^k cells, k uniform
in [0, 6)), rotated by a random angle in [-90, 90] degrees, thresholded at 0.5 to a binary mask
``m``, filled with a foreign texture ``t``::

    out = image * (1 - m) + (1 - beta) * t * m + beta * image * m,   beta ~ U(0, 0.8)

with three of DRAEM's random colour augmentations applied to the texture (``augment``).

What differs from DRAEM:

* Texture source. DRAEM draws textures from the DTD dataset. Here ``texture_dir`` (a folder of
  images, e.g. DTD's ``images/``, searched recursively) is optional; when it is null (the
  default) the texture is generated procedurally from the same rng: multi-octave coloured value
  noise, warped "marble", stripes, a rotated checkerboard, Voronoi cells or polka dots, in random
  colours. Folder textures are scaled to cover the image and randomly cropped (DRAEM stretches).
* Mask area. A mask that is empty or whose area fraction lies outside ``area_ratio`` is redrawn
  (new noise, scale and angle from the same rng), at most ``max_tries`` times; then the drawn
  mask closest to the range (in log area) is kept, or, when every draw was empty, a random
  ellipse with an area inside the range, so the mask is never empty.
* Rotation is exact: the noise is evaluated at rotated coordinates (no empty corners, no
  resampling of the noise image). DRAEM computes the noise at 256x256; here it is computed with
  >= 8 samples per lattice cell (short side max(64, 8 * 2^k) px, at most the image size) and
  resized bilinearly to the image before thresholding. Procedural textures are made at most
  256 px on the long side, then resized.
* Grayscale-looking images (three equal channels, e.g. electroluminescence solar cells) get a
  grayscale texture (``match_gray``), so the anomaly is not detectable by colour alone.

Cost (defaults, procedural texture, cv2.setNumThreads(1), CPU time per call, mean / p95 of 200
calls): 300x300 ~7 / 13 ms, 1024x1024 ~25 / 34 ms (wall time on a shared, overloaded 2-core box:
~15 / 44 ms mean). With a ``texture_dir`` of 640x480 JPEGs (one decoded per call, ~4 ms; the
augmentations run at the smaller of texture and image size): ~13 / 20 ms and ~37 / 47 ms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from adtrain.data.image_io import list_images, read_image
from adtrain.data.textures import augment_texture, cover_crop, procedural_texture, resize, work_shape
from adtrain.errors import ConfigError

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# --------------------------------------------------------------------------------------------
# Perlin noise
# --------------------------------------------------------------------------------------------

def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: Sequence[int], res: Sequence[float], rng: np.random.Generator,
                 angle: float = 0.0) -> np.ndarray:
    """2-D gradient (Perlin) noise, float32 (H, W), in [-1, 1] (DRAEM's ``rand_perlin_2d_np``
    scaling: sqrt(2) times the classic noise, whose range is +-sqrt(1/2)).

    ``res`` = (cells along y, cells along x) over the image; any positive values (DRAEM uses
    powers of two). ``angle`` (degrees) rotates the noise about the image centre, evaluated
    exactly at rotated coordinates. Gradient directions are drawn from ``rng``. Vectorised."""
    h, w = (int(s) for s in shape)
    ry, rx = (float(r) for r in res)
    if h < 1 or w < 1:
        raise ValueError(f"shape must be positive, got {tuple(shape)}")
    if not (ry > 0 and rx > 0 and math.isfinite(ry) and math.isfinite(rx)):
        raise ValueError(f"res must be positive, got {tuple(res)}")
    a = math.radians(float(angle))
    cos, sin = np.float32(math.cos(a)), np.float32(math.sin(a))
    xs = (np.arange(w, dtype=np.float32) + 0.5 - w / 2)[None, :]
    ys = (np.arange(h, dtype=np.float32) + 0.5 - h / 2)[:, None]
    u = (cos * xs + sin * ys) * np.float32(rx / w)  # lattice coordinates
    v = (cos * ys - sin * xs) * np.float32(ry / h)
    u -= np.floor(u.min())
    v -= np.floor(v.min())
    gw, gh = int(u.max()) + 2, int(v.max()) + 2
    theta = rng.random((gh, gw)) * (2 * np.pi)
    gx, gy = np.cos(theta).astype(np.float32).ravel(), np.sin(theta).astype(np.float32).ravel()
    iu, iv = u.astype(np.int32), v.astype(np.int32)
    fu, fv = u - iu, v - iv
    i00 = iv * gw + iu

    def dot(idx, du, dv):
        return np.take(gx, idx) * du + np.take(gy, idx) * dv

    n00 = dot(i00, fu, fv)
    n10 = dot(i00 + 1, fu - 1, fv)
    n01 = dot(i00 + gw, fu, fv - 1)
    n11 = dot(i00 + gw + 1, fu - 1, fv - 1)
    t, s = _fade(fu), _fade(fv)
    n0 = n00 + t * (n10 - n00)
    n1 = n01 + t * (n11 - n01)
    return (np.float32(math.sqrt(2.0)) * (n0 + s * (n1 - n0))).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def _pair(key: str, value, cast=float) -> tuple:
    try:
        lo, hi = (cast(x) for x in value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected a pair [low, high], got {value!r}") from None
    return lo, hi


@dataclass(frozen=True)
class PerlinConfig:
    area_ratio: tuple[float, float] = (0.005, 0.3)  # accepted mask area, fraction of the image
    scale_exponents: tuple[int, int] = (0, 6)  # lattice cells per axis 2^k, k in [low, high)
    threshold: float = 0.5  # mask = noise > threshold (noise in [-1, 1])
    rotation: float = 90.0  # degrees, uniform in [-rotation, rotation]
    beta: tuple[float, float] = (0.0, 0.8)  # opacity of the image inside the mask
    max_tries: int = 10  # mask draws before falling back (closest draw, else an ellipse)
    texture_dir: str | None = None  # folder of texture images (recursive); None = procedural
    augment: bool = True  # three of DRAEM's random colour augmentations on the texture
    match_gray: bool = True  # grayscale texture for grayscale-looking images

    def __post_init__(self):
        lo, hi = _pair("perlin.area_ratio", self.area_ratio)
        if not 0 < lo <= hi < 1:
            raise ConfigError("perlin.area_ratio", f"expected 0 < low <= high < 1, got {[lo, hi]}")
        object.__setattr__(self, "area_ratio", (lo, hi))
        k = self.scale_exponents
        if not isinstance(k, Sequence) or isinstance(k, str) or len(k) != 2 or not all(
                isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in k):
            raise ConfigError("perlin.scale_exponents", f"expected two integers [low, high), got {k!r}")
        lo, hi = int(k[0]), int(k[1])
        if not 0 <= lo < hi <= 12:
            raise ConfigError("perlin.scale_exponents", f"expected 0 <= low < high <= 12, got {[lo, hi]}")
        object.__setattr__(self, "scale_exponents", (lo, hi))
        for key, lo_, hi_ in (("threshold", -1.0, 1.0), ("rotation", 0.0, 180.0)):
            val = getattr(self, key)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not lo_ <= float(val) <= hi_ \
                    or (key == "threshold" and float(val) >= 1.0):
                rng_txt = "[-1, 1)" if key == "threshold" else "[0, 180]"
                raise ConfigError(f"perlin.{key}", f"must be a number in {rng_txt}, got {val!r}")
            object.__setattr__(self, key, float(val))
        lo, hi = _pair("perlin.beta", self.beta)
        if not 0.0 <= lo <= hi < 1.0:
            raise ConfigError("perlin.beta", f"expected 0 <= low <= high < 1, got {[lo, hi]}")
        object.__setattr__(self, "beta", (lo, hi))
        if isinstance(self.max_tries, bool) or not isinstance(self.max_tries, (int, np.integer)) \
                or not 1 <= self.max_tries <= 1000:
            raise ConfigError("perlin.max_tries", f"must be an integer in [1, 1000], got {self.max_tries!r}")
        object.__setattr__(self, "max_tries", int(self.max_tries))
        for key in ("augment", "match_gray"):
            if not isinstance(getattr(self, key), (bool, np.bool_)):
                raise ConfigError(f"perlin.{key}", f"must be true or false, got {getattr(self, key)!r}")
            object.__setattr__(self, key, bool(getattr(self, key)))
        td = self.texture_dir
        if td is not None:
            if not isinstance(td, (str, Path)) or str(td) == "":
                raise ConfigError("perlin.texture_dir",
                                  f"expected a folder path or null (procedural texture), got {td!r}")
            if not Path(td).expanduser().is_dir():
                raise ConfigError("perlin.texture_dir", f"folder not found: {td}")
            object.__setattr__(self, "texture_dir", str(Path(td).expanduser()))

    @classmethod
    def from_any(cls, cfg) -> "PerlinConfig":
        from adtrain.data.transforms import dataclass_from_any

        return dataclass_from_any(cls, cfg, "perlin")


def _is_gray(img: np.ndarray) -> bool:
    return bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))


# --------------------------------------------------------------------------------------------
# The hook
# --------------------------------------------------------------------------------------------

class PerlinAnomaly:
    """Data hook: ``{_target_: adtrain.data.perlin.PerlinAnomaly, p: 1.0}`` (see module doc).

    ``__call__(image uint8 HxWx3 (or HxW), rng) -> (image uint8 HxWx3, mask uint8 HxW in {0,1})``.
    With probability ``p`` the image gets one anomaly (mask never empty), else it is returned
    unchanged with an empty mask. Deterministic for a given rng state; picklable."""

    def __init__(self, p: float = 1.0, area_ratio=(0.005, 0.3), scale_exponents=(0, 6), threshold: float = 0.5,
                 rotation: float = 90.0, beta=(0.0, 0.8), max_tries: int = 10, texture_dir: str | None = None,
                 augment: bool = True, match_gray: bool = True):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ConfigError("data.synthetic_anomaly.p", f"must be in [0, 1], got {p!r}")
        self.p = float(p)
        seq = (lambda v: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
        self.config = PerlinConfig(seq(area_ratio), seq(scale_exponents), threshold, rotation, seq(beta),
                                   max_tries, texture_dir, augment, match_gray)
        self.textures: list[str] = []
        if self.config.texture_dir is not None:
            self.textures = [str(f) for f in list_images(self.config.texture_dir, recursive=True)]
            if not self.textures:
                raise ConfigError("perlin.texture_dir", f"no image files in {self.config.texture_dir}")

    # -- mask ---------------------------------------------------------------------------------
    def _draw(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        k0, k1 = cfg.scale_exponents
        ky, kx = rng.integers(k0, k1, size=2)
        angle = rng.uniform(-cfg.rotation, cfg.rotation)
        # >= 8 noise samples per lattice cell along the short side, then bilinear upsampling
        s = min(1.0, max(64.0, 8.0 * 2.0 ** max(ky, kx)) / min(h, w))
        wh, ww = max(1, round(h * s)), max(1, round(w * s))
        noise = perlin_noise((wh, ww), (2.0 ** ky, 2.0 ** kx), rng, angle=angle)
        return resize(noise, h, w) > cfg.threshold

    def _ellipse(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        area = rng.uniform(*self.config.area_ratio) * h * w
        r = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        ax = min(math.sqrt(area * r / math.pi), w / 2)
        ay = min(math.sqrt(area / (r * math.pi)), h / 2)
        a = rng.uniform(0, math.pi)
        cx, cy = rng.uniform(ax, w - ax) if w > 2 * ax else w / 2, rng.uniform(ay, h - ay) if h > 2 * ay else h / 2
        xs = (np.arange(w, dtype=np.float32) + 0.5 - cx)[None, :]
        ys = (np.arange(h, dtype=np.float32) + 0.5 - cy)[:, None]
        u = math.cos(a) * xs + math.sin(a) * ys
        v = -math.sin(a) * xs + math.cos(a) * ys
        m = (u / max(ax, 0.5)) ** 2 + (v / max(ay, 0.5)) ** 2 <= 1.0
        if not m.any():
            m[min(int(cy), h - 1), min(int(cx), w - 1)] = True
        return m

    def sample_mask(self, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """A bool (H, W) anomaly mask, never empty (see the module doc for the retry rule)."""
        h, w = int(shape[0]), int(shape[1])
        lo, hi = self.config.area_ratio
        best, best_err = None, math.inf
        for _ in range(self.config.max_tries):
            m = self._draw(h, w, rng)
            n = int(np.count_nonzero(m))
            if n == 0:
                continue
            frac = n / (h * w)
            if lo <= frac <= hi:
                return m
            err = math.log(lo / frac) if frac < lo else math.log(frac / hi)
            if err < best_err:
                best, best_err = m, err
        return best if best is not None else self._ellipse(h, w, rng)

    # -- texture ------------------------------------------------------------------------------
    def sample_texture(self, shape: Sequence[int], rng: np.random.Generator, gray: bool = False) -> np.ndarray:
        """A foreign texture, uint8 (H, W, 3): from ``texture_dir`` or procedural."""
        h, w = int(shape[0]), int(shape[1])
        if self.textures:
            tex = read_image(self.textures[int(rng.integers(len(self.textures)))])
            shrink = tex.shape[0] * tex.shape[1] > h * w  # augment at the smaller of the two sizes
            if self.config.augment and not shrink:
                tex = augment_texture(tex, rng)
            tex = cover_crop(tex, h, w, rng)
            if self.config.augment and shrink:
                tex = augment_texture(tex, rng)
        else:
            wh, ww = work_shape(h, w)
            tex = cv2.convertScaleAbs(procedural_texture(rng, wh, ww), alpha=255.0)  # round, saturate
            if self.config.augment:
                tex = augment_texture(tex, rng)
            tex = resize(tex, h, w)
        if gray:
            g = tex.astype(np.float32) @ _LUMA
            if not self.textures:  # procedural colours may share a luminance: restore contrast
                lo, hi = float(g.min()), float(g.max())
                span = rng.uniform(90.0, 255.0)
                base = rng.uniform(0.0, 255.0 - span)
                g = base + (g - lo) * (span / max(hi - lo, 1.0))
            g = np.clip(np.round(g), 0, 255).astype(np.uint8)
            tex = np.repeat(g[..., None], 3, axis=2)
        return np.ascontiguousarray(tex, dtype=np.uint8)

    # -- hook ---------------------------------------------------------------------------------
    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        img = np.asarray(image)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = np.ascontiguousarray(img, dtype=np.uint8)
        h, w = img.shape[:2]
        if not rng.random() < self.p:
            return img, np.zeros((h, w), np.uint8)
        mask = self.sample_mask((h, w), rng)
        gray = self.config.match_gray and _is_gray(img)
        tex = self.sample_texture((h, w), rng, gray=gray)
        beta = np.float32(rng.uniform(*self.config.beta))
        out = img.copy()
        inside = img[mask].astype(np.float32)
        out[mask] = np.clip(np.round((1 - beta) * tex[mask].astype(np.float32) + beta * inside), 0, 255
                            ).astype(np.uint8)
        return out, mask.astype(np.uint8)

    def __repr__(self) -> str:
        return f"PerlinAnomaly(p={self.p}, {self.config})"
