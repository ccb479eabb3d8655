from adtrain.methods.patchcore.lightning import Patchcore
from adtrain.methods.patchcore.torch_model import PatchcoreModel

__all__ = ["Patchcore", "PatchcoreModel"]
