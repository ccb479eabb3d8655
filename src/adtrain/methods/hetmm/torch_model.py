"""HETMM (Chen et al., IJCV 2024): training-free template matching with ATMM and PTS.

Templates are the channel-L2-normalised backbone features of normal images, stored per layer
as a buffer (N,C,h,w). New normals can be appended at any time (hot update); `compress(K)`
replaces the set by the K-sheet PTS tiny set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adtrain.backbones.extractor import layer_names
from adtrain.errors import AdtrainError, ConfigError, DataError
from adtrain.methods.hetmm.atmm import atmm_mutual
from adtrain.methods.hetmm.pts import BACKENDS, POSITIONS, pts_select
from adtrain.methods.output import AnomalyOutput

# Per-layer mode of the 15 MVTec AD category settings in the official configs/MVTec_AD.yaml.
DEFAULT_FORWARD_WINDOWS = (13, 9, 7)
DEFAULT_BACKWARD_WINDOWS = (3, 5, 3)
DEFAULT_ALPHAS = (0.5, 0.7, 0.3)
DEFAULT_LAMBDAS = (1.0, 0.5, 0.3)
MATCH_KEYS = ("forward_windows", "backward_windows", "alphas", "lambdas")
#: where the features are taken: before the stage's final ReLU (the official code) or after it (timm's features_only)
FEATURE_TAPS = ("pre_relu", "post_relu")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(key: str, name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ConfigError(key, f"must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def load_category_params(path: str | Path, category: str) -> dict[str, list]:
    """The per-category matching overrides (forward_windows, backward_windows, alphas, lambdas)
    from a categories.yaml; {} when the category is not listed."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "HETMM per-category parameter file not found")
    table = yaml.safe_load(path.read_text()) or {}
    if not isinstance(table, Mapping):
        raise DataError(path, "expected a mapping category -> parameters")
    entry = table.get(category) or {}
    unknown = set(entry) - set(MATCH_KEYS)
    if unknown:
        raise DataError(path, f"category '{category}': unknown keys {sorted(unknown)}")
    return {k: list(v) for k, v in entry.items()}


class HetmmModel(nn.Module):
    """Frozen backbone + template set; eval forward -> AnomalyOutput.

    Defaults (WRN101-2 layers 1-3 in the paper) are the per-layer most common values of the 15
    MVTec AD settings in the official repository (configs/MVTec_AD.yaml): windows forward
    13/9/7, backward 3/5/3, alpha 0.5/0.7/0.3 (layer-1 alphas are a three-way 5/5/5 tie, 0.5
    is the middle), lambda 1/0.5/0.3. Per-category values: adtrain/methods/hetmm/hetmm_categories.yaml
    via `set_match_params(**load_category_params(path, category))`.

    S = sum_j lambda_j [alpha_j S_f^j + (1 - alpha_j) S_b^j], each layer's map upsampled to the
    input size (bilinear, align_corners=True; the combination is linear, so it is done before
    the upsampling); image score = max of the map. Layers with lambda 0 are skipped.
    templates: "all" keeps every sheet; an int K marks the model for `compress()` (PTS).
    template_dtype: storage of the templates ("float16" halves memory); compute_dtype: dtype of
    the ATMM dot products (default: promoted dtype of query and templates).
    feature_tap: "pre_relu" (the official code: each ResNet stage's output before its last block's
    final ReLU, signed; the next stage still gets the ReLU'd tensor) or "post_relu" (timm's stage
    outputs, >= 0). Backbones whose stages end without an activation (EfficientNet-Lite, ViT): the same.
    It is applied to the extractor (a FeatureExtractor; another module is used as it is).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any] | None = None,
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        forward_windows: Sequence[int] = DEFAULT_FORWARD_WINDOWS,
        backward_windows: Sequence[int] = DEFAULT_BACKWARD_WINDOWS,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        templates: int | str = "all",
        chunk_size: int = 64,
        image_score: str = "max",
        template_dtype: str = "float32",
        compute_dtype: str | None = None,
        pts_positions: str = "per_position",
        optics_backend: str = "torch",
        feature_tap: str = "pre_relu",
        extractor: nn.Module | None = None,
    ):
        super().__init__()
        self.layers = layer_names(layers)
        if not self.layers:
            raise ConfigError("method.layers", "at least one layer is needed")
        bad_k = isinstance(templates, bool) or not isinstance(templates, int) or templates < 1
        if templates != "all" and bad_k:
            raise ConfigError("method.templates", f"must be 'all' or a positive int K, got {templates!r}")
        if image_score != "max":
            raise ConfigError("method.image_score", f"only 'max' is supported, got {image_score!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError("method.chunk_size", f"must be a positive int, got {chunk_size!r}")
        self.template_size = templates
        self.chunk_size = chunk_size
        self.image_score = image_score
        self.template_dtype = _dtype("method.template_dtype", template_dtype)
        self.compute_dtype = _dtype("method.compute_dtype", compute_dtype)
        # used only to compress the templates (templates=K), checked whatever templates is: a typo stays no secret
        for key, value, allowed in (("pts_positions", pts_positions, POSITIONS), ("optics_backend", optics_backend, BACKENDS)):
            if value not in allowed:
                raise ConfigError(f"method.{key}", f"must be one of {allowed}, got {value!r}")
        self.pts_positions = pts_positions
        self.optics_backend = optics_backend
        self.set_match_params(forward_windows, backward_windows, alphas, lambdas)
        if feature_tap not in FEATURE_TAPS:
            raise ConfigError("method.feature_tap", f"must be one of {', '.join(FEATURE_TAPS)}, got {feature_tap!r}")
        if extractor is None:
            if backbone is None:
                raise ConfigError("method.backbone", "a backbone config (or an extractor) is required")
            from adtrain.backbones import build_extractor

            extractor = build_extractor(backbone, self.layers, frozen=True, pre_activation=feature_tap == "pre_relu")
        self.extractor = extractor
        self.set_feature_tap(feature_tap)
        for p in self.extractor.parameters():
            p.requires_grad_(False)
        for name in self.layers:
            self.register_buffer(self._key(name), torch.empty(0, dtype=self.template_dtype))
        self.register_buffer("compressed", torch.tensor(False))
        self._pending: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}

    # ------------------------------------------------------------------ parameters
    @staticmethod
    def _key(layer: str) -> str:
        return f"templates_{layer}"

    def set_match_params(
        self,
        forward_windows: Sequence[int] | None = None,
        backward_windows: Sequence[int] | None = None,
        alphas: Sequence[float] | None = None,
        lambdas: Sequence[float] | None = None,
    ) -> None:
        """Replace the matching parameters (e.g. per-category overrides); None keeps a value."""
        new = {
            "forward_windows": forward_windows, "backward_windows": backward_windows,
            "alphas": alphas, "lambdas": lambdas,
        }
        for key, value in new.items():
            if value is None:
                continue
            value = list(value)
            if len(value) != len(self.layers):
                raise ConfigError(f"method.{key}", f"needs one value per layer of method.layers {self.layers}, got "
                                  f"{value} (method.forward_windows, backward_windows, alphas and lambdas each "
                                  "give one per layer)")
            if key.endswith("windows"):
                if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % 2 == 0 for w in value):
                    raise ConfigError(f"method.{key}", f"windows must be odd positive ints, got {value}")
            elif key == "alphas" and any(not 0.0 <= float(a) <= 1.0 for a in value):
                raise ConfigError("method.alphas", f"must lie in [0, 1], got {value}")
            elif key == "lambdas" and (any(float(v) < 0.0 for v in value) or not any(float(v) > 0.0 for v in value)):
                raise ConfigError("method.lambdas", f"must be >= 0 with at least one > 0 (all 0: every score is 0), "
                                  f"got {value}")
            cast = int if key.endswith("windows") else float
            setattr(self, key, [cast(v) for v in value])

    def set_feature_tap(self, feature_tap: str) -> None:
        """Take the features before or after the stages' final ReLU (templates and queries must agree:
        only change it on a model without templates, or to match loaded ones)."""
        if feature_tap not in FEATURE_TAPS:
            raise ConfigError("method.feature_tap", f"must be one of {', '.join(FEATURE_TAPS)}, got {feature_tap!r}")
        if hasattr(self.extractor, "set_pre_activation"):
            self.extractor.set_pre_activation(feature_tap == "pre_relu")
        self.feature_tap = feature_tap

    # ------------------------------------------------------------------ templates
    def _flush(self) -> None:
        for name in getattr(self, "_pending", {}):
            parts = self._pending[name]
            if not parts:
                continue
            current = getattr(self, self._key(name))
            if current.numel():
                parts = [current] + parts
            setattr(self, self._key(name), torch.cat(parts, dim=0))
            self._pending[name] = []

    def template_set(self, layer: str) -> torch.Tensor:
        """The stored templates of one layer, (N,C,h,w)."""
        self._flush()
        return getattr(self, self._key(layer))

    @property
    def num_templates(self) -> int:
        t = self.template_set(self.layers[0])
        return int(t.shape[0]) if t.dim() == 4 else 0

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Channel-L2-normalised features {layer: (B,C,h,w)}."""
        feats = self.extractor(images)
        missing = [n for n in self.layers if n not in feats]
        if missing:
            raise ConfigError("method.layers", f"the backbone returned no {missing} (got {sorted(feats)})")
        return {n: F.normalize(feats[n], dim=1) for n in self.layers}

    @torch.no_grad()
    def add_template_features(self, feats: Mapping[str, torch.Tensor]) -> None:
        """Append already normalised features {layer: (B,C,h,w)}; shapes must match the set."""
        for name in self.layers:
            f = feats[name].detach().to(self.template_dtype)
            stored = self._pending[name][0] if self._pending[name] else getattr(self, self._key(name))
            if stored.dim() == 4 and stored.shape[1:] != f.shape[1:]:
                raise AdtrainError(
                    f"HETMM templates of {name} have shape {tuple(stored.shape[1:])}, new ones "
                    f"{tuple(f.shape[1:])}: all template images must share one size (data.image_size)"
                )
            self._pending[name].append(f.to(stored.device) if stored.numel() else f)

    @torch.no_grad()
    def add_templates(self, images: torch.Tensor) -> None:
        """Hot update: append the features of normal images (B,3,H,W) to the template set."""
        self.add_template_features(self.extract(images))

    def reset_templates(self) -> None:
        for name in self.layers:
            setattr(self, self._key(name), getattr(self, self._key(name)).new_empty(0))
            self._pending[name] = []
        self.compressed.fill_(False)

    @torch.no_grad()
    def compress(self, k: int | None = None) -> dict[str, torch.Tensor]:
        """PTS: replace each layer's set by its K-sheet tiny set (K defaults to `templates`).
        Returns the per-layer indices (K,h,w) of the kept sheets. N <= K keeps all N."""
        k = self.template_size if k is None else k
        if k == "all":
            raise ConfigError("method.templates", "compress() needs K (templates is 'all')")
        if self.num_templates == 0:
            raise AdtrainError("HETMM has no templates to compress: add normal images first")
        indices = {}
        for name in self.layers:
            res = pts_select(
                self.template_set(name), int(k),
                pts_positions=self.pts_positions, optics_backend=self.optics_backend,
            )
            setattr(self, self._key(name), res.templates.contiguous())
            indices[name] = res.indices
        self.compressed.fill_(True)
        return indices

    # ------------------------------------------------------------------ state dict
    def _apply(self, fn, *args, **kwargs):
        self._flush()  # pending sheets follow .to(device) / .half()
        return super()._apply(fn, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the stored set may hold any number N of sheets: resize before the copy
        for name in self.layers:
            key = prefix + self._key(name)
            if key in state_dict:
                current = getattr(self, self._key(name))
                shape = state_dict[key].shape
                setattr(self, self._key(name), torch.empty(shape, dtype=current.dtype, device=current.device))
                self._pending[name] = []
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.num_templates == 0:  # before the extractor runs
            raise AdtrainError("HETMM has no templates: fit on normal images (add_templates) first")
        return self.output_from(self.extract(images), images.shape[-2:])

    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The query features (the templates are per task): one pass serves every task's set."""
        return self.extract(images)

    @torch.no_grad()
    def output_from(self, query: dict[str, torch.Tensor], size) -> AnomalyOutput:
        """Eval output from ``frozen_features``, with maps of ``size``: what ``forward`` gives."""
        if self.num_templates == 0:
            raise AdtrainError("HETMM has no templates: fit on normal images (add_templates) first")
        size = tuple(size)
        b = next(iter(query.values())).shape[0]
        device = next(iter(query.values())).device
        total = None
        for j, name in enumerate(self.layers):
            lam, alpha = self.lambdas[j], self.alphas[j]
            if lam == 0.0:
                continue
            q, t = query[name], self.template_set(name)
            if q.shape[1:] != t.shape[1:]:
                raise AdtrainError(
                    f"HETMM {name}: query features {tuple(q.shape[1:])} differ from the templates "
                    f"{tuple(t.shape[1:])}: test images must have the template images' size"
                )
            s_f, s_b = atmm_mutual(
                q, t, self.forward_windows[j], self.backward_windows[j],
                chunk_size=self.chunk_size, compute_dtype=self.compute_dtype,
            )
            s = lam * (alpha * s_f + (1.0 - alpha) * s_b)
            up = F.interpolate(s.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
            total = up if total is None else total + up
        if total is None:
            total = torch.zeros(b, 1, *size, device=device)
        return AnomalyOutput(total, total.flatten(1).amax(dim=1))
