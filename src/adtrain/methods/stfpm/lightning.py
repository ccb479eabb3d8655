"""STFPM as a LightningModule: SGD on the student, selection on held-out normals."""

from __future__ import annotations

import logging

import torch
from torch.optim.swa_utils import update_bn

from adtrain.errors import ConfigError
from adtrain.methods.base import AnomalyModule
from adtrain.methods.stfpm.torch_model import LOSS_REDUCTIONS, StfpmModel, stfpm_loss

log = logging.getLogger("adtrain")


class Stfpm(AnomalyModule):
    def __init__(
        self,
        backbone: dict,
        layers=("layer1", "layer2", "layer3"),
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        loss_reduction: str = "official",
        recalibrate_bn: bool = False,
        model: StfpmModel | None = None,
    ) -> None:
        super().__init__()
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError("method.loss_reduction", f"must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        self.model = model if model is not None else StfpmModel(backbone, layers)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.loss_reduction = loss_reduction
        self.recalibrate_bn = bool(recalibrate_bn)
        self._bn_epoch: int | None = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        teacher, student = self.model(batch["image"])
        loss = stfpm_loss(teacher, student, self.loss_reduction)
        self.check_finite(loss)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    # ------------------------------------------------- batch-norm statistics of the student
    def recalibrate_student_bn(self) -> bool:
        """Recompute the student's batch-norm running statistics for its current weights: one
        forward pass over the training normals (eval transform, fixed order) in train mode with a
        cumulative average (torch's ``swa_utils.update_bn``). At lr 0.4 the weights move faster
        than the running averages (momentum 0.1) follow, so the eval-mode student is otherwise a
        seed-dependent blend of recent weights (docs/methods/stfpm.md). The global RNG is forked,
        so the training that follows draws exactly what it would have drawn without this pass."""
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None or not hasattr(dm, "make_dataloader") or not getattr(dm, "train_samples", None):
            return False
        loader = dm.make_dataloader(dm.train_samples, train=False)
        with torch.random.fork_rng(devices=[]):
            update_bn((self.model_input(b["image"]) for b in loader), self.model.student)
        return True

    def _recalibrate_once(self) -> None:
        if not self.recalibrate_bn or self._bn_epoch == self.current_epoch:
            return
        if self._trainer is None or self.trainer.sanity_checking:
            return
        if self.recalibrate_student_bn():
            self._bn_epoch = self.current_epoch
        elif self._bn_epoch is None:  # say it once: the option asked for cannot act here
            self._bn_epoch = -1
            log.warning("method.recalibrate_bn: the trainer has no data module with training samples; "
                        "the student keeps its running batch-norm averages")

    def on_validation_epoch_start(self) -> None:  # validation runs before on_train_epoch_end
        if self.trainer.state.fn == "fit":
            self._recalibrate_once()

    def on_train_epoch_end(self) -> None:  # before ModelCheckpoint saves the epoch's state
        self._recalibrate_once()

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.model.student.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
