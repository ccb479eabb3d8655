"""Batch-norm folding for CNN extractors in eval mode: the same function with one op fewer per conv.

An extractor in eval mode (a frozen one, or STFPM's trained student at validation and test; the
folded copy is rebuilt whenever its weights change) runs its batch norms as a fixed per-channel affine map
``y = (x - mean) / sqrt(var + eps) * gamma + beta`` applied to a convolution's output. Folding it
into the convolution (``W' = W * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``) removes a full pass over every feature map: on a 2-core CPU the
batch norms were a third of EfficientNet-Lite0's time (docs/BENCHMARKS.md, "Throughput").

The folded model is a private copy used only for inference: the extractor's own modules, its
state dict and its checkpoints are unchanged, so checkpoints stay loadable either way. The
conv -> BN pairs are found by tracing one forward (a BN whose input is the very tensor a conv
just returned); the folded copy is then checked against the original on the same input and
discarded (with a log line) if they differ by more than float rounding, so an unusual graph
(a conv output also used elsewhere) can only cost speed, never change features. Folding
changes the features by float rounding only (about 1e-6 relative), not exactly: the option is
``backbone.fuse_batchnorm`` (default true; false runs the batch norms as trained).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger("adtrain")

#: largest |folded - original| / max|original| per output accepted as float rounding
TOLERANCE = 1e-4


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) for every BN whose input is the output of a conv, by one traced forward."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []

    def conv_hook(mod, _inp, out):
        produced[id(out)] = (names[mod], out)  # the tensor is held: its id stays unique

    def bn_hook(mod, inp, _out):
        src = produced.get(id(inp[0]))
        if src is not None and src[1] is inp[0]:
            pairs.append((src[0], names[mod]))

    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.BatchNorm2d):
            hooks.append(mod.register_forward_hook(bn_hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    seen_conv = [c for c, _ in pairs]
    return [(c, b) for c, b in pairs if seen_conv.count(c) == 1]  # a conv called twice: leave it


def _bn_replacement(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What stays of a folded BN: nothing (plain BatchNorm2d) or timm's BatchNormAct2d tail."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if type(bn).__name__ == "BatchNormAct2d" and isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return nn.Sequential(drop, act)
    return None


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(((b - mean) * scale + beta).to(conv.weight.dtype), requires_grad=False)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _max_rel_error(a, b) -> float:
    outs_a = a if isinstance(a, (list, tuple)) else [a]
    outs_b = b if isinstance(b, (list, tuple)) else [b]
    worst = 0.0
    for x, y in zip(outs_a, outs_b):
        scale = float(x.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module | None, int]:
    """(a folded copy of ``model`` (eval, no grad) or None where nothing was folded or the copy
    disagrees with the original on ``example``, number of BNs folded)."""
    if model.training:
        return None, 0
    pairs = _conv_bn_pairs(model, example)
    if not pairs:
        return None, 0
    fused = copy.deepcopy(model)
    done = 0
    for conv_name, bn_name in pairs:
        bn = fused.get_submodule(bn_name)
        rest = _bn_replacement(bn)
        if rest is None or bn.running_var is None:
            continue
        _fold(fused.get_submodule(conv_name), bn)
        _set(fused, bn_name, rest)
        done += 1
    if not done:
        return None, 0
    fused.eval().requires_grad_(False)
    err = _max_rel_error(model(example), fused(example))
    if not err <= TOLERANCE:
        log.info("backbone: batch-norm folding left off (folded features differ by %.2e relative)", err)
        return None, 0
    return fused, done
