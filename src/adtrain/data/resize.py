"""The one rule by which every input image is resized to ``data.image_size`` (``data.resize``).

Training, validation (its synthetic anomalies too), test, the image cache, ``Detector`` from a
checkpoint or an export, ``adtrain.predict`` and the hot update of templates all resize through
`ImageResize` / `resize_image`; an export's graph resizes by `resize_tensor`, the same rule.

Rules (masks are always resized by nearest neighbour):

- ``pil_bilinear`` (default): ``PIL.Image.resize((w, h), Image.BILINEAR)`` of the uint8 image,
  which is what torchvision's ``transforms.Resize`` does to a PIL image, the input path of the
  official STFPM, PatchCore and HETMM code. It antialiases when downscaling (the triangle filter
  widens with the scale).
- ``pil_lanczos``: ``Image.LANCZOS`` (PIL's ``ANTIALIAS``), the official CFA code's resize.
- ``cv2_linear``: OpenCV ``INTER_LINEAR`` (albumentations ``Resize``), no antialiasing: aliased
  when a large image is shrunk. adtrain's rule before ``data.resize`` existed: checkpoints,
  exports and run configs without the key are read with it (`LEGACY`), so they score as before.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema
from PIL import Image
from pydantic import Field

from adtrain.errors import ConfigError

RULES = ("pil_bilinear", "pil_lanczos", "cv2_linear")
DEFAULT = "pil_bilinear"
#: the rule of everything made before ``data.resize`` existed
LEGACY = "cv2_linear"
_PIL_FILTERS = {"pil_bilinear": Image.BILINEAR, "pil_lanczos": Image.LANCZOS}
#: PIL's fixed-point precision of 8-bit resampling (Resample.c: 32 - 8 - 2)
_PIL_BITS = 22


def resize_rule(value: Any, key: str = "data.resize") -> str:
    """A rule name, checked; ConfigError naming ``key`` otherwise."""
    if value not in RULES:
        raise ConfigError(key, f"unknown resize rule {value!r}; use one of {', '.join(RULES)}")
    return value


def describe(rule: str) -> str:
    """The rule in words, for the image cache's key (changes whenever the rule does)."""
    return {"pil_bilinear": "PIL Image.resize BILINEAR / mask cv2 nearest",
            "pil_lanczos": "PIL Image.resize LANCZOS / mask cv2 nearest",
            "cv2_linear": "albumentations.Resize linear / mask nearest"}[resize_rule(rule)]


def _pil(plane: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    return np.array(Image.fromarray(plane).resize((size[1], size[0]), resample))  # writable, like cv2's


def resize_image(image: np.ndarray, size: tuple[int, int], rule: str = DEFAULT) -> np.ndarray:
    """``image`` (H,W[,C]) resized to ``size`` = (h, w) by ``rule``; returned as is when already that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[:2]) == size:
        return image
    if resize_rule(rule) == "cv2_linear":
        return A.augmentations.geometric.functional.resize(image, size, interpolation=cv2.INTER_LINEAR)
    resample = _PIL_FILTERS[rule]
    image = np.ascontiguousarray(image)
    if image.dtype == np.uint8 and (image.ndim == 2 or image.shape[2] == 3):
        return _pil(image, size, resample)  # RGB or L: torchvision's PIL path exactly
    # other channel counts or dtypes: plane by plane (uint8 as L, anything else as 32-bit float F)
    planes = image[..., None] if image.ndim == 2 else image
    kind = np.uint8 if image.dtype == np.uint8 else np.float32
    out = np.stack([_pil(np.ascontiguousarray(planes[..., c], dtype=kind), size, resample)
                    for c in range(planes.shape[2])], axis=-1).astype(image.dtype, copy=False)
    return out[..., 0] if image.ndim == 2 else out


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour (OpenCV ``INTER_NEAREST``, as albumentations ``Resize`` does masks)."""
    return A.augmentations.geometric.functional.resize(mask, (int(size[0]), int(size[1])),
                                                       interpolation=cv2.INTER_NEAREST)


class ImageResize(A.DualTransform):
    """albumentations transform: the image by ``rule`` (`resize_image`), masks by nearest neighbour,
    keypoints scaled, boxes (normalised) unchanged. Draws no random number (p=1)."""

    _targets = (A.core.type_definitions.Targets.IMAGE, A.core.type_definitions.Targets.MASK,
                A.core.type_definitions.Targets.BBOXES, A.core.type_definitions.Targets.KEYPOINTS)

    class InitSchema(BaseTransformInitSchema):
        height: int = Field(ge=1)
        width: int = Field(ge=1)
        rule: Literal[RULES]  # type: ignore[valid-type]

    def __init__(self, height: int, width: int, rule: str = DEFAULT, p: float = 1):
        super().__init__(p=p)
        self.height, self.width, self.rule = height, width, rule

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return resize_image(img, (self.height, self.width), self.rule)

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        return resize_mask(mask, (self.height, self.width))

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # normalised coordinates: scale invariant

    def apply_to_keypoints(self, keypoints: np.ndarray, **params: Any) -> np.ndarray:
        height, width = params["shape"][:2]
        return A.augmentations.geometric.functional.keypoints_scale(keypoints, self.width / width,
                                                                    self.height / height)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "rule")


def with_legacy_rule(cfg: Any) -> Any:
    """A stored run config (plain dict) made before ``data.resize`` existed gets ``LEGACY``, the
    rule it was made with; any other value is returned unchanged."""
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if isinstance(data, dict) and "resize" not in data:
        data["resize"] = LEGACY
    return cfg


# ---------------------------------------------------------------------------- the graph's side
def _filter(x, rule: str):
    """PIL's filter kernels (Resample.c), on a float64 tensor."""
    import torch

    if rule == "pil_bilinear":
        return torch.clamp(1.0 - x.abs(), min=0.0)
    px = x * math.pi
    sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(px) / torch.where(x == 0, torch.ones_like(x), px))
    px3 = px / 3.0
    sinc3 = torch.where(x == 0, torch.ones_like(x), torch.sin(px3) / torch.where(x == 0, torch.ones_like(x), px3))
    return torch.where((x >= -3.0) & (x < 3.0), sinc * sinc3, torch.zeros_like(x))


#: outputs per block of the graph's PIL resize: a block reads only the inputs its filters reach
#: (about BLOCK x the scale, plus the filter's width), not the whole row or column
RESIZE_BLOCK = 32
#: PIL's filter support (half-width in input pixels at scale 1)
_SUPPORT = {"pil_bilinear": 1.0, "pil_lanczos": 3.0}


def pil_block(n_in, o0: int, o1: int, n_out: int, rule: str):
    """Rows o0..o1-1 of PIL's weight matrix (`pil_weights`) over the only inputs they weigh:
    ((o1-o0, L) float64 weights in PIL's fixed-point units, coefficients rounded to 2**-22 as
    ``normalize_coeffs_8bpc``; (L,) int64 input indices). Every input outside that span has weight
    0 in the full matrix (PIL's window), so a block's sums are the full matrix product's. ``n_in``
    may be a traced size."""
    import torch

    n_in_f = torch.as_tensor(n_in, dtype=torch.float64)
    scale = n_in_f / n_out
    filterscale = torch.clamp(scale, min=1.0)
    support = _SUPPORT[rule] * filterscale
    lo = torch.clamp(torch.floor((o0 + 0.5) * scale - support) - 1.0, min=0.0)
    hi = torch.minimum(torch.ceil((o1 - 0.5) * scale + support) + 2.0, n_in_f)
    j = torch.arange(lo, hi, dtype=torch.float64)
    centre = (torch.arange(o0, o1, dtype=torch.float64) + 0.5).unsqueeze(1) * scale
    k = _filter((j.unsqueeze(0) - centre + 0.5) * (1.0 / filterscale), rule)  # PIL's order of operations
    k = k / k.sum(dim=1, keepdim=True)
    q = k * float(1 << _PIL_BITS)
    return torch.sign(q) * torch.floor(q.abs() + 0.5), j.to(torch.int64)  # C's (int)(+-0.5 + k * 2**22)


def pil_weights(n_in, n_out: int, rule: str):
    """(n_out, n_in) float64 matrix of PIL's 8-bit resampling along one axis, in its fixed-point
    units (coefficients rounded to 2**-22, as ``normalize_coeffs_8bpc``): the one block that spans
    every output, whose inputs are then all of them. ``n_in`` may be a traced size."""
    return pil_block(n_in, 0, n_out, n_out, rule)[0]


def _pil_pass(y, n_out: int, rule: str):
    """One PIL pass along dim -2 (whole rows of the last dim gathered per block: a fast copy) of
    grey levels (uint8 or float) -> (..., n_out, W) float32 grey levels, rounded as PIL's uint8
    intermediate (float64 fixed-point sums)."""
    import torch

    half, unit = float(1 << (_PIL_BITS - 1)), float(1 << _PIL_BITS)
    parts = []
    for o0 in range(0, n_out, RESIZE_BLOCK):  # each block rounded while it is small (cache-resident)
        w, idx = pil_block(y.shape[-2], o0, min(o0 + RESIZE_BLOCK, n_out), n_out, rule)
        acc = torch.matmul(w, torch.index_select(y, -2, idx).to(torch.float64))
        parts.append(torch.floor((acc + half) / unit).clamp(0.0, 255.0).to(torch.float32))
    return torch.cat(parts, dim=-2)


def resize_tensor(x, size: tuple[int, int], rule: str):
    """(B,C,H,W) uint8 images, or float ones holding whole grey levels -> (B,C,h,w) float32 by ``rule``: the PIL rules
    exactly as PIL's 8-bit resampling (horizontal pass, rounded to uint8, then vertical, as Pillow
    up to 12.x and Pillow 13 for square and landscape frames: docs/EXPORT.md; float64
    fixed-point sums over each output's filter window, RESIZE_BLOCK outputs at a time),
    cv2_linear by bilinear interpolation rounded to grey levels (within one grey level of
    OpenCV's fixed-point one). Traceable with dynamic H and W (exports)."""
    import torch.nn.functional as F

    if resize_rule(rule) == "cv2_linear":
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).round().clamp(0.0, 255.0)
    # horizontal pass first, as PIL: on the transposed image (copied as it comes: uint8 is a quarter
    # of float32's bytes), so that each block gathers whole rows
    y = _pil_pass(x.transpose(-1, -2).contiguous(), size[1], rule)  # (B,C,w,H)
    return _pil_pass(y.transpose(-1, -2).contiguous(), size[0], rule)  # (B,C,h,w)
