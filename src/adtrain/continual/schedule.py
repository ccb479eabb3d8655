"""Reading `cfg.schedule`: the task list, joint baseline, replay budget, per-task configs."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, open_dict

from adtrain.errors import ConfigError, whole_number


ROUTED_VAL = ("last", "all", "off")
#: after the last task, a model without per-task thresholds fits its decision threshold on the held-out
#: normals of every seen task (seen) or of the last task only (task)
THRESHOLD = ("seen", "task")


@dataclass(frozen=True)
class Schedule:
    name: str
    tasks: list[list[str]]      # each task: its categories
    joint: bool = False         # upper bound: train once on the union, evaluate per task
    replay: int = 0             # images kept from each finished task for later training
    routed_val: str = "last"    # validation sets scored as the test sets are (routed): last row | all | off
    threshold: str = "seen"     # the final decision threshold's held-out normals: every seen task's | the last task's

    @property
    def task_names(self) -> list[str]:
        return [task_name(t) for t in self.tasks]

    @property
    def train_tasks(self) -> list[list[str]]:
        """What is trained, in order: the tasks, or (joint) one task holding every category."""
        return [[c for t in self.tasks for c in t]] if self.joint else self.tasks

    def as_dict(self) -> dict:
        return {"name": self.name, "tasks": self.tasks, "joint": self.joint, "replay": self.replay}


def task_name(categories: list[str]) -> str:
    """'bottle' for one category, 'bottle+cable' for a group."""
    return "+".join(categories)


def parse_tasks(tasks) -> list[list[str]]:
    """Each item a category name or a non-empty list of them -> list of category lists."""
    if OmegaConf.is_config(tasks):
        tasks = OmegaConf.to_container(tasks, resolve=True)
    if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not tasks:
        raise ConfigError("schedule.tasks", f"must be a non-empty list of categories (or lists of "
                          f"categories), e.g. schedule.tasks=[a,b,c] or [[a,b],c]; got {tasks!r}")
    out: list[list[str]] = []
    for n, item in enumerate(tasks):
        cats = [item] if isinstance(item, (str, int)) else item
        if not isinstance(cats, (list, tuple)) or not cats or not all(isinstance(c, (str, int)) for c in cats):
            raise ConfigError("schedule.tasks", f"task {n} must be a category name or a non-empty list of "
                              f"names, got {item!r}")
        out.append([str(c) for c in cats])
    seen: dict[str, int] = {}
    for n, cats in enumerate(out):
        for c in cats:
            if c in seen:
                where = f"twice in task {n}" if seen[c] == n else f"in task {seen[c]} and task {n}"
                raise ConfigError("schedule.tasks", f"category '{c}' appears {where}; "
                                  "each category belongs to one task")
            seen[c] = n
    return out


def read_schedule(cfg: DictConfig) -> Schedule:
    node = cfg.get("schedule")
    if node is None or not node.get("tasks"):
        raise ConfigError("schedule.tasks", "no tasks: use schedule=mvtec_15 (or another sequence) or "
                          "schedule.tasks=[a,b,c]")
    replay = node.get("replay", 0) or 0
    whole_number(replay, "schedule.replay")
    if replay and node.get("joint", False) is True:  # results.json would say a replay that never happened
        raise ConfigError("schedule.replay", f"is {replay}, but schedule.joint=true trains once on every task's "
                          "images: there is nothing to replay; leave replay at 0")
    routed_val = str(node.get("routed_val", "last"))
    if routed_val not in ROUTED_VAL:
        raise ConfigError("schedule.routed_val", f"must be one of {ROUTED_VAL}, got {routed_val!r}")
    threshold = node.get("threshold", "seen")
    if threshold not in THRESHOLD:
        raise ConfigError("schedule.threshold", f"must be one of {THRESHOLD}, got {threshold!r}")
    name = str(node.get("name") or "custom")
    if name == "single":
        name = "custom"
    return Schedule(name=name, tasks=parse_tasks(node.tasks), joint=bool(node.get("joint", False)),
                    replay=int(replay), routed_val=routed_val, threshold=threshold)


def task_config(cfg: DictConfig, categories: list[str]) -> DictConfig:
    """A copy of cfg whose data.category is this task (one name, or the list of its categories)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.data.category = categories[0] if len(categories) == 1 else list(categories)
    return out
