"""HETMM as a LightningModule: "fit" = one pass collecting templates (+ PTS compression)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from adtrain.methods.hetmm.torch_model import MATCH_KEYS, HetmmModel, load_category_params
from adtrain.methods.memory_module import MemoryModule

log = logging.getLogger("adtrain")


def _params_path(name: str | None) -> Path | None:
    if not name:
        return None
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parent / name  # shipped beside this module (package data)
    return path


class Hetmm(MemoryModule):
    def __init__(
        self,
        backbone: dict,
        layers=("layer1", "layer2", "layer3"),
        forward_windows=None,
        backward_windows=None,
        alphas=None,
        lambdas=None,
        templates: int | str = "all",
        category_params: str | None = "hetmm_categories.yaml",
        chunk_size: int = 64,
        template_dtype: str = "float32",
        compute_dtype: str | None = None,
        pts_positions: str = "per_position",
        optics_backend: str = "torch",
        feature_tap: str = "pre_relu",
        continual: str = "shared",
        model: HetmmModel | None = None,
    ) -> None:
        super().__init__(continual=continual)
        explicit = dict(forward_windows=forward_windows, backward_windows=backward_windows, alphas=alphas, lambdas=lambdas)
        self.explicit_params = {k: v for k, v in explicit.items() if v is not None}
        self.category_params = _params_path(category_params)
        self.model = model if model is not None else HetmmModel(
            backbone, layers, templates=templates, chunk_size=chunk_size, template_dtype=template_dtype,
            compute_dtype=compute_dtype, pts_positions=pts_positions, optics_backend=optics_backend,
            feature_tap=feature_tap, **self.explicit_params,
        )

    def apply_category(self, categories) -> dict:
        """The official per-category matching values (explicit method.* values win); categories None:
        none (data that is not MVTec AD, whose categories the official table is for)."""
        cats = [] if categories is None else [categories] if isinstance(categories, str) else list(categories)
        params = load_category_params(self.category_params, cats[0]) if self.category_params and len(cats) == 1 else {}
        params.update(self.explicit_params)
        self.model.set_match_params(**params)
        return params

    def get_extra_state(self):  # the matching values and the features' tap travel with the checkpoint
        return {**super().get_extra_state(), "match_params": {k: getattr(self.model, k) for k in MATCH_KEYS},
                "feature_tap": self.model.feature_tap}

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        if (state or {}).get("match_params"):
            self.model.set_match_params(**state["match_params"])
        if state and "match_params" in state:
            # the queries must be taken where the stored templates were; a checkpoint written before
            # method.feature_tap existed holds post-ReLU templates
            tap = state.get("feature_tap", "post_relu")
            if tap != self.model.feature_tap:
                log.info("hetmm: the checkpoint's templates are %s features (method.feature_tap=%s ignored)%s", tap,
                         self.model.feature_tap, "" if "feature_tap" in state else "; it predates the option")
                self.model.set_feature_tap(tap)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:  # the official table is MVTec AD's: Real-IAD's "zipper" is another object
            self.apply_category(dm.category if getattr(dm, "dataset_name", None) == "MVTec AD" else None)

    def collect(self, images: torch.Tensor) -> None:
        self.model.add_templates(images)

    def finalize(self) -> None:
        """PTS when a tiny set is asked for and the set is larger than K (also after a shared
        continual task appended new templates to an earlier tiny set)."""
        k = self.model.template_size
        if k != "all" and (not bool(self.model.compressed) or self.model.num_templates > int(k)):
            self.model.compress()

    def reset_memory(self) -> None:
        self.model.reset_templates()

    def memory_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if k.startswith("templates_") or k == "compressed"}

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            setattr(self.model, k, v)

    @torch.no_grad()
    def add_normal_images(self, images: torch.Tensor, recompress: bool = False) -> int:
        """Hot update (no training): append normal images to the template set."""
        self.model.add_templates(images.to(self.device))
        if recompress:
            self.model.compressed.fill_(False)
            self.finalize()
        return self.model.num_templates
