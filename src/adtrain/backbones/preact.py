"""Stage outputs taken before their final activation (``FeatureExtractor(pre_activation=True)``).

timm's ``features_only`` models hand back each stage's output after the last block's final
activation: a ResNet stage's features are all >= 0. HETMM's official code (NarcissusEx/HETMM,
src/models/backbone/resnet.py, "Remove the last relu operation from layer1 to layer4") matches
templates on the signed values before that ReLU and feeds the next stage ``relu(x)``, so the
network downstream computes exactly what it always did.

Here the tapped block's final activation module (``act2`` of a timm ``BasicBlock``, ``act3`` of a
``Bottleneck``) is replaced by ``nn.Identity`` and a non-inplace copy of it is inserted into the
timm ``FeatureListNet`` right after the tapped stage (where the stage is not the last module). Both
are parameter-free: state-dict keys and checkpoints are unchanged, and the change is plain modules,
so it survives ``copy.deepcopy`` (the batch-norm folded copy), channels-last, ``torch.jit.trace``
and ONNX export. ``relu(pre)`` is bit for bit the usual output (the same op on the same values).

A stage whose output is not followed by an activation (EfficientNet's linear bottleneck,
ConvNeXt) is left as it is (one DEBUG line). A stage ending in an activation of a block this module
does not know raises ConfigError naming ``key``: its forward might do more after the activation.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from adtrain.errors import ConfigError

log = logging.getLogger("adtrain")

#: the config key that asks for pre-activation features (named in errors)
TAP_KEY = "method.feature_tap"
_SKIPPED = (nn.Identity, nn.Dropout, nn.Dropout2d)


@dataclass
class Tap:
    """One tapped stage: the block whose final activation was removed, and what was inserted."""

    block: nn.Module
    attr: str
    act: nn.Module
    inserted: str | None  # the name of the activation added after the stage (None: nothing follows)


def known_final_activation(block: nn.Module) -> str | None:
    """The attribute name of the activation that ends ``block``'s forward, for the blocks known."""
    from timm.models.resnet import BasicBlock, Bottleneck

    if isinstance(block, BasicBlock):
        return "act2"  # ... x += shortcut; x = self.act2(x); return x
    if isinstance(block, Bottleneck):
        return "act3"
    return None


def is_activation(module: nn.Module) -> bool:
    mod = type(module).__module__
    return mod == "torch.nn.modules.activation" or mod.startswith("timm.layers.activations")


def last_operations(model: nn.Module, blocks: list[nn.Module], size: int) -> list[nn.Module | None]:
    """Per block, the leaf module that ran last in one forward of ``model`` (identities, dropouts
    skipped): the order modules are registered in is not the order they run in (a RegNet block's
    ``downsample`` is registered after its final ``act3``)."""
    from timm.layers import DropPath

    last: list[nn.Module | None] = [None] * len(blocks)
    hooks = []

    def hook(i):
        return lambda mod, _inp, _out: last.__setitem__(i, mod)

    for i, block in enumerate(blocks):
        for m in block.modules():
            if next(m.children(), None) is None and not isinstance(m, (*_SKIPPED, DropPath)):
                hooks.append(m.register_forward_hook(hook(i)))
    training = model.training
    try:
        with torch.no_grad():
            p = next(model.parameters(), None)
            kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
            model.eval()(torch.zeros(1, 3, size, size, **kw))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return last


def last_block(stage: nn.Module) -> nn.Module:
    while isinstance(stage, (nn.Sequential, nn.ModuleList)) and len(stage):
        stage = stage[-1]
    return stage


def _stage_names(model: nn.Module, info: dict[int, dict]) -> dict[int, str]:
    """{feature index: top-level module name} of a timm FeatureListNet ({} for other models)."""
    return_layers = getattr(model, "return_layers", None)
    if not isinstance(model, nn.ModuleDict) or not isinstance(return_layers, dict):
        return {}
    by_id = {str(out_id): name for name, out_id in return_layers.items()}
    return {i: by_id[str(i)] for i in info if str(i) in by_id}


def tap_before_activation(model: nn.Module, info: dict[int, dict], name: str, key: str = TAP_KEY) -> list[Tap]:
    """Make the stages ``info`` ({feature index: timm feature info}) of ``model`` return their output
    before the final activation; returns what was changed (for ``untap``)."""
    tops = _stage_names(model, info)
    stages = {}
    for index, stage_info in info.items():
        top = tops.get(index)
        stage = model[top] if top is not None else model.get_submodule(str(stage_info["module"]))
        stages[index] = (str(stage_info["module"]), top, last_block(stage))
    unknown = [i for i, (_, _, block) in stages.items() if known_final_activation(block) is None]
    if unknown:
        size = max(32, 2 * max(int(info[i].get("reduction", 16)) for i in unknown))
        ran_last = dict(zip(unknown, last_operations(model, [stages[i][2] for i in unknown], size)))
    plan = []
    for index, (path, top, block) in stages.items():
        attr = known_final_activation(block)
        if attr is None:
            last = ran_last[index]
            if last is not None and is_activation(last):
                raise ConfigError(key, f"backbone '{name}' stage '{path}' ends in {type(last).__name__} inside a "
                                       f"{type(block).__name__}, a block adtrain cannot take apart before its "
                                       "activation (timm ResNet BasicBlock / Bottleneck only); use post_relu")
            log.debug("%s stage %s: no activation after the stage (%s ends in %s): the pre-activation tap "
                      "changes nothing", name, path, type(block).__name__, type(last).__name__)
            continue
        if not is_activation(getattr(block, attr)):
            raise ConfigError(key, f"backbone '{name}' stage '{path}': {type(block).__name__}.{attr} is "
                                   f"{type(getattr(block, attr)).__name__}, not an activation")
        if top is None:
            raise ConfigError(key, f"backbone '{name}': {type(model).__name__} is not a timm FeatureListNet; "
                                   "adtrain cannot give the next stage the activation it removes")
        plan.append((top, block, attr))
    names = list(model._modules)
    taps, inserts = [], {}
    for top, block, attr in plan:
        act = getattr(block, attr)
        follows = names.index(top) < len(names) - 1
        inserted = None
        if follows:
            inserted = f"{top}_act"
            if inserted in model._modules:
                raise ConfigError(key, f"backbone '{name}': a module '{inserted}' already exists")
            again = copy.deepcopy(act)
            if hasattr(again, "inplace"):
                again.inplace = False  # the tapped tensor is returned: never overwritten
            inserts[top] = (inserted, again)
        setattr(block, attr, nn.Identity())
        taps.append(Tap(block, attr, act, inserted))
        log.debug("%s stage %s: features taken before %s.%s", name, top, type(block).__name__, attr)
    if inserts:
        items = list(model._modules.items())
        model._modules.clear()
        for top, module in items:
            model._modules[top] = module
            if top in inserts:
                model._modules[inserts[top][0]] = inserts[top][1]
    return taps


def untap(model: nn.Module, taps: list[Tap]) -> None:
    """Undo ``tap_before_activation``: the usual (post-activation) network again."""
    for tap in taps:
        setattr(tap.block, tap.attr, tap.act)
        if tap.inserted is not None:
            del model._modules[tap.inserted]
