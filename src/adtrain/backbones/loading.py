"""Read state-dict files and load them into a (truncated) timm model, checking coverage.

A features-only or pruned model holds a subset of the checkpoint's tensors: extra tensors
(classifier, unused stages) are ignored, but every tensor the model has must be found with
the right shape, so a wrong file never leaves random weights behind silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from adtrain.errors import WeightsError

StateDict = dict[str, torch.Tensor]

_NESTED_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def read_state_dict(path: str | Path) -> StateDict:
    """Read a .pth/.pt/.bin/.safetensors file; unwrap 'state_dict'/'model' nesting."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported with the path
        raise WeightsError(
            f"{path}: cannot read weights ({type(exc).__name__}: {exc}). Expected a state dict "
            "saved with torch.save or safetensors (tensors only)."
        ) from exc
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj, where: str) -> StateDict:
    """Return the tensor mapping inside a checkpoint object (raw or nested dict)."""
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    raise WeightsError(
        f"{where}: not a state dict (expected a dict of tensors, or one under a "
        f"{'/'.join(repr(k) for k in _NESTED_KEYS[:2])} key)"
    )


def _key_candidates(key: str) -> list[str]:
    """Checkpoint keys that may hold a model key (timm's FeatureListNet turns '.' into '_')."""
    head, _, rest = key.partition(".")
    out = [key]
    if "_" in head and rest:
        out.append(head.replace("_", ".") + "." + rest)
    return out


def _best_prefix(state: StateDict, target_keys: list[str]) -> str:
    """Prefix (e.g. 'module.' or 'model.backbone.') under which the model's keys sit."""
    probe = next((k for k in target_keys if not k.endswith(_OPTIONAL_SUFFIXES)), None)
    if probe is None or probe in state:
        return ""
    prefixes = {k[: -len(probe)] for k in state if k.endswith("." + probe)}
    if not prefixes:
        return ""
    return max(prefixes, key=lambda p: sum((p + k) in state for k in target_keys))


def load_into(
    model: nn.Module,
    state: StateDict,
    source: str,
    convert: Callable[[StateDict, nn.Module], StateDict] | None = None,
) -> int:
    """Copy ``state`` into ``model``; raise WeightsError naming ``source`` on any gap.

    Returns the number of tensors loaded.
    """
    if convert is not None:
        try:
            state = convert(state, model)
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"{source}: cannot convert checkpoint for this model: {exc}") from exc
    target = model.state_dict()
    prefix = _best_prefix(state, list(target))
    picked: StateDict = {}
    missing, mismatched = [], []
    for key, ref in target.items():
        found = next((prefix + c for c in _key_candidates(key) if prefix + c in state), None)
        if found is None:
            if not key.endswith(_OPTIONAL_SUFFIXES):
                missing.append(key)
            continue
        tensor = state[found]
        if tuple(tensor.shape) != tuple(ref.shape):
            mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(ref.shape)}")
            continue
        picked[key] = tensor
    if missing or mismatched:
        lines = []
        if missing:
            lines.append(f"{len(missing)} model tensors missing, e.g. {missing[:4]}")
        if mismatched:
            lines.append(f"{len(mismatched)} with the wrong shape, e.g. {mismatched[:3]}")
        raise WeightsError(
            f"{source}: weights do not fit this backbone ({'; '.join(lines)}). "
            "Is it a checkpoint of the same timm architecture?"
        )
    model.load_state_dict(picked, strict=False)
    return len(picked)
