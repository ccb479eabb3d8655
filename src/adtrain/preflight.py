"""Checks that run before training, so a bad value or a bad file fails in seconds, not after fitting.

`check_config`: values (threshold.quantile, trainer.max_epochs, a GPU that is not there).
`check_files`: every image file is non-empty and has a readable header, every mask matches its
image's size, every defects config (MVTec LOCO AD) reads; headers only (PIL's lazy open reads no
pixels). The test set is listed for this, but only paths are used: no test label is read and no
test image is decoded before testing.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from adtrain.errors import ConfigError, DataError

#: files named in one error at most (the count of the rest follows)
MAX_LISTED = 3


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, got {value!r}")
    return float(value)


def check_config(cfg: DictConfig) -> None:
    """Config values that would otherwise fail only after training (or never end)."""
    q = (cfg.get("threshold") or {}).get("quantile", 0.99)
    if not 0.0 <= _number(q, "threshold.quantile") <= 1.0:
        raise ConfigError("threshold.quantile", f"must be in [0, 1], got {q}")
    trainer = cfg.get("trainer") or {}
    epochs = trainer.get("max_epochs")
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int):
            raise ConfigError("trainer.max_epochs", f"must be a whole number >= 1, got {epochs!r}")
        if epochs == 0:
            raise ConfigError("trainer.max_epochs", "is 0: nothing would train (the method keeps its untrained "
                              "start); set it to 1 or more")
        if epochs < 0:
            extra = " (-1 means 'train forever' to Lightning: this run would never end)" if epochs == -1 else ""
            raise ConfigError("trainer.max_epochs", f"must be >= 1, got {epochs}{extra}")
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError("seed", f"must be a whole number in [0, 2**32), got {seed!r}")
    data = cfg.get("data") or {}
    for key in ("batch_size", "eval_batch_size", "num_workers"):
        value, least = data.get(key), 0 if key == "num_workers" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"data.{key}", f"must be a whole number >= {least}, got {value!r}")
    missing = sorted(k for k in OmegaConf.missing_keys(data)) if isinstance(data, DictConfig) else []
    if missing:  # the keys come as full paths ("data.normal_dir") from a node of the whole config
        key = missing[0] if missing[0].startswith("data.") else f"data.{missing[0]}"
        raise ConfigError(key, f"missing (???): set it, e.g. {key}=...")
    accel = str(trainer.get("accelerator", "auto")).lower()
    if accel in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator", f"{accel} asked for, but no CUDA GPU is visible "
                              "(torch.cuda.is_available() is False); use trainer.accelerator=cpu or auto")
    elif accel == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError("trainer.accelerator", "mps asked for, but no Apple GPU is available; use cpu or auto")


def header_size(path: str | os.PathLike) -> tuple[int, int]:
    """(W, H) from the file's header; DataError naming the file if it is empty or not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.stat(path).st_size == 0:
            raise DataError(path, "empty file (0 bytes)")
        with Image.open(path) as im:  # lazy: the header only, no pixel is decoded
            return im.size
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataError(path, f"not a readable image ({type(err).__name__}: {err})") from None


def _problems(samples, with_masks: bool) -> list[DataError]:
    from adtrain.data.image_io import mask_files

    found = []
    for s in samples:
        try:
            size = header_size(s.path)
            if with_masks and s.mask_path is not None:
                for mask in mask_files(s.mask_path):  # a file, or each file of a mask folder
                    msize = header_size(mask)
                    if msize != size:
                        raise DataError(mask, f"mask size {msize[0]}x{msize[1]} differs from image {s.path} "
                                        f"{size[0]}x{size[1]}")
        except DataError as err:
            found.append(err)
    return found


def check_files(dm, test: bool = True) -> None:
    """Headers, sizes and emptiness of every training, held-out and (test=true) test file of dm.

    Only for data modules that read files with the default loader (in-memory data is skipped).
    The test set is listed through dm._test_samples() and only its paths are used."""
    from adtrain.data.dataset import reads_files

    if not reads_files(dm.sample_loader()):
        return
    found = _problems([*dm.train_samples, *dm.val_samples], with_masks=False)
    if test:
        found += _problems(dm._test_samples(), with_masks=True)
        regions = dm.spro_regions()  # MVTec LOCO AD's defects_config.json files (AU-sPRO)
        try:
            regions is not None and regions.check()
        except DataError as err:
            found.append(err)
    if found:
        more = f" (and {len(found) - 1} more bad file{'s' if len(found) > 2 else ''}" + (
            f": {', '.join(str(e.path) for e in found[1:1 + MAX_LISTED])}{', ...' if len(found) > 1 + MAX_LISTED else ''})"
        ) if len(found) > 1 else ""
        raise DataError(found[0].path, f"{str(found[0]).removeprefix(f'{found[0].path}: ')}{more}")
