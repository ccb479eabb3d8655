"""DFM in continual schedules: per-task state and UCAD's nearest-key task routing.

Each finished task keeps its own trainable state (adapters, CFA descriptor, FMN memory and
modulate layers) and a task key: a greedy coreset (num_keys items) of the frozen backbone's
aggregated features of its training normals, taken at the memory initialisation (adapters are
still the identity there). A test image goes to the task whose keys are nearest on average over
its patches (adtrain.continual.routing.TaskRouter) and is scored with that task's state. Every task
starts from the initial (untrained) state, so training task t cannot change tasks < t.

Per-task calibration (``task_score_norm=normal``, design: the paper does not say how scores of
different task states are made comparable): each task's states give raw distances on their own
scale (a trained memory gives lower ones), and one test set mixes images routed to different
states. Routed scores and maps are therefore expressed in units of the task's own held-out
normals: (x - median) / (1.4826 * MAD) of the image scores its selected state gave them when the
task's threshold was fitted. The run's threshold then lives in those units too (the mean over
tasks of each task's calibrated threshold; the normal median is 0). ``none``: raw scores.

Routing (``task_routing``): ``keys`` (UCAD's rule, the paper's) as above; ``score`` (design, the
per-task memory methods' rule): every image is scored by every task's state and keeps its lowest
score, in the units above (calibrated or raw). It costs one pass per task at test time
(docs/methods/dfm.md has the measurement).
"""

from __future__ import annotations

import math

import torch

from adtrain.continual.routing import TaskRouter, select_by_score
from adtrain.errors import ConfigError, TrainingError
from adtrain.methods.chunks import cpu_chunks
from adtrain.methods.output import AnomalyOutput, concat

_TRAINABLE = ("adapters", "head", "fmn")
TASK_SCORE_NORMS = ("normal", "none")
TASK_ROUTINGS = ("keys", "score")


class DfmContinualMixin:
    continual_behaviour = "dfm_per_task_state_key_routing"

    def init_continual(self, task_score_norm: str = "normal", task_routing: str = "keys") -> None:
        if task_score_norm not in TASK_SCORE_NORMS:
            raise ConfigError("method.task_score_norm", f"must be one of {TASK_SCORE_NORMS}, got {task_score_norm!r}")
        if task_routing not in TASK_ROUTINGS:
            raise ConfigError("method.task_routing", f"must be one of {TASK_ROUTINGS}, got {task_routing!r}")
        self.task_score_norm = task_score_norm
        self.task_routing = task_routing
        self.task_calibration: list[dict[str, float] | None] = []  # per finished task (None: no held-out normals)
        self.normal_scores: torch.Tensor | None = None  # set by fit_threshold
        self.task_states: list[dict[str, torch.Tensor]] = []
        self.router = TaskRouter(max_keys=None)
        self.pending_key: torch.Tensor | None = None
        self.task_open = False
        self.last_routed_tasks: torch.Tensor | None = None
        self._initial_state = self.trainable_state()
        #: validation outputs kept for the routed validation (a CNN's validation cache, embed_cache.py):
        #: the open task's validated states by cache pass, and each finished task's kept pass
        self.val_states: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.val_outputs: dict[int, list[int]] = {}
        self.val_output_hits = 0

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
        self.val_states = []
        self.normal_scores = None  # this task's threshold fit sets them
        self.rebuilt_round = -1  # a new trainer per task: its rounds count from 0
        if task_id > 0 or self.task_states:
            self.load_trainable_state(self._initial_state)  # fresh adapters, empty memory
            self.pending_key = None

    def end_task(self, task_id: int, categories: list[str]) -> None:
        if self.pending_key is None:
            raise TrainingError(f"DFM: task {task_id} ({categories}) has no task key: its memory was never "
                                "initialised (did training run?)")
        self.task_states.append({k: v.cpu() for k, v in self.trainable_state().items()})
        self._keep_validation_outputs(task_id, self.task_states[-1])
        self.task_calibration.append(self.normal_calibration())
        self.router.add_task(self.pending_key.cpu())
        self.pending_key = None
        self.task_open = False
        if self.routing and self.calibrated:
            self._calibrated_threshold()

    def _keep_validation_outputs(self, task_id: int, state: dict[str, torch.Tensor]) -> None:
        """The validation outputs of the pass that validated the kept state (compared exactly) stay for
        the routed validation; the other candidates' go."""
        self.val_outputs[task_id] = [gen for gen, st in self.val_states if st.keys() == state.keys()
                                     and all(torch.equal(v.cpu(), state[k]) for k, v in st.items())]
        self.val_states = []
        live = {gen for gens in self.val_outputs.values() for gen in gens}
        self.val_cache.drop(lambda key: len(key) != 3 or key[1] != "output" or key[2] in live)

    # ----------------------------------------------------------------- calibration
    def normal_calibration(self) -> dict[str, float] | None:
        """The current task's held-out normal scores as (center, scale), with its threshold and map center."""
        s = self.normal_scores
        if s is None or s.numel() < 2:
            return None
        center = float(torch.quantile(s.double(), 0.5))  # the median (torch's .median() is the lower middle value)
        scale = 1.4826 * float(torch.quantile((s.double() - center).abs(), 0.5))
        if not scale > 0:
            scale = float(s.std())
        if not scale > 0:
            return None
        return {"center": center, "scale": scale, "threshold": float(self.threshold),
                "map_center": float(self.map_center), "pixel_threshold": float(self.pixel_threshold)}

    @property
    def calibrated(self) -> bool:
        """Routed scores in units of each task's held-out normals (every finished task has them)."""
        return (self.task_score_norm == "normal" and len(self.task_calibration) == len(self.task_states)
                and all(c is not None for c in self.task_calibration))

    @property
    def decides_per_task(self) -> bool:
        """Calibrated routed scores are decided against the tasks' own thresholds, averaged in their units."""
        return self.calibrated

    @torch.no_grad()
    def _calibrated_threshold(self) -> None:
        """Threshold, pixel threshold and display centres in calibrated units: each task's, averaged
        over tasks. The routed maps are in those units too, so a task's raw pixel threshold (the last
        task's, left by its fit) would decide them on another scale; a task calibrated without one
        (a checkpoint from before 2026-12-07) leaves the model without pixel decisions."""
        cal = self.task_calibration

        def mean(key):
            return sum((c[key] - c["center"]) / c["scale"] for c in cal) / len(cal)

        self.threshold.fill_(mean("threshold"))
        self.score_center.fill_(0.0)
        self.map_center.fill_(mean("map_center"))
        pixel = [c.get("pixel_threshold", float("nan")) for c in cal]
        self.pixel_threshold.fill_(mean("pixel_threshold") if all(math.isfinite(p) for p in pixel) else float("nan"))

    def calibrated_threshold_info(self) -> dict | None:
        """What decides the routed model's images and pixels after the last end_task (results.json's
        final threshold figures), None where the tasks' own thresholds stand (no calibration)."""
        if not (self.routing and self.calibrated):
            return None
        pixel = float(self.pixel_threshold)
        return {"threshold": float(self.threshold), "normal_score_median": float(self.score_center),
                "pixel_threshold": pixel if math.isfinite(pixel) else None,
                "threshold_units": "task_normals",
                "threshold_tasks": list(range(len(self.task_calibration)))}

    # ----------------------------------------------------------------- routing
    @property
    def routing(self) -> bool:
        return not self.task_open and len(self.task_states) >= 2

    @torch.no_grad()
    def route(self, images: torch.Tensor) -> torch.Tensor:
        """Task index (B,) of each image: argmin over tasks of the mean nearest-key distance."""
        return self.router.route(self.model.key_features(images).float())

    def _in_units(self, t: int, out: AnomalyOutput, calibrated: bool) -> AnomalyOutput:
        if not calibrated:
            return out
        c = self.task_calibration[t]
        return AnomalyOutput((out.anomaly_map - c["center"]) / c["scale"], (out.pred_score - c["center"]) / c["scale"])

    def _task_output(self, t: int, images: torch.Tensor, calibrated: bool) -> AnomalyOutput:
        """Task t's state on ``images`` (its state loaded by the caller), in routed units."""
        self.load_trainable_state(self.task_states[t])
        return self._in_units(t, super().anomaly_output(images), calibrated)

    def anomaly_output(self, images: torch.Tensor) -> AnomalyOutput:
        if images.dtype == torch.uint8:  # raw pixels (data.device_normalize): normalised once, here
            images = self.model_input(images)
        if not self.routing:
            return super().anomaly_output(images)
        current = self.trainable_state()
        try:
            if self.model.adapters.inside:  # ViT: the adapters act inside the backbone's blocks
                return self._routed_per_state(images, self.calibrated)
            return self._routed_shared(images, self.calibrated)
        finally:
            self.load_trainable_state(current)

    def _pick(self, outs: list[AnomalyOutput]) -> AnomalyOutput:
        """Lowest-score routing: each image keeps the output of the state that scores it lowest."""
        scores = torch.stack([o.pred_score for o in outs])
        best = select_by_score(scores)
        rows = torch.arange(scores.shape[1], device=best.device)
        self.last_routed_tasks = best
        return AnomalyOutput(torch.stack([o.anomaly_map for o in outs])[best, rows], scores[best, rows])

    def _routed_per_state(self, images: torch.Tensor, calibrated: bool) -> AnomalyOutput:
        """Each state runs the whole model (backbone included) on its images."""
        if self.task_routing == "score":  # every task's state; the lowest score wins
            return self._pick([self._task_output(t, images, calibrated) for t in range(len(self.task_states))])
        return self._by_key(self.route(images), lambda t, sel: self._task_output(t, images[sel], calibrated))

    def _by_key(self, tasks: torch.Tensor, output) -> AnomalyOutput:
        """Key routing: each image gets the output of its routed task, ``output(t, rows)`` for the
        images (a boolean row mask) routed to task t."""
        self.last_routed_tasks = tasks
        maps = scores = None
        for t in torch.unique(tasks).tolist():
            sel = tasks == t
            out = output(t, sel)
            if maps is None:
                maps = out.anomaly_map.new_zeros((tasks.shape[0], *out.anomaly_map.shape[1:]))
                scores = out.pred_score.new_zeros(tasks.shape[0])
            maps[sel], scores[sel] = out.anomaly_map, out.pred_score
        return AnomalyOutput(maps, scores)

    @torch.no_grad()
    def _routed_shared(self, images: torch.Tensor, calibrated: bool) -> AnomalyOutput:
        """CNN backbones: the frozen extractor runs once per chunk of images, and the routing keys
        and every task state read its features (a state's adapters act after the extractor):
        one backbone pass per image instead of one for the keys and one per state scored."""
        m, size = self.model, images.shape[-2:]
        parts = cpu_chunks(images, self.cpu_chunk_pixels)
        key = self.val_cache.key(images, parts) if self.caching_validation() else None
        feats = self.cached_features(images, parts, key)  # validation: reused from the tasks' own passes
        feats = [m.extract(images[p]) for p in parts] if feats is None else feats

        def state_output(t: int, rows: torch.Tensor | None = None) -> AnomalyOutput:
            kept = None if key is None else next(
                (o for o in (self.val_cache.lookup((key, "output", g)) for g in self.val_outputs.get(t, ()))
                 if o is not None), None)
            if kept is not None:  # validated under this very state in its task's own pass
                self.val_output_hits += 1
                out = kept if rows is None else AnomalyOutput(kept.anomaly_map[rows], kept.pred_score[rows])
                return self._in_units(t, out, calibrated)
            self.load_trainable_state(self.task_states[t])
            outs = []
            for p, f in zip(parts, feats):
                sel = None if rows is None else rows[p]
                if sel is not None and not bool(sel.any()):
                    continue
                outs.append(m.output_from(f if sel is None else {k: v[sel] for k, v in f.items()}, size))
            return self._in_units(t, concat(outs), calibrated)

        if self.task_routing == "score":
            return self._pick([state_output(t) for t in range(len(self.task_states))])
        return self._by_key(torch.cat([self.router.route(m.aggregate(f, adapt=False).float()) for f in feats]),
                            state_output)

    # ----------------------------------------------------------------- checkpoint
    def get_extra_state(self):
        return {
            "task_states": [{k: v.cpu() for k, v in s.items()} for s in self.task_states],
            "router": self.router.state_dict(),
            "task_calibration": list(self.task_calibration),
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
        self.task_calibration = list(state.get("task_calibration", []))  # older checkpoints: raw scores
        self.pending_key = state.get("pending_key")
        self.task_open = bool(state.get("task_open", False))
        self.memory_builds = int(state.get("memory_builds", self.memory_builds))
        self.rebuilt_round = int(state.get("rebuilt_round", -1))
