from adtrain.methods.cfa.lightning import Cfa
from adtrain.methods.cfa.torch_model import CfaModel

__all__ = ["Cfa", "CfaModel"]
