"""python -m adtrain [overrides]: one run or a multirun sweep (-m), composed by Hydra."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from adtrain.errors import AdtrainError

log = logging.getLogger("adtrain")


def config_dir() -> str:
    """conf/ of the checkout (editable install), or $ADTRAIN_CONFIG_DIR."""
    env = os.environ.get("ADTRAIN_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "config.yaml").exists():
        sys.exit(f"adtrain: error: no config.yaml in {path}; set ADTRAIN_CONFIG_DIR to the conf/ folder")
    return str(path)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        return False


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from adtrain.io import write_text
    from adtrain.run import run, run_dir_from_hydra

    try:
        results = run(cfg)
    except AdtrainError as err:
        log.error("%s", err)
        write_text(run_dir_from_hydra() / "error.txt", f"{type(err).__name__}: {err}\n")
        if _is_multirun():  # one failed job does not stop the sweep
            return None
        print(f"adtrain: error: {err}", file=sys.stderr)
        sys.exit(2)
    return results.get("image_auroc") if isinstance(results, dict) else None


if __name__ == "__main__":
    main()
