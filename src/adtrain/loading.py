"""Read checkpoints safely, and load a finished run's model.ckpt back into a method.

Every checkpoint adtrain reads goes through `read_checkpoint`: `torch.load(weights_only=True)`,
so a crafted file can hold tensors and plain data only; loading it runs no code. A config stored
in a checkpoint is plain data too, and `checked_config` refuses it unless every `_target_` it
could build is an adtrain class.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from adtrain.errors import DataError

#: classes beyond tensors and plain data that a checkpoint may hold (kept empty: store plain data)
SAFE_GLOBALS: tuple = ()
#: the only `_target_`s a stored config may name
TARGET_PREFIX = "adtrain."
#: parts of a stored config never built when reading a checkpoint (training only): dropped unread
TRAINING_ONLY = (("logger",), ("data", "augment"))


def _one_line(err: BaseException) -> str:
    """torch's multi-paragraph unpickling errors, as one line saying what was wrong."""
    text = str(err)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return (f"refused: it holds the Python object {found.group(1)}; a checkpoint may hold only tensors "
                    "and plain data (loading it could run code)")
        found = re.search(r"Unsupported [^\n]*", text)
        return ("refused: not a checkpoint of tensors and plain data only"
                + (f" ({found.group(0).strip()})" if found else ""))
    if isinstance(err, EOFError):
        return "cannot read checkpoint (the file is empty or cut short)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"cannot read checkpoint ({type(err).__name__}{': ' + first if first else ''})"


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """The checkpoint at path as a dict of tensors and plain data (weights_only load: runs no code).

    A missing, corrupt or unsafe file raises DataError naming it, in one line."""
    path = Path(path)
    if path.is_dir():
        inside = path / "checkpoints" / "model.ckpt"
        raise DataError(path, "is a folder, not a checkpoint" + (f": a run's model is {inside}" if inside.is_file() else ""))
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) and not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a pickle
        raise DataError(path, "not a PyTorch checkpoint (neither the zip archive torch.save writes nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "pickle protocol 4": the error says enough
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means a bad or unsafe file
        raise DataError(path, _one_line(err)) from None
    if not isinstance(ckpt, dict):
        raise DataError(path, f"not a checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def _adtrain_class(target: Any) -> bool:
    """Is target 'adtrain.<module>.<Class>' naming a class defined in adtrain? Refuses functions
    ('adtrain.io.write_text') and names reached through an adtrain module's imports
    ('adtrain.io.os.system'): the prefix alone lets a checkpoint call them."""
    import importlib
    import inspect

    if not isinstance(target, str) or not target.startswith(TARGET_PREFIX):
        return False
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name, None)
    except Exception:  # noqa: BLE001 - 'adtrain.io.os' is no module: refused
        return False
    return inspect.isclass(obj) and obj.__module__.startswith(TARGET_PREFIX)


def _entries(node: Any, key: str = ""):
    """(dotted key, name, value) of every dict entry and list item in node, depth first."""
    if isinstance(node, dict):
        items = ((f"{key}.{k}" if key else str(k), k, v) for k, v in node.items())
    elif isinstance(node, (list, tuple)):
        items = ((f"{key}[{i}]", i, v) for i, v in enumerate(node))
    else:
        return
    for sub, name, value in items:
        yield sub, name, value
        yield from _entries(value, sub)


def _unsafe_target(node: Any, key: str) -> tuple[str, Any] | None:
    """(key, value) of the first `_target_` in node (nested dicts/lists) outside adtrain, else None."""
    return next(((sub, v) for sub, k, v in _entries(node, key)
                 if k == "_target_" and not (v is None or _adtrain_class(v))), None)


def _interpolation(node: Any, key: str) -> tuple[str, Any] | None:
    """(key, string) of the first string in node (nested dicts/lists, keys too) holding an OmegaConf
    interpolation (``${``), else None. A run stores its config resolved, so a real checkpoint holds
    none; one in a crafted file becomes config when resolved (``${oc.create:...}`` makes a new
    ``_target_`` after the check), so none is let through."""
    for sub, k, v in _entries(node, key):
        for text in (k, v):
            if isinstance(text, str) and "${" in text:
                return sub, text
    return None


def checked_config(stored: Any, path: str | Path) -> dict:
    """A copy of a checkpoint's stored config that is safe to build from: training-only parts
    (TRAINING_ONLY) set to null, then no interpolation anywhere (`_interpolation`) and every
    `_target_` left checked to start with 'adtrain.'; a
    config without ``data.resize`` (older runs) gets the rule those runs used (cv2_linear)."""
    if not isinstance(stored, dict) or not stored:
        raise DataError(path, "not an adtrain checkpoint (no adtrain_config inside)")
    cfg = copy.deepcopy(stored)  # the stored config stays as saved
    for *parents, last in TRAINING_ONLY:
        node = cfg
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            node[last] = None
    bad = _interpolation(cfg, "")
    if bad:
        raise DataError(path, f"refused: stored config key '{bad[0]}' = {bad[1]!r} is an interpolation (a run stores "
                              "its config resolved; one in a checkpoint could build any class when resolved)")
    bad = _unsafe_target(cfg, "")
    if bad:
        raise DataError(path, f"refused: stored config key '{bad[0]}' = {bad[1]!r} is not an adtrain class "
                              f"(a checkpoint may only build '{TARGET_PREFIX}*' targets)")
    from adtrain.data.resize import with_legacy_rule

    return with_legacy_rule(cfg)  # a run made before data.resize existed: the rule it was made with


def load_run_config(checkpoint: str | Path):
    """(raw checkpoint, its config checked by checked_config as an OmegaConf DictConfig)."""
    if not Path(checkpoint).exists():
        raise DataError(checkpoint, "checkpoint not found (a run writes <run dir>/checkpoints/model.ckpt)")
    ckpt = read_checkpoint(checkpoint)
    cfg = checked_config(ckpt.get("adtrain_config"), checkpoint)
    if not isinstance(ckpt.get("state_dict"), dict) or not isinstance(cfg.get("method"), dict):
        raise DataError(checkpoint, "not an adtrain checkpoint (no state_dict or method config inside)")
    return ckpt, OmegaConf.create(cfg)


class _CheckpointWeightsFollow(logging.Filter):
    """While a checkpoint's method is built: its backbones' "random init" notes would be untrue
    (the checkpoint's weights replace them next), so they are not shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "random init" not in record.getMessage()


def load_weights(method, state_dict: dict, path: str | Path) -> None:
    """``method.load_state_dict(state_dict)``; weights that do not fit the method the file's config
    builds (a damaged or crafted file, another method's, backbone's or size's) are a DataError
    naming the file and the first mismatch, not torch's traceback."""
    try:
        method.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as err:
        text = " ".join(str(err).split())
        raise DataError(path, "its weights do not fit the method its stored config builds "
                              f"({text[:300]}{'...' if len(text) > 300 else ''})") from None


def load_method(checkpoint: str | Path):
    """(method in eval mode, config, raw checkpoint). Backbone weights come from the checkpoint,
    so no pretrained weights are looked up."""
    from adtrain.build import build_method

    ckpt, cfg = load_run_config(checkpoint)
    for node in (cfg.get("backbone"), cfg.method.get("backbone")):
        if node is not None:
            node.pretrained = False
    log, quiet = logging.getLogger("adtrain"), _CheckpointWeightsFollow()
    log.addFilter(quiet)
    try:
        method = build_method(cfg)
    finally:
        log.removeFilter(quiet)
    load_weights(method, ckpt["state_dict"], checkpoint)
    log.info("model weights (backbone included) loaded from %s", checkpoint)
    method.adtrain_config = ckpt["adtrain_config"]
    return method.eval(), cfg, ckpt


def save_method(method, path: str | Path, extra: dict | None = None) -> Path:
    from adtrain.io import torch_save

    return torch_save({"state_dict": method.state_dict(), "adtrain_config": method.adtrain_config, **(extra or {})}, path)
