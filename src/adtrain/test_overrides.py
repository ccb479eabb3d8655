"""Overrides of ``adtrain.test``: what may change when a finished run is tested again, checked as a run's
config is (adtrain.preflight), so a typo or a value the test would not use is said, not ignored.

A test reads ``data``, ``trainer``, ``output``, ``metrics``, ``inference``, ``callbacks`` (the trainer's)
and ``seed`` (the heatmaps' sample); the model, its backbone and its threshold are the checkpoint's, so ``method.*``,
``backbone.*``, ``threshold.*`` and the rest cannot change at test time and are refused, not ignored
(``logger=none`` is taken: a test logs nothing). A whole config group (``data=mvtec``) cannot be
swapped: its keys can (``data.root=... data.category=...``). A key the run's config lacks is refused
unless the packaged config has it (a key newer than the run: ``metrics.aupro_fpr_limit``) or it is
added on purpose with ``+``. The input geometry (data.image_size, center_crop, resize) may change,
with a warning: the model was fitted at the run's.
"""

from __future__ import annotations

import functools
import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from adtrain.errors import ConfigError

log = logging.getLogger("adtrain")

#: what a test reads
READ = ("data", "trainer", "output", "metrics", "inference", "callbacks", "seed")
#: data keys that change what the model sees: allowed, said
GEOMETRY = ("data.image_size", "data.center_crop", "data.resize")


@functools.lru_cache(maxsize=1)
def _packaged() -> DictConfig:
    """The packaged default config, for keys newer than a run's stored config."""
    from adtrain.api import compose

    return compose([])


def _known(cfg: DictConfig, key: str) -> bool:
    for node in (cfg, _packaged()):
        try:
            if OmegaConf.select(node, key, default="\\0missing", throw_on_missing=False) != "\\0missing":
                return True
        except Exception:  # an interpolation of the packaged config that does not resolve alone
            continue
    return False


def merge_test_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` (a finished run's) with ``overrides`` (key=value) merged, checked before anything is read."""
    from adtrain.preflight import check_config

    dotlist, keys = [], []
    for item in overrides:
        text = str(item)
        if "=" not in text:
            raise ConfigError("overrides", f"{text!r}: a key=value override is expected (e.g. data.category=poly)")
        key, value = text.split("=", 1)
        plus = key.startswith("+")
        key = key.lstrip("+")
        top = key.split(".", 1)[0]
        if key == "logger" and value.strip().lower() in ("none", "null"):
            continue  # a test logs nothing: already so
        if top not in READ:
            raise ConfigError(key, "is not read when a finished run is tested: the model, its backbone and its "
                              "threshold are the checkpoint's (fit again to change them); a test takes "
                              f"{', '.join(k + ('' if k == 'seed' else '.*') for k in READ)}")
        if "." not in key and OmegaConf.is_dict(cfg.get(key)):
            example = f"{key}.root=... {key}.category=..." if key == "data" else f"{key}.<key>=..."
            raise ConfigError(key, f"is a config group: the run keeps its own; set its keys instead (e.g. {example})")
        if not plus and not _known(cfg, key):
            raise ConfigError(key, "is not a key of the run's config (a typo?); add a new one with +key=value")
        dotlist.append(f"{key}={value}")
        keys.append(key)
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    for key in GEOMETRY:
        before, after = OmegaConf.select(cfg, key, default=None), OmegaConf.select(merged, key, default=None)
        if before != after:
            log.warning("%s=%s at test time: the model was fitted at %s; the figures are not the run's geometry's",
                        key, after, before)
    check = merged.copy()
    with open_dict(check):
        check.test = True  # this call tests, whatever the run did (trainer.limit_test_batches=0 is refused)
        if check.get("trainer") is not None:
            check.trainer.limit_val_batches = None  # a test validates nothing: no selection to spoil
    try:
        check_config(check)
    except ConfigError as err:  # the overrides' own mistakes stop the test; the run's stored config is as it ran
        if any(err.key == k or err.key.startswith(f"{k}.") or k.startswith(f"{err.key}.") for k in keys):
            raise
        log.warning("the run's own config (not this test's overrides): %s", err)
    return merged
