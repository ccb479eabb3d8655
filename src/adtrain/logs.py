"""Log output a person reads: adtrain's own lines, each once; library noise at DEBUG or gone.

`quiet()` (called by the CLI, `adtrain.fit` and the benchmark) lowers to DEBUG what says nothing
about the run: FAISS's loader trying CPU builds it does not have (eight ModuleNotFoundError
lines), Lightning's device banner and product tips, and Lightning's second copy of every INFO
line (its own handler beside Hydra's). Warnings about what adtrain does on purpose are dropped:
frozen backbones left in eval mode, logging intervals longer than a tiny data set, a
deprecation inside Lightning. "configure_optimizers returned None" is silenced only around the
fit of a training-free method (adtrain.engine).
"""

from __future__ import annotations

import logging
import warnings

#: loggers whose INFO lines are noise for a run's reader (set to WARNING)
NOISY = ("faiss.loader", "faiss", "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
         "lightning.pytorch.accelerators.cuda")
#: warnings about what adtrain does deliberately
DELIBERATE = (
    r".*module\(s\) in eval mode at the start of training",  # frozen backbones / teachers
    r".*smaller than the logging interval",
    r".*isinstance\(treespec, LeafSpec\)",
    r"Using `DistributedSampler` with the dataloaders",  # DDP: adtrain.distributed drops its repeats
    r"You have overridden `on_after_batch_transfer` in `LightningModule`",  # the method normalises on the device
)
NO_OPTIMIZER = r".*configure_optimizers` returned `None`"


def quiet() -> None:
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    if logging.getLogger().handlers:  # Hydra's (or the user's) root handler prints each line once
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
            logger.propagate = True
    for pattern in DELIBERATE:
        warnings.filterwarnings("ignore", message=pattern)


def show_progress_lines() -> None:
    """Outside Hydra (a notebook, a script): adtrain's INFO lines printed, once, without a timestamp."""
    logger = logging.getLogger("adtrain")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[adtrain] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
