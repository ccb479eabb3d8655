"""DFM in continual schedules: per-task state and UCAD's nearest-key task routing.

Each finished task keeps its own trainable state (adapters, CFA descriptor, FMN memory and
modulate layers) and a task key: a greedy coreset (num_keys items) of the frozen backbone's
aggregated features of its training normals, taken at the memory initialisation (adapters are
still the identity there). A test image goes to the task whose keys are nearest on average over
its patches (adtrain.continual.routing.TaskRouter) and is scored with that task's state. Every task
starts from the initial (untrained) state, so training task t cannot change tasks < t.
"""

from __future__ import annotations

import torch

from adtrain.continual.routing import TaskRouter
from adtrain.errors import TrainingError
from adtrain.methods.output import AnomalyOutput

_TRAINABLE = ("adapters", "head", "fmn")


class DfmContinualMixin:
    continual_behaviour = "dfm_per_task_state_key_routing"

    def init_continual(self) -> None:
        self.task_states: list[dict[str, torch.Tensor]] = []
        self.router = TaskRouter(max_keys=None)
        self.pending_key: torch.Tensor | None = None
        self.task_open = False
        self.last_routed_tasks: torch.Tensor | None = None
        self._initial_state = self.trainable_state()

    # ----------------------------------------------------------------- state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of everything DFM trains (and the FMN's buffers), by name."""
        out = {}
        for name in _TRAINABLE:
            for key, val in getattr(self.model, name).state_dict().items():
                out[f"{name}.{key}"] = val.detach().clone()
        return out

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in _TRAINABLE:
            sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            getattr(self.model, name).load_state_dict(sub)

    # ----------------------------------------------------------------- task hooks
    def begin_task(self, task_id: int, categories: list[str]) -> None:
        self.task_open = True
        self.rebuilt_round = -1  # a new trainer per task: its rounds count from 0
        if task_id > 0 or self.task_states:
            self.load_trainable_state(self._initial_state)  # fresh adapters, empty memory
            self.pending_key = None

    def end_task(self, task_id: int, categories: list[str]) -> None:
        if self.pending_key is None:
            raise TrainingError(f"DFM: task {task_id} ({categories}) has no task key: its memory was never "
                                "initialised (did training run?)")
        self.task_states.append({k: v.cpu() for k, v in self.trainable_state().items()})
        self.router.add_task(self.pending_key.cpu())
        self.pending_key = None
        self.task_open = False

    # ----------------------------------------------------------------- routing
    @property
    def routing(self) -> bool:
        return not self.task_open and len(self.task_states) >= 2

    @torch.no_grad()
    def route(self, images: torch.Tensor) -> torch.Tensor:
        """Task index (B,) of each image: argmin over tasks of the mean nearest-key distance."""
        return self.router.route(self.model.key_features(images).float())

    def anomaly_output(self, images: torch.Tensor) -> AnomalyOutput:
        if images.dtype == torch.uint8:  # raw pixels (data.device_normalize): normalised once, here
            images = self.model_input(images)
        if not self.routing:
            return super().anomaly_output(images)
        tasks = self.route(images)
        self.last_routed_tasks = tasks
        current = self.trainable_state()
        maps = scores = None
        try:
            for t in torch.unique(tasks).tolist():
                sel = tasks == t
                self.load_trainable_state(self.task_states[t])
                out = super().anomaly_output(images[sel])
                if maps is None:
                    maps = out.anomaly_map.new_zeros((images.shape[0], *out.anomaly_map.shape[1:]))
                    scores = out.pred_score.new_zeros(images.shape[0])
                maps[sel], scores[sel] = out.anomaly_map, out.pred_score
        finally:
            self.load_trainable_state(current)
        return AnomalyOutput(maps, scores)

    # ----------------------------------------------------------------- checkpoint
    def get_extra_state(self):
        return {
            "task_states": [{k: v.cpu() for k, v in s.items()} for s in self.task_states],
            "router": self.router.state_dict(),
            "pending_key": None if self.pending_key is None else self.pending_key.cpu(),
            "task_open": self.task_open,
            "memory_builds": self.memory_builds,
            "rebuilt_round": self.rebuilt_round,
        }

    def set_extra_state(self, state) -> None:
        state = state or {}
        self.task_states = list(state.get("task_states", []))
        if "router" in state:
            self.router.load_state_dict(state["router"])
        self.pending_key = state.get("pending_key")
        self.task_open = bool(state.get("task_open", False))
        self.memory_builds = int(state.get("memory_builds", self.memory_builds))
        self.rebuilt_round = int(state.get("rebuilt_round", -1))
