"""Lightning's DDP strategy, made to give the single-process answer (docs/ARCHITECTURE.md, "Distributed").

- A module with no trainable parameter (PatchCore, HETMM; CFA/DFM while frozen) is not wrapped in
  DistributedDataParallel (which refuses it): its ranks agree by construction (adtrain.distributed).
- A method that trains parameter subsets per stage (DFM) sets ``ddp_find_unused_parameters = True``.
- Only the script launcher (``strategy=ddp``) is accepted: ddp_spawn/fork/notebook would run the fit in
  child processes whose selected state, threshold and results never reach the process that writes the run.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy

from adtrain.errors import ConfigError

#: Lightning's DDP strategy names this one stands for ("ddp" and its find_unused_parameters variants)
SCRIPT_NAMES = ("ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true")
REFUSED_PREFIXES = ("ddp_spawn", "ddp_fork", "ddp_notebook")


class AdtrainDDPStrategy(DDPStrategy):
    """DDPStrategy (script launcher) that leaves parameter-free modules unwrapped."""

    def __init__(self, *args, start_method: str = "popen", **kwargs) -> None:
        if start_method != "popen":
            raise ConfigError("trainer.strategy", refusal(f"start_method={start_method}"))
        super().__init__(*args, start_method="popen", **kwargs)

    def configure_ddp(self) -> None:
        module = self.lightning_module
        if not any(p.requires_grad for p in module.parameters()):
            return  # nothing to synchronise: every rank holds the same frozen weights
        if getattr(module, "ddp_find_unused_parameters", False):
            self._ddp_kwargs["find_unused_parameters"] = True
        super().configure_ddp()


def refusal(name: str) -> str:
    return (f"{name} is not supported: the fit would run in spawned/forked processes whose selected state, "
            "threshold and results never reach the process that writes the run directory; use trainer=ddp "
            "(trainer.strategy=ddp, the script launcher) instead")


def resolve(strategy):
    """trainer.strategy -> what the Trainer gets: Lightning's DDP names become AdtrainDDPStrategy,
    spawn/fork/notebook ones are refused, anything else is passed on."""
    if isinstance(strategy, str):
        if strategy.startswith(REFUSED_PREFIXES):
            raise ConfigError("trainer.strategy", refusal(strategy))
        if strategy in SCRIPT_NAMES:
            fup = strategy.endswith("_true")
            return AdtrainDDPStrategy(find_unused_parameters=fup) if fup else AdtrainDDPStrategy()
    return strategy
