from adtrain.methods.stfpm.lightning import Stfpm
from adtrain.methods.stfpm.torch_model import StfpmModel

__all__ = ["Stfpm", "StfpmModel"]
