"""PatchCore as a LightningModule: one pass collecting patch features, then a greedy coreset."""

from __future__ import annotations

import torch

from adtrain import distributed
from adtrain.inference.detector import resolve_device
from adtrain.methods.memory_module import MemoryModule
from adtrain.methods.patchcore.torch_model import PatchcoreModel


class Patchcore(MemoryModule):
    def __init__(
        self,
        backbone: dict,
        layers=("layer2", "layer3"),
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        pool_size: int = 3,
        projection_dim: int = 128,
        blur_sigma: float = 4.0,
        blur_mode: str = "reflect",
        embed_dims: list[int] | None = None,
        squared_scores: bool = False,
        memory: dict | None = None,
        coreset_device: str = "auto",
        seed: int = 0,
        continual: str = "per_task",
        model: PatchcoreModel | None = None,
    ) -> None:
        super().__init__(continual=continual)
        resolve_device(str(coreset_device), "method.coreset_device", available=False)  # its GPU: when used
        self.coreset_device = str(coreset_device)
        self.model = model if model is not None else PatchcoreModel(
            backbone, layers, coreset_ratio=coreset_ratio, num_neighbors=num_neighbors, pool_size=pool_size,
            projection_dim=projection_dim, memory=memory, blur_sigma=blur_sigma, seed=seed, blur_mode=blur_mode,
            embed_dims=embed_dims, squared_scores=squared_scores,
        )

    def collect(self, images: torch.Tensor) -> None:
        self.model.add_batch(images)

    def check_collect_room(self, batches: int) -> None:
        """Every training patch is held as fp32 until the coreset: refuse now a pass that will not fit."""
        model = self.model
        mem = model.memory
        proj = model.projection_dim if model.coreset_ratio < 1.0 else 0
        ranks_here = int(getattr(self.trainer, "num_devices", 1) or 1) if distributed.world_size() > 1 else 1
        mem.check_room(mem.num_added * batches, proj, "method.memory.max_features", "method.memory.ram_check",
                       copies=ranks_here)  # DDP: every rank on this machine holds the whole collection

    def finalize(self) -> None:
        """Coreset on the training device (GPU when training on one), then, for a shared bank
        in a continual schedule, the earlier tasks' items are kept alongside."""
        previous = self.model.memory.bank.clone() if (self.continual == "shared" and len(self.model.memory) > 0) else None
        dev = (self.device if self.coreset_device == "auto"
               else resolve_device(self.coreset_device, "method.coreset_device"))
        self.model.build(device=dev)
        mem = self.model.memory
        if previous is not None and previous.shape[1] == mem.dim:
            mem.set_bank(torch.cat([previous.to(mem.bank.device), mem.bank]))

    def reset_memory(self) -> None:
        self.model.memory.reset()

    def memory_state(self) -> dict[str, torch.Tensor]:
        return {"bank": self.model.memory.bank}

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.memory.set_bank(state["bank"])
