"""Hydra launchers: joblib runs a sweep's jobs in parallel processes and the sweep summary is still
complete (each job's W&B run grouped by the sweep); hydra/launcher=slurm turns the config
(partition, time, GPUs from trainer.devices) into the sbatch script submitit would submit.
submitit's local executor is run end to end by tests/test_wheel.py, from the installed wheel."""

import csv
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from tests.conftest import FAST
from tests.test_config_groups import _compose_hydra
from tests.wandb_offline import read_run

TINY = [*FAST, "data.num_train=16", "data.size=64", "data.num_test_normal=4", "data.num_test_anomalous=4",
        "output.heatmaps=0"]


def test_slurm_launcher_sbatch_script_from_config(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = _compose_hydra("trainer=gpu", "trainer.devices=4", "hydra/launcher=slurm", "hydra.launcher.partition=a100",
                         "hydra.launcher.timeout_min=720", f"hydra.sweep.dir={tmp_path}", "method=patchcore")
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    # what hydra_submitit_launcher's launch() does with these values, up to sbatch
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that it is on a SLURM host
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout", "_target_")})
    script = executor._executor._make_submission_file_text("python -m adtrain", "uid")
    for line in ("--partition=a100", "--time=720", "--gpus-per-node=4", "--ntasks-per-node=4",
                 "--job-name=adtrain-patchcore", "--cpus-per-task=4"):
        assert f"#SBATCH {line}\n" in script, line


def _span(log: Path) -> tuple[datetime, datetime]:
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]", log.read_text(), re.M)
    parse = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in stamps]
    return min(parse), max(parse)


def test_joblib_runs_jobs_in_parallel_with_a_complete_summary_and_wandb_group(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               WANDB_DIR=str(tmp_path))
    env.pop("WANDB_API_KEY", None)
    # data.num_workers=1: DataLoader workers inside joblib's (loky) workers (adtrain.launchers)
    p = subprocess.run([sys.executable, "-m", "adtrain", "-m", *TINY, "data.num_workers=1", "logger=wandb", "seed=0,1",
                        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in p.stderr + p.stdout
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert sorted(r["seed"] for r in rows) == ["0", "1"] and all(r["image_auroc"] for r in rows)
    assert "Mean ± std over seeds" in (sweep / "summary.md").read_text()
    (a0, a1), (b0, b1) = _span(sweep / "0" / "__main__.log"), _span(sweep / "1" / "__main__.log")
    assert a0 < b1 and b0 < a1, "the two jobs did not overlap in time"
    for job in ("0", "1"):
        res = json.loads((sweep / job / "results.json").read_text())
        (run_dir,) = (sweep / job / "wandb").glob("offline-run-*")
        run = read_run(run_dir)
        assert run["group"] == str(sweep)  # one W&B group per sweep
        assert run["config"]["method"]["_target_"] == "adtrain.methods.stfpm.Stfpm"
        assert run["config"]["seed"] == int(job)
        assert run["history"]["test/image_auroc"] == res["image_auroc"]
        assert {"stfpm", "synthetic"} <= set(run["tags"])
