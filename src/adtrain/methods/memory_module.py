"""The Lightning side of memory-bank / template methods (PatchCore, CFA's bank, HETMM).

One pass over the training data feeds the bank (`collect`), `finalize` builds it once the
pass is done. Continual schedules: `continual=per_task` keeps one bank per task and routes
each test image to the task whose bank gives it the lowest image score (the "nearest bank":
a normal image of task i lies close to bank i); `continual=shared` keeps one bank that every
task adds to.
"""

from __future__ import annotations

import math

import torch

from adtrain import distributed
from adtrain.errors import ConfigError
from adtrain.methods.base import AnomalyModule
from adtrain.methods.chunks import cpu_chunks
from adtrain.methods.output import AnomalyOutput, concat

CONTINUAL_CHOICES = ("per_task", "shared")


class TaskMemoryMixin:
    """Per-task memories for continual schedules (see the module docstring). A method
    provides memory_state / load_memory_state / reset_memory; `continual` picks the rule."""

    def _init_task_memory(self, continual: str) -> None:
        if continual not in CONTINUAL_CHOICES:
            raise ConfigError("method.continual", f"must be one of {CONTINUAL_CHOICES}, got {continual!r}")
        self.continual = continual
        self.continual_behaviour = f"memory_{continual}"
        self.task_memories: list[dict[str, torch.Tensor]] = []
        #: per finished task (per_task): its (threshold, score centre, map centre), fitted on its own
        #: held-out normals; a routed image is decided with its task's (adtrain.methods.calibration)
        self.task_calibration: list[torch.Tensor] = []
        self.routed_calibration: torch.Tensor | None = None
        self.task_open = False  # between begin_task and end_task: the memory being built is the one scored

    @property
    def decides_per_task(self) -> bool:
        return self.continual == "per_task"

    def reset_memory(self) -> None:
        raise NotImplementedError

    def memory_state(self) -> dict[str, torch.Tensor]:
        """The tensors that make up the current memory."""
        raise NotImplementedError

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def begin_task(self, task_id: int, categories: list[str]) -> None:
        self.task_open = True
        if self.continual == "per_task" and task_id > 0:
            self.reset_memory()

    def end_task(self, task_id: int, categories: list[str]) -> None:
        state = {k: v.detach().clone() for k, v in self.memory_state().items()}
        calibration = torch.stack([self.threshold, self.score_center, self.map_center]).detach().float().cpu()
        if self.continual == "per_task":
            self.task_memories.append(state)
            self.task_calibration.append(calibration)
        else:
            self.task_memories = [state]
            self.task_calibration = [calibration]
        self.task_open = False

    def anomaly_output(self, images: torch.Tensor) -> AnomalyOutput:
        if images.dtype == torch.uint8:  # raw pixels (data.device_normalize): normalised once, here
            images = self.model_input(images)
        # while a task is trained, validated and thresholded its own (current) memory is scored:
        # routing among the finished tasks' memories would never score the model being trained
        self.routed_calibration = None
        if self.task_open or len(self.task_memories) <= 1:
            return super().anomaly_output(images)
        current = {k: v.detach().clone() for k, v in self.memory_state().items()}
        shared = self._frozen_passes(images)
        outs = []
        try:
            for state in self.task_memories:
                self.load_memory_state({k: v.to(images.device) for k, v in state.items()})
                outs.append(super().anomaly_output(images) if shared is None else concat([self.model.output_from(f, images.shape[-2:]) for f in shared]))
        finally:
            self.load_memory_state(current)
        scores = torch.stack([o.pred_score for o in outs])  # (T,B)
        task = scores.argmin(dim=0)  # the nearest memory: the one giving the lowest score
        self.last_routed_tasks = task
        if len(self.task_calibration) == len(self.task_memories):  # checkpoints made before: the module's
            self.routed_calibration = torch.stack(self.task_calibration).to(scores.device)[task]
        b = torch.arange(images.shape[0], device=scores.device)
        maps = torch.stack([o.anomaly_map for o in outs])  # (T,B,1,H,W)
        return AnomalyOutput(maps[task, b], scores[task, b])

    def _frozen_passes(self, images: torch.Tensor) -> list | None:
        """The memory-independent features of each chunk of ``images`` (the chunks of
        ``AnomalyModule.anomaly_output``), computed once for every task's memory; None when the
        model cannot split its forward (``frozen_features`` / ``output_from``)."""
        model = self.model
        if not (hasattr(model, "frozen_features") and hasattr(model, "output_from")):
            return None
        return [model.frozen_features(images[p]) for p in cpu_chunks(images, getattr(self, "cpu_chunk_pixels", 0))]

    # task memories travel inside the state dict
    def get_extra_state(self):
        return {"task_memories": [{k: v.cpu() for k, v in s.items()} for s in self.task_memories],
                "task_calibration": [c.cpu() for c in self.task_calibration], "task_open": self.task_open}

    def set_extra_state(self, state) -> None:
        self.task_memories = list((state or {}).get("task_memories", []))
        self.task_calibration = list((state or {}).get("task_calibration", []))
        self.task_open = bool((state or {}).get("task_open", False))


class MemoryModule(TaskMemoryMixin, AnomalyModule):
    """One pass over the training data feeds the memory (`collect`); `finalize` builds it."""

    training_free = True

    def __init__(self, continual: str = "per_task") -> None:
        super().__init__()
        self._init_task_memory(continual)
        self.automatic_optimization = False
        self._ready = False
        self._gathered: set[int] = set()

    def collect(self, images: torch.Tensor) -> None:
        raise NotImplementedError

    def finalize(self) -> None:
        """Build the bank from what `collect` gathered (coreset, compression...)."""
        raise NotImplementedError

    def configure_optimizers(self):
        return None

    def on_train_epoch_start(self) -> None:
        self._ready = False
        self._gathered = set()  # DDP: the indices collected this pass (padding repeats are skipped)

    def check_collect_room(self, batches: int) -> None:
        """After the pass's first batch: refuse a pass of ``batches`` such batches that the host
        memory cannot hold (a method whose collection grows with the data set overrides it)."""

    def training_step(self, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():  # under DDP every rank collects every rank's batch: one identical bank
            for part in distributed.gather_batch(batch, self._gathered):
                self.collect(part["image"])
        batches = self.trainer.num_training_batches if self._trainer is not None else None
        if batch_idx == 0 and batches is not None and math.isfinite(batches):
            self.check_collect_room(int(batches))
        return None

    def _ensure_ready(self) -> None:
        if not self._ready and self.trainer is not None and self.trainer.state.fn == "fit":
            self.finalize()
            self._ready = True

    def on_validation_epoch_start(self) -> None:  # validation runs before on_train_epoch_end
        self._ensure_ready()

    def on_train_epoch_end(self) -> None:
        self._ensure_ready()
