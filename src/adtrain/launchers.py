"""Hydra callbacks for launchers that run jobs in worker processes (joblib's loky, submitit).

joblib's loky workers set the process-wide multiprocessing start method to 'loky', under which
torch's DataLoader workers (data.num_workers > 0) cannot be started ("Got pickle error when
attempting to start a worker Process", then "Please call `iter(combined_loader)` first").
A job in such a worker gets the platform's usual start method back, as in a plain run."""

from __future__ import annotations

import multiprocessing

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class PlainStartMethod(Callback):
    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if multiprocessing.get_start_method(allow_none=True) == "loky":
            usual = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            multiprocessing.set_start_method(usual, force=True)
