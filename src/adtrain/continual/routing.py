"""Task-agnostic inference: pick which task's memory to use for a test image, without labels.

Two rules, both pure torch and device-agnostic (keys follow the query's device and dtype):

- Key routing (UCAD, Liu et al. AAAI 2024): each task stores a small set of key features
  (e.g. patch features of its training images). For a test image with patch features
  q_1..q_P and task t with keys K_t: d_t = (1/P) sum_p min_{k in K_t} ||q_p - k||_2;
  the image goes to argmin_t d_t.
- Score routing ("nearest bank"): score the image against every task's bank and keep the task
  whose bank gives the lowest image anomaly score (`select_by_score`).
"""

from __future__ import annotations

import torch

from adtrain.errors import AdtrainError


class TaskRouter:
    """Per-task key sets and the UCAD nearest-key rule. Checkpointable via state_dict()."""

    def __init__(self, max_keys: int | None = None, seed: int = 0, chunk: int = 4096) -> None:
        self.max_keys = max_keys
        self.seed = seed
        self.chunk = chunk
        self.keys: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.keys)

    def add_task(self, features: torch.Tensor) -> int:
        """Store the keys of a new task: (N, D) features, or (B, P, D) / (B, D, H, W) flattened.

        With max_keys set, a seeded random subset of max_keys rows is kept. Returns the task index.
        """
        keys = flatten_patches(features).detach()
        if keys.shape[0] == 0:
            raise AdtrainError("TaskRouter.add_task: no key features given")
        if self.keys and keys.shape[1] != self.keys[0].shape[1]:
            raise AdtrainError(f"TaskRouter.add_task: key dimension {keys.shape[1]} differs from the "
                               f"earlier tasks' {self.keys[0].shape[1]}")
        if self.max_keys is not None and keys.shape[0] > self.max_keys:
            gen = torch.Generator().manual_seed(self.seed + len(self.keys))
            pick = torch.randperm(keys.shape[0], generator=gen)[: self.max_keys].to(keys.device)
            keys = keys[pick]
        self.keys.append(keys.clone())
        return len(self.keys) - 1

    @torch.no_grad()
    def task_distances(self, query: torch.Tensor) -> torch.Tensor:
        """(B, T): per image, the mean over its patches of the distance to the task's nearest key.

        query: (B, P, D) patch features, (B, D, H, W) feature maps, or (B, D) (one patch each).
        """
        if not self.keys:
            raise AdtrainError("TaskRouter has no tasks: call add_task first")
        q = _as_patches(query)
        b, p, d = q.shape
        flat = q.reshape(b * p, d).float()
        out = torch.empty(b, len(self.keys), device=q.device)
        for t, keys in enumerate(self.keys):
            k = keys.to(device=q.device, dtype=torch.float32)
            nearest = torch.cat([torch.cdist(flat[s:s + self.chunk], k).min(dim=1).values
                                 for s in range(0, flat.shape[0], self.chunk)])
            out[:, t] = nearest.view(b, p).mean(dim=1)
        return out

    def route(self, query: torch.Tensor) -> torch.Tensor:
        """Task index (B,) int64 for each image: argmin_t of task_distances."""
        return self.task_distances(query).argmin(dim=1)

    @staticmethod
    def select_by_score(scores_per_task: torch.Tensor) -> torch.Tensor:
        """(T, B) image scores of each image against each task's bank -> (B,) argmin over tasks."""
        if scores_per_task.dim() != 2 or scores_per_task.shape[0] == 0:
            raise AdtrainError(f"select_by_score expects (T, B) scores, got shape {tuple(scores_per_task.shape)}")
        return scores_per_task.argmin(dim=0)

    def state_dict(self) -> dict:
        return {"keys": [k.cpu() for k in self.keys], "max_keys": self.max_keys, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.keys = [torch.as_tensor(k) for k in state["keys"]]
        self.max_keys = state.get("max_keys", self.max_keys)
        self.seed = state.get("seed", self.seed)


def _as_patches(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    raise AdtrainError(f"TaskRouter: expected features of 2 to 4 dimensions, got shape {tuple(x.shape)}")


def flatten_patches(x: torch.Tensor) -> torch.Tensor:
    """(N, D) rows from (N, D), (B, P, D) or (B, D, H, W) features."""
    if x.dim() == 2:
        return x
    p = _as_patches(x)
    return p.reshape(-1, p.shape[-1])


def select_by_score(scores_per_task: torch.Tensor) -> torch.Tensor:
    """Module-level alias of TaskRouter.select_by_score."""
    return TaskRouter.select_by_score(scores_per_task)
