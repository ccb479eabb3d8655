"""CutPaste synthetic anomalies (Li et al., CVPR 2021): a patch of the image, optionally
colour-jittered, pasted elsewhere in the same image; the mask marks the pasted region.

Two entry points share one vectorised implementation (no loop over images or pixels):

* ``CutPaste``: callable(image_uint8 HxWx3, rng) -> (image_uint8, mask_uint8), usable as the
  data module's ``synthetic_anomaly`` hook (training images only; an empty mask keeps the
  image normal, so ``p`` sets the fraction of anomalous training images).
* ``cutpaste_batch(images, ...)``: a batch of normalised tensors (B,3,H,W) -> (images, masks
  (B,1,H,W)), on the images' device, parameters drawn from a torch generator (default: the
  global torch RNG, so seed_everything makes it reproducible).

Variants: the rectangular patch ("cutpaste": area 2-15% of the image, aspect ratio
log-uniform in [0.3, 3.3]) and the "scar" (a thin rotated strip: width 2-16 px, length 10-25 px
at 256 px, scaled with the image size, rotation in [-45, 45] degrees), as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adtrain.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NUM_UNIFORMS = 11  # uniforms drawn per image (see _params)


@dataclass(frozen=True)
class CutPasteConfig:
    area_ratio: tuple[float, float] = (0.02, 0.15)
    aspect_ratio: tuple[float, float] = (0.3, 3.3)
    scar_prob: float = 0.5  # fraction of pastes that are scars
    scar_width: tuple[float, float] = (2 / 256, 16 / 256)  # fractions of the image side
    scar_length: tuple[float, float] = (10 / 256, 25 / 256)
    scar_angle: float = 45.0  # degrees, uniform in [-angle, angle]
    color_jitter: float = 0.1  # brightness / contrast / saturation factors in [1-j, 1+j]

    def __post_init__(self):
        for key in ("area_ratio", "aspect_ratio", "scar_width", "scar_length"):
            lo, hi = (float(v) for v in getattr(self, key))
            if not 0 < lo <= hi:
                raise ConfigError(f"cutpaste.{key}", f"expected 0 < low <= high, got {[lo, hi]}")
            object.__setattr__(self, key, (lo, hi))
        if self.area_ratio[1] >= 1.0:
            raise ConfigError("cutpaste.area_ratio", f"must stay below 1, got {list(self.area_ratio)}")
        if not 0.0 <= float(self.scar_prob) <= 1.0:
            raise ConfigError("cutpaste.scar_prob", f"must be in [0, 1], got {self.scar_prob}")
        if not 0.0 <= float(self.color_jitter) < 1.0:
            raise ConfigError("cutpaste.color_jitter", f"must be in [0, 1), got {self.color_jitter}")

    @classmethod
    def from_any(cls, cfg) -> "CutPasteConfig":
        from adtrain.data.transforms import dataclass_from_any

        return dataclass_from_any(cls, cfg, "cutpaste")


def _lerp(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _params(u: torch.Tensor, h: int, w: int, cfg: CutPasteConfig) -> dict[str, torch.Tensor]:
    """Paste geometry and colour factors from uniforms u (B, 11) in [0, 1)."""
    side = float(min(h, w))
    scar = u[:, 0] < cfg.scar_prob
    # rectangle: area and log-uniform aspect ratio
    area = _lerp(u[:, 1], *cfg.area_ratio) * h * w
    log_ar = _lerp(u[:, 2], math.log(cfg.aspect_ratio[0]), math.log(cfg.aspect_ratio[1]))
    ar = torch.exp(log_ar)
    rect_w = torch.sqrt(area * ar).clamp(1.0, w - 1.0)
    rect_h = torch.sqrt(area / ar).clamp(1.0, h - 1.0)
    # scar: thin strip, rotated
    scar_w = (_lerp(u[:, 1], *cfg.scar_width) * side).clamp(1.0, w - 1.0)
    scar_h = (_lerp(u[:, 2], *cfg.scar_length) * side).clamp(1.0, h - 1.0)
    pw = torch.where(scar, scar_w, rect_w)
    ph = torch.where(scar, scar_h, rect_h)
    angle = torch.where(scar, _lerp(u[:, 3], -cfg.scar_angle, cfg.scar_angle), torch.zeros_like(u[:, 3]))
    # source and target centres keep the (unrotated) box inside the image
    sx = pw / 2 + u[:, 4] * (w - pw)
    sy = ph / 2 + u[:, 5] * (h - ph)
    tx = pw / 2 + u[:, 6] * (w - pw)
    ty = ph / 2 + u[:, 7] * (h - ph)
    j = cfg.color_jitter
    return {
        "pw": pw, "ph": ph, "angle": torch.deg2rad(angle), "sx": sx, "sy": sy, "tx": tx, "ty": ty,
        "brightness": _lerp(u[:, 8], 1 - j, 1 + j),
        "contrast": _lerp(u[:, 9], 1 - j, 1 + j),
        "saturation": _lerp(u[:, 10], 1 - j, 1 + j),
    }


def _jitter(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Brightness, contrast, saturation of images in [0, 1] (B,3,H,W), per-image factors."""
    def v(name):
        return p[name].to(x.dtype).view(-1, 1, 1, 1)

    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x * v("brightness")).clamp(0, 1)
    gray_mean = (x * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = ((x - gray_mean) * v("contrast") + gray_mean).clamp(0, 1)
    gray = (x * weights).sum(1, keepdim=True)
    return ((x - gray) * v("saturation") + gray).clamp(0, 1)


def paste(images01: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the pastes to images in [0, 1] (B,3,H,W): (images, masks (B,1,H,W) float {0,1}).

    Target pixel (x, y) lies in the pasted patch when its coordinates in the patch frame
    (rotated by the paste angle about the target centre) fall within the half sizes; its
    value comes from the source box at the same patch-frame offset (nearest pixel)."""
    b, _, h, w = images01.shape
    dev, dt = images01.device, torch.float32
    p = {k: v.to(dev, dt).view(b, 1, 1) for k, v in params.items()}
    ys = torch.arange(h, device=dev, dtype=dt).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=dev, dtype=dt).view(1, 1, w) + 0.5
    dx, dy = xs - p["tx"], ys - p["ty"]
    cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    inside = (u.abs() < p["pw"] / 2) & (v.abs() < p["ph"] / 2)  # (B,H,W)
    src_x = (p["sx"] + u).floor().long().clamp(0, w - 1)
    src_y = (p["sy"] + v).floor().long().clamp(0, h - 1)
    flat = (src_y * w + src_x).view(b, 1, h * w).expand(-1, images01.shape[1], -1)
    source = torch.gather(images01.flatten(2), 2, flat).view_as(images01)
    source = _jitter(source, {k: params[k].to(dev) for k in ("brightness", "contrast", "saturation")})
    mask = inside.unsqueeze(1)
    out = torch.where(mask, source.to(images01.dtype), images01)
    return out, mask.to(images01.dtype)


def cutpaste_batch(
    images: torch.Tensor,
    config: CutPasteConfig | dict | None = None,
    generator: torch.Generator | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste versions of a normalised batch (B,3,H,W): (images, masks (B,1,H,W) in {0,1}).

    Parameters come from ``generator`` (a CPU torch.Generator) or the global torch RNG."""
    cfg = CutPasteConfig.from_any(config)
    b, c, h, w = images.shape
    u = torch.rand(b, _NUM_UNIFORMS, generator=generator, dtype=torch.float64).float()
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, c, 1, 1)
    x01 = (images.float() * s + m).clamp(0, 1)
    out01, mask = paste(x01, _params(u, h, w, cfg))
    out = torch.where(mask.bool(), (out01 - m) / s, images.float())
    return out.to(images.dtype), mask.float()


class CutPaste:
    """Data-module hook: ``synthetic_anomaly: {_target_: adtrain.data.cutpaste.CutPaste, p: 0.5}``.

    With probability ``p`` the image gets one paste (mask = the pasted region), else it is
    returned unchanged with an empty mask. Deterministic for a seeded numpy rng."""

    def __init__(self, p: float = 0.5, area_ratio=(0.02, 0.15), aspect_ratio=(0.3, 3.3), scar_prob: float = 0.5,
                 scar_width=(2 / 256, 16 / 256), scar_length=(10 / 256, 25 / 256), scar_angle: float = 45.0,
                 color_jitter: float = 0.1):
        if not 0.0 <= float(p) <= 1.0:
            raise ConfigError("data.synthetic_anomaly.p", f"must be in [0, 1], got {p}")
        self.p = float(p)
        self.config = CutPasteConfig(tuple(area_ratio), tuple(aspect_ratio), float(scar_prob), tuple(scar_width),
                                     tuple(scar_length), float(scar_angle), float(color_jitter))

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        img = np.asarray(image)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        h, w = img.shape[:2]
        apply = rng.random() < self.p
        u = torch.from_numpy(rng.random((1, _NUM_UNIFORMS))).float()
        if not apply:
            return img, np.zeros((h, w), np.uint8)
        # a read-only image (memory-mapped from the image cache) is copied: torch warns on read-only arrays
        x01 = torch.from_numpy(np.require(img, requirements=("C", "W"))).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        out, mask = paste(x01, _params(u, h, w, self.config))
        out_u8 = (out[0].permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
        return out_u8, mask[0, 0].to(torch.uint8).numpy()

    def __repr__(self) -> str:
        return f"CutPaste(p={self.p}, {self.config})"
