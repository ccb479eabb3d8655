"""Foreign textures for the DRAEM-style Perlin anomalies (``adtrain.data.perlin``): procedural
textures drawn from a seeded generator (coloured noise, marble, stripes, checks, Voronoi cells,
polka dots), their RandAugment-like colour changes, and cover crops of a texture image."""

from __future__ import annotations

import math

import cv2
import numpy as np

NOISE_SIZE = 256  # long side of the grid the noise / procedural texture are computed on


def work_shape(h: int, w: int, size: int = NOISE_SIZE) -> tuple[int, int]:
    s = min(1.0, size / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def resize(x: np.ndarray, h: int, w: int, interp=cv2.INTER_LINEAR) -> np.ndarray:
    if x.shape[:2] == (h, w):
        return x
    return cv2.resize(x, (w, h), interpolation=interp)


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random RGB colours in [0, 1], the first two at least 0.35 apart."""
    c = rng.random((n, 3)).astype(np.float32)
    if n >= 2 and np.abs(c[0] - c[1]).max() < 0.35:
        c[1] = 1.0 - c[0]
    return c


def _value_noise(rng: np.random.Generator, h: int, w: int, channels: int, octaves: int,
                 base: int) -> np.ndarray:
    """Multi-octave value noise (H, W, C) in [0, 1]: random lattices upscaled bilinearly."""
    amp = 0.5 ** np.arange(octaves, dtype=np.float32)
    amp /= amp.sum()
    out = None
    for o in range(octaves):
        cells = base * 2 ** o
        grid = rng.random((cells + 1, cells + 1, channels), dtype=np.float32) * amp[o]
        up = cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, channels)
        out = up if out is None else cv2.add(out, up)
    return out.reshape(h, w, channels)


def _coords(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates normalised by the long side, rotated by a random angle."""
    a = rng.uniform(0, np.pi)
    s = float(max(h, w))
    xs = (np.arange(w, dtype=np.float32) / s)[None, :]
    ys = (np.arange(h, dtype=np.float32) / s)[:, None]
    return math.cos(a) * xs + math.sin(a) * ys, -math.sin(a) * xs + math.cos(a) * ys


def procedural_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random foreign texture, float32 (h, w, 3) in [0, 1]."""
    kind = int(rng.integers(6))
    if kind == 0:  # coloured multi-octave noise
        tex = _value_noise(rng, h, w, 3, octaves=int(rng.integers(3, 6)), base=int(rng.integers(2, 6)))
        tex = cv2.addWeighted(tex, 2.5, tex, 0.0, -0.75)  # stretch about 0.5 towards full range
    else:
        c = _colours(rng, 8)
        if kind == 1:  # marble: sine of a noise-warped coordinate, two colours
            u, _ = _coords(rng, h, w)
            warp = _value_noise(rng, h, w, 1, octaves=4, base=int(rng.integers(2, 5)))[..., 0]
            f = rng.uniform(3, 20)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * (f * u + rng.uniform(1, 4) * warp))
        elif kind == 2:  # stripes, hard or soft edges
            u, _ = _coords(rng, h, w)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(4, 40) * u + rng.random()))
            if rng.random() < 0.5:
                t = (t > rng.uniform(0.3, 0.7)).astype(np.float32)
        elif kind == 3:  # rotated checkerboard
            u, v = _coords(rng, h, w)
            f = rng.uniform(3, 25)
            t = ((np.floor(f * u + rng.random()) + np.floor(f * rng.uniform(0.5, 2) * v)) % 2).astype(np.float32)
        elif kind == 4:  # Voronoi cells, each its own colour
            k = int(rng.integers(4, 30))
            ch, cw = work_shape(h, w, 96)
            pts = rng.random((k, 2)).astype(np.float32) * np.array([ch, cw], np.float32)
            cols = rng.random((k, 3)).astype(np.float32)
            yy = np.arange(ch, dtype=np.float32)[None, :, None]
            xx = np.arange(cw, dtype=np.float32)[None, None, :]
            d = (yy - pts[:, 0, None, None]) ** 2 + (xx - pts[:, 1, None, None]) ** 2
            tex = resize(cols[d.argmin(axis=0)], h, w, cv2.INTER_NEAREST)
            t = None
        else:  # polka dots on a rotated grid
            u, v = _coords(rng, h, w)
            f = rng.uniform(4, 20)
            du, dv = f * u, f * v
            du -= np.floor(du) + np.float32(0.5)
            dv -= np.floor(dv) + np.float32(0.5)
            t = (du * du + dv * dv < rng.uniform(0.03, 0.2)).astype(np.float32)
        if t is not None:
            tex = t.astype(np.float32)[..., None] * (c[1] - c[0])
            tex += c[0]
        # low-frequency shading plus grain, so flat regions are not uniform
        shade = _value_noise(rng, h, w, 1, octaves=2, base=2)
        shade *= np.float32(0.5)
        grain = rng.random((h, w, 1), dtype=np.float32)
        grain *= np.float32(rng.uniform(0.0, 0.2))
        shade += grain
        shade += np.float32(0.65)
        tex *= shade
    return np.clip(tex, 0.0, 1.0, out=tex)


def _lut(x: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """Per-channel lookup: luts (3, 256) uint8."""
    return cv2.LUT(np.ascontiguousarray(x), np.ascontiguousarray(luts.T.reshape(1, 256, 3)))


def augment_texture(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Three of DRAEM's ten texture augmentations (imgaug), in numpy/cv2, uint8 RGB."""
    ramp = np.arange(256, dtype=np.float32)
    for op in rng.choice(10, size=3, replace=False):
        if op == 0:  # GammaContrast((0.5, 2.0), per_channel=True)
            g = rng.uniform(0.5, 2.0, size=(3, 1))
            x = _lut(x, np.clip(np.round(255 * (ramp / 255) ** g), 0, 255).astype(np.uint8))
        elif op == 1:  # MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))
            lut = np.clip(np.round(ramp * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)), 0, 255).astype(np.uint8)
            x = _lut(x, np.stack([lut] * 3))
        elif op == 2:  # pillike.EnhanceSharpness(factor=(0, 2)): blend with a smoothed copy
            f = rng.uniform(0.0, 2.0)
            sm = cv2.blur(x, (3, 3)).astype(np.float32)
            x = np.clip(np.round(sm + f * (x.astype(np.float32) - sm)), 0, 255).astype(np.uint8)
        elif op == 3:  # AddToHueAndSaturation((-50, 50), per_channel=True)
            hsv = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2HSV_FULL)
            dh, ds = rng.uniform(-50, 50, size=2)
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + int(round(dh))) % 256).astype(np.uint8)
            hsv[..., 1] = np.clip(hsv[..., 1].astype(np.int16) + int(round(ds)), 0, 255).astype(np.uint8)
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
        elif op == 4:  # Solarize(0.5, threshold=(32, 128))
            thr, apply = rng.uniform(32, 128), rng.random() < 0.5
            if apply:
                lut = np.where(ramp >= thr, 255 - ramp, ramp).astype(np.uint8)
                x = _lut(x, np.stack([lut] * 3))
        elif op == 5:  # pillike.Posterize: keep 1..8 bits (at least 2 here)
            bits = int(rng.integers(2, 9))
            lut = (np.arange(256) & (0xFF << (8 - bits)) & 0xFF).astype(np.uint8)
            x = _lut(x, np.stack([lut] * 3))
        elif op == 6:  # Invert()
            x = 255 - x
        elif op == 7:  # pillike.Autocontrast(): per-channel min-max stretch
            lo = x.reshape(-1, 3).min(0).astype(np.float32)[:, None]
            hi = x.reshape(-1, 3).max(0).astype(np.float32)[:, None]
            lut = np.clip(np.round((ramp - lo) * 255 / np.maximum(hi - lo, 1)), 0, 255).astype(np.uint8)
            x = _lut(x, lut)
        elif op == 8:  # pillike.Equalize()
            x = np.stack([cv2.equalizeHist(np.ascontiguousarray(x[..., ch])) for ch in range(3)], axis=-1)
        else:  # Affine(rotate=(-45, 45)), reflected borders
            h, w = x.shape[:2]
            m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-45, 45), 1.0)
            x = cv2.warpAffine(np.ascontiguousarray(x), m, (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT_101)
    return np.ascontiguousarray(x, dtype=np.uint8)


def cover_crop(tex: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Scale a texture to cover (h, w) (aspect kept), then a random crop of (h, w)."""
    th, tw = tex.shape[:2]
    s = max(h / th, w / tw)
    nh, nw = max(h, math.ceil(th * s)), max(w, math.ceil(tw * s))
    if (nh, nw) != (th, tw):
        tex = cv2.resize(tex, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    y0, x0 = int(rng.integers(nh - h + 1)), int(rng.integers(nw - w + 1))
    return tex[y0:y0 + h, x0:x0 + w]
