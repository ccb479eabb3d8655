"""DFM (Wu et al., CVPR 2025): differentiable feature matching; docs/methods/dfm.md."""

from adtrain.methods.dfm.fmn import FeatureMatchingNetwork, distance_volume, modulated_candidates
from adtrain.methods.dfm.lightning import Dfm
from adtrain.methods.dfm.torch_model import DfmModel

__all__ = ["Dfm", "DfmModel", "FeatureMatchingNetwork", "distance_volume", "modulated_candidates"]
