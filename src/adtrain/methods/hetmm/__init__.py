"""HETMM: training-free template matching (ATMM) with PTS template compression."""

from adtrain.methods.hetmm.atmm import atmm_backward, atmm_forward, atmm_mutual, atmm_naive
from adtrain.methods.hetmm.pts import PTSResult, optics_labels, pts_compress, pts_select
from adtrain.methods.hetmm.torch_model import HetmmModel, load_category_params

__all__ = [
    "HetmmModel",
    "load_category_params",
    "atmm_forward",
    "atmm_backward",
    "atmm_mutual",
    "atmm_naive",
    "pts_select",
    "pts_compress",
    "optics_labels",
    "PTSResult",
]

from adtrain.methods.hetmm.lightning import Hetmm  # noqa: E402

__all__.append("Hetmm")
