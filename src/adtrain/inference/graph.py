"""The whole inference path of a trained method as one torch module: what an export traces.

uint8 images (B,H,W,3) or (B,3,H,W) -> resize to the run's image_size by the run's rule
(``data.resize``, adtrain.data.resize.resize_tensor: the PIL rules as PIL's own 8-bit resampling,
cv2_linear bilinear rounded to whole grey levels) -> centre crop -> ImageNet normalisation (the
run's eval transform) -> the method's model -> `AnomalyModule.inference_outputs`
(score, display map, decision against the fitted threshold, normalised score).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from adtrain.data.image_io import BitDepth, check_bit_depth
from adtrain.data.resize import LEGACY, resize_rule, resize_tensor
from adtrain.errors import DataError

LAYOUTS = ("nhwc", "nchw")
#: output names, in the order the graph returns them
OUTPUTS = ("score", "map", "decision", "normalized_score")


@dataclass(frozen=True)
class Preprocessing:
    """The run's eval transform, as data: stored with every export."""

    image_size: tuple[int, int]
    center_crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: ``data.resize`` (adtrain.data.resize.RULES)
    resize: str
    #: ``data.bit_depth``: how images wider than 8 bits are read (None: a 16-bit file's full range; bits;
    #: a (low, high) range); applied where files are decoded (adtrain.Detector), before the uint8 graph
    bit_depth: BitDepth = None

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the images the model sees."""
        return tuple(self.center_crop or self.image_size)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """An export's metadata; one made before ``resize`` was recorded: LEGACY, its rule."""
        crop = d.get("center_crop")
        return cls(tuple(d["image_size"]), tuple(crop) if crop else None, tuple(d["mean"]), tuple(d["std"]),
                   resize_rule(d.get("resize", LEGACY), "preprocessing.resize"),
                   check_bit_depth(d.get("bit_depth"), "preprocessing.bit_depth"))


def run_preprocessing(cfg) -> tuple[Preprocessing, object]:
    """(Preprocessing, albumentations eval transform) of a run's config, from its data module
    (built, not set up: no data is read)."""
    from adtrain.build import _instantiate

    dm = _instantiate(cfg.data, "data", drop=("name",))
    pre = Preprocessing(tuple(dm.image_size), tuple(dm.center_crop) if dm.center_crop else None,
                        tuple(float(v) for v in dm.mean), tuple(float(v) for v in dm.std), dm.resize,
                        getattr(dm, "bit_depth", None))
    return pre, dm.eval_transform()


def routes_tasks(method) -> bool:
    """Does the method route each image among several task states (a continual run)?"""
    return bool(getattr(method, "routing", False)) or len(getattr(method, "task_memories", [])) > 1


#: why a checkpoint without a fitted threshold cannot decide (adtrain.predict, exports)
NO_THRESHOLD = ("holds no fitted threshold: a training checkpoint (use the finished run's checkpoints/model.ckpt), "
                "or a run without held-out normals (data.val_split=0, or too few training images to hold any "
                "out), which has nothing to decide with: rerun it holding normals out (data.val_split > 0, with "
                "enough training images)")


def check_exportable(method, checkpoint) -> None:
    if not torch.isfinite(method.threshold):
        raise DataError(checkpoint, NO_THRESHOLD)
    if routes_tasks(method):
        raise DataError(checkpoint, "routes images among several tasks' states (a continual run's): an export "
                                    "holds one model; export a checkpoint saved before a second task was added "
                                    "(the run's tasks/0/model.ckpt) or a single-task run's")


class MethodScorer(nn.Module):
    """A method's torch model, fitted threshold and centres, scored by the method's own code
    (`AnomalyModule.anomaly_output`, `inference_outputs`) without the Lightning module, which
    cannot be traced. For one-task models (see `check_exportable`)."""

    def __init__(self, method):
        super().__init__()
        from adtrain.methods.base import AnomalyModule

        self.model = method.model
        for name in ("threshold", "score_center", "map_center", "pixel_threshold"):
            self.register_buffer(name, getattr(method, name).detach().clone())
        self._bind = AnomalyModule

    def anomaly_output(self, images):
        return self._bind.anomaly_output(self, images)

    def normalize(self, values, center, threshold=None):
        return self._bind.normalize(self, values, center, threshold)

    def display_threshold(self):
        return self._bind.display_threshold(self)

    def inference_outputs(self, out):
        return self._bind.inference_outputs(self, out)


class InferenceGraph(nn.Module):
    """uint8 images -> (score (B,), map (B,h,w) in [0,1], decision (B,) bool, normalized_score (B,))."""

    def __init__(self, method, pre: Preprocessing, layout: str = "nhwc"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.method = MethodScorer(method).eval()
        self.pre, self.layout = pre, layout
        self.register_buffer("shift", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", 1.0 / (torch.tensor(pre.std, dtype=torch.float64) * 255.0).float().view(1, 3, 1, 1))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2) if self.layout == "nhwc" else images
        x = resize_tensor(x, self.pre.image_size, self.pre.resize)  # uint8 in, float32 out; same size: identity
        if self.pre.center_crop is not None:
            (h, w), (ch, cw) = self.pre.image_size, self.pre.center_crop
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[:, :, top : top + ch, left : left + cw]
        return (x - self.shift) * self.scale

    def forward(self, images: torch.Tensor):
        with torch.no_grad():
            res = self.method.inference_outputs(self.method.anomaly_output(self.preprocess(images)))
        return tuple(res[name] for name in OUTPUTS)
