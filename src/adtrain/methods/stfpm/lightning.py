"""STFPM as a LightningModule: SGD on the student, selection on held-out normals."""

from __future__ import annotations

import torch

from adtrain.errors import ConfigError
from adtrain.methods.base import AnomalyModule
from adtrain.methods.stfpm.torch_model import LOSS_REDUCTIONS, StfpmModel, stfpm_loss


class Stfpm(AnomalyModule):
    def __init__(
        self,
        backbone: dict,
        layers=("layer1", "layer2", "layer3"),
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        loss_reduction: str = "official",
        model: StfpmModel | None = None,
    ) -> None:
        super().__init__()
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError("method.loss_reduction", f"must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        self.model = model if model is not None else StfpmModel(backbone, layers)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.loss_reduction = loss_reduction

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        teacher, student = self.model(batch["image"])
        loss = stfpm_loss(teacher, student, self.loss_reduction)
        self.check_finite(loss)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.model.student.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
