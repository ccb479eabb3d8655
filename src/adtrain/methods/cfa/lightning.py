"""CFA as a LightningModule: memory from the untrained descriptor, then AdamW on the descriptor."""

from __future__ import annotations

import torch

from adtrain.methods.base import AnomalyModule
from adtrain.methods.cfa.torch_model import CfaModel
from adtrain.methods.memory_module import TaskMemoryMixin


class Cfa(TaskMemoryMixin, AnomalyModule):
    """Before the first epoch the memory bank C is the running mean of the (still random)
    descriptor over the training set (k-means if gamma_c > 1); C stays fixed afterwards."""

    def __init__(
        self,
        backbone: dict,
        layers=("layer1", "layer2", "layer3"),
        gamma_d: int = 1,
        gamma_c: int = 1,
        num_nearest: int = 3,
        num_hard_negatives: int = 3,
        nu: float = 1e-3,
        alpha: float = 0.1,
        radius: float = 1e-5,
        learn_radius: bool = True,
        pool_size: int = 3,
        blur_sigma: float = 4.0,
        blur_mode: str = "reflect",
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        amsgrad: bool = True,
        memory: dict | None = None,
        seed: int = 0,
        continual: str = "per_task",
        model: CfaModel | None = None,
    ) -> None:
        super().__init__()
        self._init_task_memory(continual)
        self.lr, self.weight_decay, self.amsgrad = lr, weight_decay, amsgrad
        self.model = model if model is not None else CfaModel(
            backbone, layers, gamma_d=gamma_d, gamma_c=gamma_c, num_nearest=num_nearest,
            num_hard_negatives=num_hard_negatives, nu=nu, alpha=alpha, radius=radius,
            learn_radius=learn_radius, pool_size=pool_size, blur_sigma=blur_sigma, blur_mode=blur_mode, memory=memory, seed=seed,
        )

    #: the memory of the untrained descriptor already detects anomalies: a selection candidate
    start_is_detector: bool = True

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate":  # the untrained start, validated before training
            self.on_train_start()

    def on_train_start(self) -> None:
        if len(self.model.memory) > 0:  # resumed, validated start, or a later continual task: keep C
            return
        from tqdm import tqdm

        dm = self.trainer.datamodule
        # the training batch size, whatever the eval batch: C is an equal-weight mean of batch means
        loader = dm.make_dataloader(dm.train_samples, train=False, batch_size=dm.batch_size)
        was_training = self.model.training
        self.model.eval()
        for batch in tqdm(loader, desc="CFA memory init", unit="batch", disable=not self.trainer.progress_bar_callback):
            self.model.update_memory_mean(self.model_input(batch["image"]))
        self.model.finalize_memory()
        self.model.train(was_training)

    # continual: a task's memory is its bank with the descriptor and radius that match it
    def reset_memory(self) -> None:
        self.model.memory.bank = self.model.memory.bank.new_empty(0, 0)

    def memory_state(self) -> dict[str, torch.Tensor]:
        state = {f"descriptor.{k}": v for k, v in self.model.descriptor.state_dict().items()}
        return {**state, "bank": self.model.memory.bank, "radius": self.model.radius.detach()}

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.descriptor.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("descriptor.")})
        self.model.memory.set_bank(state["bank"])
        with torch.no_grad():
            self.model.radius.copy_(state["radius"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.model.loss(batch["image"])
        self.check_finite(losses["loss"])
        bs = batch["image"].shape[0]
        self.log("train/loss", losses["loss"], on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train/att", losses["att"], on_step=False, on_epoch=True, batch_size=bs)
        self.log("train/rep", losses["rep"], on_step=False, on_epoch=True, batch_size=bs)
        self.log("train/radius", self.model.radius.detach().float(), on_step=False, on_epoch=True, batch_size=bs)
        return losses["loss"]

    def configure_optimizers(self):
        params = [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("extractor.")]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, amsgrad=self.amsgrad)
