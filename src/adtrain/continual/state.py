"""What survives a crash: per-task checkpoints and continual_state.json (written atomically).

Order after each task: tasks/<t>/model.ckpt first, then the state file that lists t as finished,
so a finished task always has its checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adtrain.loading import checked_config, load_weights, read_checkpoint
from adtrain.continual.metrics import Matrix, make_row
from adtrain.errors import ConfigError, DataError
from adtrain.io import torch_save, write_json

STATE_FILE = "continual_state.json"
STATE_VERSION = 1
#: the metrics kept as accuracy matrices R[t][i]
MATRIX_METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro")


def task_dir(run_dir: Path, t: int) -> Path:
    return Path(run_dir) / "tasks" / str(t)


def task_checkpoint(run_dir: Path, t: int) -> Path:
    return task_dir(run_dir, t) / "model.ckpt"


@dataclass
class ContinualState:
    schedule: dict
    method: str
    data: str
    finished: list[int] = field(default_factory=list)
    per_task: list[dict] = field(default_factory=list)
    matrices: dict[str, Matrix] = field(default_factory=lambda: {m: [] for m in MATRIX_METRICS})
    version: int = STATE_VERSION

    @property
    def num_tasks(self) -> int:
        return len(self.schedule["tasks"])

    @property
    def next_task(self) -> int:
        return len(self.finished)

    def record(self, t: int, entry: dict, evals: dict[int, dict]) -> None:
        """Task t finished: its summary entry and its row of evaluations {task i: metrics}."""
        if t != self.next_task:
            raise ValueError(f"task {t} finished out of order (expected {self.next_task})")
        for m in MATRIX_METRICS:
            self.matrices[m].append(make_row(self.num_tasks, {i: r.get(m) for i, r in evals.items()}))
        self.per_task.append(entry)
        self.finished.append(t)

    def save(self, run_dir: Path) -> Path:
        return write_json(Path(run_dir) / STATE_FILE, asdict(self))

    @classmethod
    def load(cls, run_dir: Path) -> "ContinualState":
        path = Path(run_dir) / STATE_FILE
        if not path.exists():
            if (Path(run_dir) / "tasks").is_dir():  # a begun sequence whose state file was deleted
                raise ConfigError("resume", f"{run_dir} holds a sequence's tasks/ but no {STATE_FILE}: which tasks "
                                  "finished is not known, so it cannot be resumed; overwrite=true runs it again")
            raise ConfigError("resume", f"no {STATE_FILE} in {run_dir}: nothing to resume. Pass the interrupted "
                              "run's directory: hydra.run.dir=<that run dir> resume=true")
        try:
            data = json.loads(path.read_text())
            state = cls(**data)
        except (ValueError, TypeError) as err:
            raise DataError(path, f"unreadable continual state ({err}): the sequence cannot be resumed; "
                            "overwrite=true runs it again from its first task")
        if state.version != STATE_VERSION:
            raise DataError(path, f"state version {state.version}, this adtrain writes {STATE_VERSION}")
        return state

    def check_same_run(self, other: "ContinualState") -> None:
        """Resuming with a different schedule, method or data would mix two experiments."""
        for key in ("schedule", "method", "data"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if json.loads(json.dumps(mine)) != json.loads(json.dumps(theirs)):
                raise ConfigError("resume", f"the interrupted run has {key}={mine}, this config {key}={theirs}; "
                                  "resume with the same config or start a new run directory")


def save_task_checkpoint(method, path: Path, extra: dict | None = None) -> Path:
    """state_dict + config (loadable by adtrain.predict), plus the method's on_save_checkpoint additions."""
    ckpt = {"state_dict": method.state_dict(), "adtrain_config": method.adtrain_config, **(extra or {})}
    method.on_save_checkpoint(ckpt)
    return torch_save(ckpt, path)


def load_task_checkpoint(method, path: Path) -> dict:
    """Restore a method saved by save_task_checkpoint (on_load_checkpoint first, as Lightning does).
    The file is read safely (adtrain.loading.read_checkpoint) and its stored config checked."""
    if not Path(path).exists():
        raise DataError(path, "task checkpoint missing: the continual state lists this task as finished; "
                        "start the sequence over in a new run directory")
    ckpt = read_checkpoint(path)
    checked_config(ckpt.get("adtrain_config"), path)
    if not isinstance(ckpt.get("state_dict"), dict):
        raise DataError(path, "not an adtrain task checkpoint (no state_dict inside)")
    method.on_load_checkpoint(ckpt)
    load_weights(method, ckpt["state_dict"], path)
    method.adtrain_config = ckpt.get("adtrain_config")
    return ckpt
