"""adtrain: training and evaluating industrial visual anomaly detectors."""

__version__ = "0.1.0"
