"""Deprecated import path: the loaders live in adtrain.loading (read_checkpoint, load_method, save_method).

Kept only so adtrain.predict, which still imports from here, keeps working until it moves to
adtrain.loading; then delete this file."""

from adtrain.loading import load_method, load_run_config, read_checkpoint, save_method  # noqa: F401
