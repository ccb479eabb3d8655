"""Continual anomaly detection: task schedules, the accuracy matrix, forgetting, task routing.

`run_schedule` lives in adtrain.continual.runner (imported lazily by adtrain.run).
"""

from adtrain.continual.metrics import final_average, forgetting, forgetting_per_task, summarize
from adtrain.continual.routing import TaskRouter, select_by_score
from adtrain.continual.schedule import Schedule, parse_tasks, read_schedule, task_config, task_name

__all__ = [
    "final_average", "forgetting", "forgetting_per_task", "summarize",
    "TaskRouter", "select_by_score",
    "Schedule", "parse_tasks", "read_schedule", "task_config", "task_name",
]
