"""adtrain: training and evaluating industrial visual anomaly detectors.

The Python API (adtrain.api), imported on first use so `import adtrain` stays fast:
`compose(overrides)` -> config, `fit(cfg, run_dir)` -> Run, `test(run_dir, overrides)` -> figures,
`Run.open(run_dir)` reads a finished run.
"""

__version__ = "0.1.0"

#: public name -> the module that defines it (loaded on first access)
_LAZY = {
    "compose": "adtrain.api",
    "fit": "adtrain.api",
    "test": "adtrain.api",
    "Run": "adtrain.api",
    "QUICKSTART": "adtrain.api",
    "Detector": "adtrain.inference.detector",
    "Prediction": "adtrain.inference.detector",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adtrain' has no attribute {name!r}")
