"""STFPM as a LightningModule: SGD on the student, selection on held-out normals."""

from __future__ import annotations

import logging

import torch
from torch.optim.swa_utils import update_bn

from adtrain.errors import ConfigError
from adtrain.methods.base import AnomalyModule
from adtrain.methods.stfpm.torch_model import LOSS_REDUCTIONS, STUDENT_INITS, StfpmModel, stfpm_loss

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
        average_weights: int = 0,
        student_init: str = "torchvision",
        model: StfpmModel | None = None,
    ) -> None:
        super().__init__()
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError("method.loss_reduction", f"must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if student_init not in STUDENT_INITS:
            raise ConfigError("method.student_init", f"must be one of {STUDENT_INITS}, got {student_init!r}")
        self.model = model if model is not None else StfpmModel(backbone, layers, student_init=student_init)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.loss_reduction = loss_reduction
        self.recalibrate_bn = bool(recalibrate_bn)
        self._bn_epoch: int | None = None
        if not isinstance(average_weights, int) or isinstance(average_weights, bool) or average_weights < 0:
            raise ConfigError("method.average_weights", f"must be a whole number of final epochs >= 0, got {average_weights!r}")
        self.average_weights = average_weights
        self._average: dict[str, torch.Tensor] | None = None  # running mean of the student's weights
        self._average_steps = 0
        self._average_applied = False

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        teacher, student = self.model(batch["image"])
        loss = stfpm_loss(teacher, student, self.loss_reduction)
        self.check_finite(loss)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    # ------------------------------------------------- weight averaging (method.average_weights)
    def _averaging(self) -> bool:
        """Inside the last ``average_weights`` epochs of the run."""
        max_epochs = getattr(self.trainer, "max_epochs", None) if self._trainer is not None else None
        return bool(self.average_weights) and max_epochs is not None and max_epochs > 0 \
            and self.current_epoch >= max_epochs - self.average_weights

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: p for k, p in self.model.student.named_parameters()}

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if not self._averaging():
            return
        self._average_steps += 1
        if self._average is None:
            self._average = {k: p.detach().clone() for k, p in self._weights().items()}
            return
        for k, p in self._weights().items():  # cumulative mean, as torch.optim.swa_utils
            self._average[k].add_(p.detach() - self._average[k], alpha=1.0 / self._average_steps)

    @torch.no_grad()
    def _apply_average(self) -> None:
        """At the end of the last epoch: the student takes the averaged weights (stochastic weight
        averaging, Izmailov et al. 2018, at the constant learning rate) and its batch norms are
        recomputed for them (an average of weights has no running statistics of its own)."""
        if self._average_applied or self._average is None or self.trainer.sanity_checking:
            return
        if self.current_epoch != self.trainer.max_epochs - 1:
            return
        for k, p in self._weights().items():
            p.copy_(self._average[k])
        self._average_applied = True
        if not self.recalibrate_student_bn():
            log.warning("method.average_weights: the trainer has no data module with training samples; the "
                        "averaged student keeps the running batch-norm averages of its last weights")
        self._bn_epoch = self.current_epoch

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
            self._apply_average()
            self._recalibrate_once()

    def on_train_epoch_end(self) -> None:  # before ModelCheckpoint saves the epoch's state
        self._apply_average()
        self._recalibrate_once()

    def begin_task(self, task_id: int, categories: list[str]) -> None:
        """A continual task trains under a new trainer whose epochs count from 0 again."""
        super().begin_task(task_id, categories)
        self._bn_epoch, self._average, self._average_steps, self._average_applied = None, None, 0, False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._average is not None and not self._average_applied:  # saved inside the averaging window: a resume keeps the mean
            checkpoint["stfpm_weight_average"] = {"steps": self._average_steps,
                                                  "mean": {k: v.cpu() for k, v in self._average.items()}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("stfpm_weight_average")
        if saved:
            dev = next(self.model.student.parameters()).device
            self._average = {k: v.to(dev) for k, v in saved["mean"].items()}
            self._average_steps = int(saved["steps"])

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.model.student.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
