"""adtrain: training and evaluating industrial visual anomaly detectors."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`adtrain.Detector` (imported on first use: `import adtrain` stays light)."""
    if name in ("Detector", "Prediction"):
        from adtrain.inference import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'adtrain' has no attribute {name!r}")
