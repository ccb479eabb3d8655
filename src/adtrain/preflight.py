"""Checks of the config that run before training, so a bad value fails in seconds, not after fitting.

`check_config`: values (threshold.quantile, trainer.max_epochs, a GPU that is not there, a crop larger
than the image). The data files are checked by adtrain.data.file_checks.check_files.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from adtrain.errors import ConfigError

log = logging.getLogger("adtrain")


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, got {value!r}")
    return float(value)


#: the config groups whose options' keys sit under the group's name (config.yaml's at the top level)
_FLAG_GROUPS = ("backbone", "data", "logger", "method", "schedule", "trainer")
#: keys that take words too, checked where they are read: feature_cache on | off (a bare off in YAML is
#: false), trainer.deterministic "warn" (Lightning's)
_WORD_KEYS = frozenset({"feature_cache", "trainer.deterministic"})


@functools.lru_cache(maxsize=1)
def flag_keys() -> frozenset[str]:
    """Every key whose default is true or false in the packaged config (config.yaml and the groups'
    options), read with OmegaConf's YAML rules: ``off``/``on`` are strings there, not booleans."""
    import yaml
    from omegaconf._utils import get_yaml_loader

    conf = Path(__file__).resolve().parent / "conf"
    files = [(conf / "config.yaml", "")] + [(f, f"{g}.") for g in _FLAG_GROUPS for f in sorted((conf / g).glob("*.yaml"))]
    keys: set[str] = set()

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, bool):
                keys.add(f"{prefix}{k}")

    for path, prefix in files:
        walk(yaml.load(path.read_text(), Loader=get_yaml_loader()) or {}, prefix)
    return frozenset(keys - _WORD_KEYS)


def check_flags(cfg: DictConfig) -> None:
    """A true/false key given another value (``overwrite=off``, ``schedule.joint=no``: strings, which
    Python reads as true) is refused, naming it, before anything reads it."""
    for key in sorted(flag_keys()):
        try:
            value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except Exception:  # an interpolation that does not resolve: reported where it is used
            continue
        if value is not None and not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")


def _check_optimiser(method) -> None:
    """Learning rates, weight decay and momentum: numbers >= 0 (momentum below 1), checked before the
    optimiser would raise from inside torch after the data is read. A learning rate of 0 is allowed
    (an exact comparison run) and said."""
    import math

    for key in sorted(k for k in method.keys() if k in ("lr", "weight_decay", "momentum") or str(k).startswith("lr_")):
        value = method.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"method.{key}", f"must be a number >= 0, got {value!r}")
        if key == "momentum" and value >= 1:
            raise ConfigError("method.momentum", f"must be in [0, 1), got {value!r}")
        if str(key).startswith("lr") and value == 0:
            log.warning("method.%s=0: the parameters it drives do not train", key)


#: method values a model would take silently whatever they are: key -> (least, whole number, what 0 means);
#: None and the keys a method does not have are left alone
_METHOD_NUMBERS = {
    "blur_sigma": (0, False, "0 = no blur"),  # PatchCore, CFA, DFM: a negative sigma blurred nothing
    "projection_dim": (0, True, "0 = exact distances, no projection"),  # the coreset's random projection
    "num_neighbors": (1, True, None),  # PatchCore's b: 1.5 was cut to 1
    "num_keys": (1, True, None),  # DFM's continual task key
    "alpha": (0, False, None),  # CFA's repulsion margin
    "radius": (0, False, None),  # CFA's hypersphere radius (the loss uses r**2: a sign would be lost)
    "lambda_det": (0, False, None),  # DFM's loss weights: a negative one trains the wrong way
    "lambda_seg": (0, False, None),
}


def _check_method_numbers(method) -> None:
    """Ranges of the method values in ``_METHOD_NUMBERS``, DFM's clip_grad_norm (null = off, else > 0:
    torch flips every gradient under a negative one) and PatchCore's embed_dims (two sizes or null)."""
    import math

    for key, (least, whole, zero) in _METHOD_NUMBERS.items():
        value = method.get(key)
        if value is None:
            continue
        kind = "a whole number" if whole else "a number"
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int))
        if bad or not math.isfinite(value) or value < least:
            raise ConfigError(f"method.{key}", f"must be {kind} >= {least}{f' ({zero})' if zero else ''}, got {value!r}")
    if method.get("embed_dims") is not None:  # PatchCore's official-code descriptor
        from adtrain.data.transforms import to_plain
        from adtrain.methods.patchcore.mean_mapper import check_embed_dims

        check_embed_dims(to_plain(method.get("embed_dims")), "method.embed_dims")
    clip = method.get("clip_grad_norm")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ConfigError("method.clip_grad_norm", f"must be null (no clipping) or a number > 0, got {clip!r}")


def _check_trainer_limits(cfg: DictConfig, trainer) -> None:
    """limit_val_batches / limit_test_batches = 0: Lightning skips the loop, and the run would report empty
    test figures, or keep the last state while saying it selected on validation."""
    def zero(key: str) -> bool:
        value = trainer.get(key)
        return value is not None and not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0

    if zero("limit_test_batches") and bool(cfg.get("test", True)):
        raise ConfigError("trainer.limit_test_batches", "is 0: no test image would be scored (every test figure "
                          "empty); leave it unset, or skip testing with test=false")
    if zero("limit_val_batches"):
        from adtrain.selection import resolve_monitor

        monitor = resolve_monitor(cfg)
        if monitor != "last":
            raise ConfigError("trainer.limit_val_batches", f"is 0: no validation would run, so the selection on "
                              f"{monitor} would compare nothing and keep the last state; leave it unset, or set "
                              "selection.monitor=last")


#: Lightning's precisions that cast the whole module (weights *and* buffers) to another dtype
_WHOLE_MODULE_PRECISIONS = {"64": "64-true", "64-true": "64-true", "16-true": "16-true", "bf16-true": "bf16-true",
                            "transformer-engine": "transformer-engine",
                            "transformer-engine-float16": "transformer-engine-float16"}


def _check_precision(trainer) -> None:
    """A ``*-true`` precision other than 32-true casts every weight and buffer: the images stay fp32 (so
    the first convolution failed deep inside torch), and the fitted threshold, normalisation and memory
    bank would be rounded to the cast's dtype (bf16 keeps 8 bits: a threshold of 1.2345 became 1.234375).
    Refused here; autocast (bf16-mixed / 16-mixed) keeps the weights and the fitted figures in fp32."""
    value = trainer.get("precision")
    name = _WHOLE_MODULE_PRECISIONS.get(str(value).strip().lower()) if value is not None else None
    if name is not None:
        raise ConfigError("trainer.precision", f"{value!r} ({name}) casts every weight and buffer (the fitted "
                          "threshold, normalisation and memory bank included) and is not supported; use "
                          "bf16-mixed or 16-mixed (autocast: weights and fitted figures stay fp32) or 32-true")


def _check_backbone_weights(backbone) -> None:
    """A weights file with pretrained=false would be ignored (random init): said, not silently dropped."""
    if backbone.get("weights") and backbone.get("pretrained") is False:
        raise ConfigError("backbone.weights", f"is set ({backbone.get('weights')}) but backbone.pretrained=false "
                          "(random init) would ignore it: set backbone.pretrained=true to load it, or weights=null")


def _check_synthetic_anomaly(cfg: DictConfig) -> None:
    """data.synthetic_anomaly labels training images 1: only DFM's supervised stage 2 with
    method.anomalies=data|both trains on them. Any other method would learn them as normals (or, DFM,
    drop them), and DFM's anomalies=data|both without them would train nothing."""
    data, method = cfg.get("data") or {}, cfg.get("method") or {}
    consumes = method.get("name") == "dfm" and method.get("stage2_objective") == "supervised" \
        and method.get("anomalies") in ("data", "both")
    if data.get("synthetic_anomaly") is not None and not consumes:
        raise ConfigError("data.synthetic_anomaly", "is used only by method=dfm with method.stage2_objective="
                          f"supervised and method.anomalies=data|both; method={method.get('name')} here would "
                          "take the pasted anomalies as normal training images (or drop them): leave it null "
                          "(validation anomalies are data.val_anomalies)")
    if consumes and data.get("synthetic_anomaly") is None:
        raise ConfigError("method.anomalies", f"={method.get('anomalies')} needs data.synthetic_anomaly (e.g. "
                          "data.synthetic_anomaly={_target_:adtrain.data.cutpaste.CutPaste,p:0.5}); without it "
                          "stage 2 has no data anomalies" + (" and trains nothing" if method.get("anomalies") == "data"
                                                              else "") + "; or use method.anomalies=cutpaste")


def _check_val_anomaly_categories(cfg: DictConfig) -> None:
    """data.val_anomalies.by_category names a category of the dataset (its known_categories), of this run
    or of a task of its schedule: a misspelt one was silently left at the family's options."""
    data = cfg.get("data") or {}
    val = data.get("val_anomalies")
    named = [str(k) for k in (val.get("by_category") or {})] if OmegaConf.is_dict(val) else []
    if not named:
        return
    def names(value) -> list[str]:  # a name (BTAD's 1 for "01" too) or a list of them
        return [str(v) for v in value] if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) \
            else [] if value is None else [str(value)]

    cats = names(data.get("category"))
    for task in (cfg.get("schedule") or {}).get("tasks") or []:
        cats += names(task)
    try:
        from hydra.utils import get_class

        known = tuple(getattr(get_class(str(data.get("_target_"))), "known_categories", None) or ())
    except Exception:  # a _target_ that does not import: said where the data module is built
        known = ()
    unknown = [c for c in named if c not in set(cats) | set(known)]
    if unknown:
        raise ConfigError(f"data.val_anomalies.by_category.{unknown[0]}", "names no category of this dataset or "
                          f"run ({', '.join(sorted(set(cats) | set(known)))})")


def _check_callbacks(cfg: DictConfig) -> None:
    """The callbacks group's Lightning callbacks that would fail after the fit began: a learning-rate
    monitor without a logger; early stopping on a figure validation does not log."""
    named = cfg.get("callbacks")
    items = list(named.items()) if OmegaConf.is_dict(named) else []  # else build.build_callbacks says what is wrong
    extra = OmegaConf.select(cfg, "trainer.callbacks", default=None)  # +trainer.callbacks=[{_target_: ...}]
    if OmegaConf.is_list(extra):
        items += [(None, node) for node in extra]
    for i, (name, node) in enumerate(items):
        key = f"callbacks.{name}" if name is not None else f"trainer.callbacks[{i - (len(items) - len(extra))}]"
        target = str((node or {}).get("_target_", "")) if OmegaConf.is_dict(node) else ""
        if target.endswith("LearningRateMonitor") and not (cfg.get("logger") or {}).get("_target_"):
            raise ConfigError(key, "logs to the experiment logger, and logger=none has none: "
                              "use logger=csv or logger=wandb, or drop it")
        if target.endswith("EarlyStopping") and name is not None:
            from adtrain.selection import MONITORS

            monitor = node.get("monitor")
            logged = sorted(m for m, _ in MONITORS.values() if m)
            if monitor not in logged:
                raise ConfigError(f"callbacks.{name}.monitor", f"{monitor!r} is not a validation figure; one of "
                                  f"{', '.join(logged)}")
            val = (cfg.get("data") or {}).get("val_anomalies")
            families = _val_families(val)
            if "normal_" not in monitor and not (families and val.get("per_normal", 1)):
                raise ConfigError(f"callbacks.{name}.monitor", f"{monitor} needs validation anomalies, and "
                                  "data.val_anomalies makes none: monitor val/normal_score or val/normal_map_mean")
            family = monitor.removeprefix("val/image_auroc_") if monitor.startswith("val/image_auroc_") else None
            if family and family not in families:
                raise ConfigError(f"callbacks.{name}.monitor", f"{monitor} needs {family} in "
                                  f"data.val_anomalies.families (now {families})")


def _val_families(val) -> list[str]:
    """The synthetic anomaly families data.val_anomalies makes (none where it is null)."""
    if not val:
        return []
    families = val.get("families")
    return [families] if isinstance(families, str) else list(families or [])


def _check_threshold(cfg: DictConfig) -> None:
    """threshold.quantile in [0, 1]; threshold.mode one of MODES, val_f1 only with synthetic
    validation anomalies."""
    from adtrain.methods.val_threshold import MODES

    threshold = cfg.get("threshold") or {}
    q = threshold.get("quantile", 0.99)
    if not 0.0 <= _number(q, "threshold.quantile") <= 1.0:
        raise ConfigError("threshold.quantile", f"must be in [0, 1], got {q}")
    mode = threshold.get("mode", "quantile")
    if mode not in MODES:
        raise ConfigError("threshold.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "val_f1":
        val = (cfg.get("data") or {}).get("val_anomalies")
        if not (_val_families(val) and val.get("per_normal", 1)):
            raise ConfigError("threshold.mode", "val_f1 needs synthetic anomalies in the validation set, and "
                              "data.val_anomalies makes none: set it (families, per_normal > 0) or use "
                              "threshold.mode=quantile")


def _check_normalisation(backbone) -> None:
    """backbone.mean / std: lists of numbers, one per channel each (std > 0), not a tensor-size error
    from inside the model or a NaN loss blamed on the learning rate."""
    mean, std = backbone.get("mean"), backbone.get("std")
    for key, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        if isinstance(value, str) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"backbone.{key}", f"must be a list of numbers, one per channel, got {value!r}")
    if mean is not None and std is not None and len(mean) != len(std):
        raise ConfigError("backbone.std", f"has {len(std)} values, backbone.mean {len(mean)}: one per channel each")
    if std is not None and any(v <= 0 for v in std):
        raise ConfigError("backbone.std", f"must be > 0 (images are divided by it), got {list(std)}")


def single_schedule() -> dict:
    """The options of schedule=single (conf/schedule/single.yaml, less its name and tasks): the values
    a run without tasks leaves as they are."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parent / "conf" / "schedule" / "single.yaml"))
    return {k: v for k, v in node.items() if k not in ("name", "tasks")}


def _check_crop(data, backbone=None) -> None:
    """data.image_size / data.center_crop (each ${method.*} in the packaged data configs): a crop larger
    than the resized image, named where it is set, before the run directory is written (the data module
    refuses it too, later)."""
    from omegaconf.errors import OmegaConfBaseException

    from adtrain.build import interpolated_from
    from adtrain.data.transforms import check_crop, size_pair

    if not isinstance(data, DictConfig) or "image_size" not in data or "center_crop" not in data:
        return
    raw = OmegaConf.to_container(data, resolve=False)
    keys = {k: interpolated_from(raw[k]) or f"data.{k}" for k in ("image_size", "center_crop")}
    try:
        size = size_pair(data.image_size, keys["image_size"])
        crop = size_pair(data.center_crop, keys["center_crop"])
    except OmegaConfBaseException:  # missing or unresolvable: the data module names it
        return
    if size is None:  # the data module says it is null
        return
    hint = f" (data.center_crop is {raw['center_crop']})" if keys["center_crop"] != "data.center_crop" else ""
    try:
        check_crop(crop, size, keys["center_crop"])
    except ConfigError as err:
        raise ConfigError(err.key, err.detail + hint) from None
    _check_patch_multiple(backbone, crop or size, keys["center_crop" if crop else "image_size"])


def _check_patch_multiple(backbone, size: tuple[int, int], key: str) -> None:
    """A ViT (backbone.kind: vit) cuts its input into patches: the network's input (the crop, else the
    resized image) a multiple of the patch size its name says (vit_small_patch16_224: 16), else timm's
    assertion deep inside the first forward pass, after the data were read."""
    import re

    if not isinstance(backbone, DictConfig) or backbone.get("kind") != "vit":
        return
    found = re.search(r"patch(\d+)", str(backbone.get("name", "")))
    patch = int(found.group(1)) if found else 0
    if patch > 1 and any(v % patch for v in size):
        fit = [max(patch, round(v / patch) * patch) for v in size]
        raise ConfigError(key, f"{list(size)} is the ViT's input ({backbone.name}): each side must be a multiple of "
                               f"its patch size {patch}, e.g. {fit}")


def _check_augment(data) -> None:
    """data.augment's transforms built one by one, each error naming its entry (data.augment[0]):
    built inside the data module, a wrong value was a several-line error naming `data`, a misspelt
    argument a Python warning (the transform ran with its default), a `_target_` that builds no
    transform "expected a dict with '_target_'"."""
    from omegaconf.errors import OmegaConfBaseException

    from adtrain.data.transforms import build_augment, check_augment_keeps_size, size_pair

    if not isinstance(data, DictConfig) or data.get("augment") is None:
        return
    try:
        augment = data.augment
    except OmegaConfBaseException:  # unresolvable: the data module names it
        return
    transforms = build_augment(augment)
    try:
        size = size_pair(data.get("center_crop"), "data.center_crop") or size_pair(data.get("image_size"),
                                                                                  "data.image_size")
    except (OmegaConfBaseException, ConfigError):  # the data module names it
        return
    if size is not None:
        check_augment_keeps_size(transforms, size)


def _check_bit_depth(data) -> None:
    """data.bit_depth (null, bits or [low, high]), before the run directory is written."""
    from omegaconf.errors import OmegaConfBaseException

    from adtrain.data.image_io import check_bit_depth
    from adtrain.data.transforms import to_plain

    if isinstance(data, DictConfig) and "bit_depth" in data:
        try:
            value = to_plain(data.bit_depth)
        except OmegaConfBaseException:  # missing or unresolvable: the data module names it
            return
        check_bit_depth(value)


def check_config(cfg: DictConfig) -> None:
    """Config values that would otherwise fail only after training (or never end)."""
    check_flags(cfg)
    _check_threshold(cfg)
    trainer = cfg.get("trainer") or {}
    epochs = trainer.get("max_epochs")
    if "max_epochs" in trainer:
        if epochs is None:  # Lightning's default then: 1000 epochs
            raise ConfigError("trainer.max_epochs", "is null: Lightning would train 1000 epochs; set a whole "
                              "number >= 1 (it follows method.max_epochs by default)")
        if isinstance(epochs, bool) or not isinstance(epochs, int):
            raise ConfigError("trainer.max_epochs", f"must be a whole number >= 1, got {epochs!r}")
        if epochs == 0:
            raise ConfigError("trainer.max_epochs", "is 0: nothing would train (the method keeps its untrained "
                              "start); set it to 1 or more")
        if epochs < 0:
            extra = " (-1 means 'train forever' to Lightning: this run would never end)" if epochs == -1 else ""
            raise ConfigError("trainer.max_epochs", f"must be >= 1, got {epochs}{extra}")
    for key in ("accumulate_grad_batches", "check_val_every_n_epoch"):  # Lightning's loops divide by them
        value = trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"trainer.{key}", f"must be a whole number >= 1, got {value!r}")
    for key in ("limit_train_batches", "max_steps"):
        value = trainer.get(key)
        if value is not None and not isinstance(value, bool) and value == 0:
            raise ConfigError(f"trainer.{key}", "is 0: nothing would train (the method keeps its untrained start); "
                              "leave it unset or give it a positive value")
    _check_trainer_limits(cfg, trainer)
    _check_precision(trainer)
    if trainer.get("fast_dev_run") not in (None, False, 0):
        raise ConfigError("trainer.fast_dev_run", "is not supported: it turns checkpointing and the logger off and "
                          "tests one batch, yet the run would write results.json as a real one; use debug=fdr "
                          "(one batch of each loop, the run's own steps) instead")
    _check_synthetic_anomaly(cfg)
    _check_val_anomaly_categories(cfg)
    _check_callbacks(cfg)
    _check_optimiser(cfg.get("method") or {})
    _check_method_numbers(cfg.get("method") or {})
    _check_normalisation(cfg.get("backbone") or {})
    _check_crop(cfg.get("data"), cfg.get("backbone"))
    _check_augment(cfg.get("data"))
    _check_bit_depth(cfg.get("data"))
    _check_backbone_weights(cfg.get("backbone") or {})
    schedule = cfg.get("schedule") or {}
    if schedule.get("tasks") is not None:  # an empty list ran one task silently
        from adtrain.continual.schedule import parse_tasks

        parse_tasks(schedule.get("tasks"))
    else:  # one ordinary run: a schedule option set for it would be ignored without a word
        for key, default in single_schedule().items():
            if key in schedule and schedule.get(key) != default:
                raise ConfigError(f"schedule.{key}", f"is {schedule.get(key)!r}, but no schedule runs (schedule.tasks "
                                  "is null: one ordinary run); give the tasks (schedule.tasks=[a,b]) or a sequence "
                                  "(schedule=mvtec_15), or leave it out")
    output = cfg.get("output") or {}
    for key, least in (("heatmaps", 0), ("heatmap_size", 32)):  # else they would fail after the fit and test
        value = output.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"output.{key}", f"must be a whole number >= {least}, got {value!r}")
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
