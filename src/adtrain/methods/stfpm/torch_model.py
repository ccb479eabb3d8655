"""STFPM (Wang et al., BMVC 2021): a student distils a frozen teacher's feature pyramid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adtrain.backbones import build_extractor
from adtrain.backbones.extractor import layer_names
from adtrain.methods.output import AnomalyOutput

LOSS_REDUCTIONS = ("official", "anomalib")
#: the student's random init: ``torchvision`` = torchvision's ResNet (every batch-norm gamma 1, as
#: the official code's ``models.resnet18(pretrained=False)``); ``timm`` = timm's, whose ResNet
#: blocks start with the last batch-norm gamma of each residual branch at 0 (``zero_init_last``)
STUDENT_INITS = ("torchvision", "timm")


def torchvision_init(model: nn.Module) -> int:
    """Undo timm's ``zero_init_last`` in a random-init ResNet (the last batch norm of each
    residual branch back to gamma 1, torchvision's ``zero_init_residual=False``); the other
    weights are drawn alike by both libraries. Returns how many batch norms were reset (0 for
    backbones without such blocks, e.g. EfficientNet, whose init has no zero gammas)."""
    from timm.models.resnet import BasicBlock, Bottleneck

    count = 0
    for m in model.modules():
        bn = m.bn2 if isinstance(m, BasicBlock) else m.bn3 if isinstance(m, Bottleneck) else None
        if bn is not None and getattr(bn, "weight", None) is not None:
            with torch.no_grad():
                bn.weight.fill_(1.0)
            count += 1
    return count


def layer_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """sum_c (t_hat - s_hat)^2 of channel-L2-normalised features = 2(1 - cos): (B,H,W)."""
    t = F.normalize(teacher.float(), dim=1)
    s = F.normalize(student.float(), dim=1)
    return (t - s).pow(2).sum(dim=1)


def stfpm_loss(teacher: dict, student: dict, reduction: str = "official") -> torch.Tensor:
    """Official: per layer mean over (B,H,W) of the channel sum, summed over layers.
    anomalib: 0.5/(H*W) * the sum over everything (about 0.5*B times larger)."""
    total = 0.0
    for name, t in teacher.items():
        d = layer_distance(t, student[name])
        if reduction == "official":
            total = total + d.mean()
        elif reduction == "anomalib":
            total = total + 0.5 / (d.shape[-2] * d.shape[-1]) * d.sum()
        else:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    return total


def anomaly_map(teacher: dict, student: dict, out_size: tuple[int, int]) -> torch.Tensor:
    """Product over layers of the per-layer distance, each upsampled to the finest grid,
    then resized to the input size: (B,1,H,W)."""
    maps = [layer_distance(t, student[n]).unsqueeze(1) for n, t in teacher.items()]
    grid = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    prod = None
    for m in maps:
        up = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
        prod = up if prod is None else prod * up
    return F.interpolate(prod, size=out_size, mode="bilinear", align_corners=False)


class StfpmModel(nn.Module):
    def __init__(self, backbone: dict, layers=("layer1", "layer2", "layer3"), teacher=None, student=None,
                 student_init: str = "torchvision"):
        super().__init__()
        if student_init not in STUDENT_INITS:
            raise ValueError(f"student_init must be one of {STUDENT_INITS}, got {student_init!r}")
        layers = layer_names(layers)
        self.teacher = teacher if teacher is not None else build_extractor(backbone, layers, frozen=True, role="teacher")
        if student is None:
            student = build_extractor(backbone, layers, pretrained=False, role="student")
            if student_init == "torchvision":
                torchvision_init(student.model)
        self.student = student

    def features(self, images: torch.Tensor) -> tuple[dict, dict]:
        with torch.no_grad():
            t = self.teacher(images)
        return t, self.student(images)

    def forward(self, images: torch.Tensor):
        t, s = self.features(images)
        if self.training:
            return t, s
        amap = anomaly_map(t, s, images.shape[-2:])
        return AnomalyOutput(amap, amap.flatten(1).amax(dim=1))
