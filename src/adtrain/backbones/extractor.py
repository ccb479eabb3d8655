"""timm feature extractor with named stages; only the stages needed are built and run."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from adtrain.backbones.loading import load_into
from adtrain.backbones.weights import resolve_weights
from adtrain.errors import ConfigError

log = logging.getLogger("adtrain")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("cnn", "vit")


def _prune_after(model: nn.Module, module_path: str) -> None:
    """Drop the children of nn.Sequential containers that come after ``module_path``."""
    parent = model
    for part in module_path.split("."):
        if isinstance(parent, nn.Sequential) and part.isdigit():
            del parent[int(part) + 1 :]
        parent = getattr(parent, part)


def _vit_convert(state: dict, model: nn.Module) -> dict:
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state, model)


def layer_names(layers: Any) -> list[str]:
    """method.layers as a list of stage names: a bare name (method.layers=layer2) or a stage named twice
    is refused, naming the key."""
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ConfigError("method.layers", f"must be a list of stage names, e.g. [{layers}], got {layers!r}")
    names = [str(layer) for layer in layers]
    if len(set(names)) != len(names):
        raise ConfigError("method.layers", f"names a stage twice: {names}")
    return names


class FeatureExtractor(nn.Module):
    """Backbone returning ``{layer: (B,C,H/stride,W/stride)}`` for the requested layers.

    Input: an ImageNet-normalised batch (the batch contract). When the weights expect other
    statistics (``mean``/``std``, e.g. 0.5/0.5 for TF EfficientNet-Lite and ViT), the input is
    converted to them first.

    ``pre_activation=True``: each requested CNN stage is returned before its last block's final
    activation (signed values; HETMM's official taps), the rest of the network unchanged
    (adtrain.backbones.preact). Stages without a final activation (EfficientNet-Lite, ConvNeXt)
    and ViTs are unaffected. ``set_pre_activation`` switches it later.
    """

    def __init__(
        self,
        name: str,
        stages: Mapping[str, int],
        layers: Sequence[str],
        pretrained: bool = True,
        weights: str | None = None,
        kind: str = "cnn",
        frozen: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = True,
        role: str = "backbone",
        fuse_batchnorm: bool = True,
        pre_activation: bool = False,
        **timm_kwargs: Any,
    ):
        super().__init__()
        import timm

        self.name, self.kind, self.frozen = name, kind, frozen
        self.layers = layer_names(layers)
        stages = {str(k): int(v) for k, v in dict(stages).items()}
        if kind not in KINDS:
            raise ConfigError("backbone.kind", f"'{kind}' is not one of {KINDS}")
        if not self.layers:
            raise ConfigError("method.layers", "no backbone layer requested")
        unknown = [layer for layer in self.layers if layer not in stages]
        if unknown:  # the method asks for them; the backbone config names what exists
            raise ConfigError(
                "method.layers", f"{unknown} not among backbone.stages of '{name}' ({list(stages)}); "
                "choose among them, or name the stage in backbone.stages"
            )
        self._index = {layer: stages[layer] for layer in self.layers}
        self.timm_kwargs = dict(timm_kwargs)  # what else shaped the network (e.g. output_stride): the feature cache's key
        self._indices = sorted(set(self._index.values()))
        try:
            if kind == "cnn":
                self.model = timm.create_model(
                    name, pretrained=False, features_only=True, out_indices=self._indices,
                    **timm_kwargs,
                )
            else:
                self.model = timm.create_model(name, pretrained=False, **timm_kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ConfigError("backbone.name", f"unknown timm model '{name}'") from exc
            raise
        except (IndexError, AssertionError) as exc:
            raise ConfigError(
                "backbone.stages", f"out_indices {self._indices} invalid for '{name}': {exc}"
            ) from exc
        info = self._truncate()
        self.channels = {layer: int(info[i]["num_chs"]) for layer, i in self._index.items()}
        self.strides = {layer: int(info[i]["reduction"]) for layer, i in self._index.items()}
        self._set_normalisation(mean, std)
        self._stage_info = {i: info[i] for i in self._indices}
        self._taps: list = []  # adtrain.backbones.preact.Tap records; not submodules
        self.pre_activation = False
        self.set_pre_activation(pre_activation)

        self.weights_source = "random-init"
        if pretrained:
            cfg = getattr(self.model, "pretrained_cfg", None)
            state, source = resolve_weights(name, cfg, weights)
            n = load_into(self.model, state, source, _vit_convert if kind == "vit" else None)
            self.weights_source = source
            log.info("%s %s: %d pretrained tensors loaded from %s%s", role, name, n, source,
                     " (frozen)" if frozen else "")
        elif role == "student":
            log.info("student %s: random init, trained to match the teacher", name)
        else:
            log.info("%s %s: random init (pretrained=false)", role, name)
        self._use_channels_last(channels_last)
        self.fuse_batchnorm = bool(fuse_batchnorm) and kind == "cnn"
        self._fused: dict = {}  # {"key": ..., "model": folded copy or None}; not a submodule
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def _truncate(self) -> dict[int, dict]:
        """Remove what follows the last needed stage; return feature info by index."""
        if self.kind == "vit":
            n_blocks = len(self.model.blocks)
            bad = [i for i in self._indices if not 0 <= i < n_blocks]
            if bad:
                raise ConfigError("backbone.stages", f"block indices {bad} outside 0..{n_blocks - 1}")
            self.model.prune_intermediate_layers(self._indices, prune_norm=True, prune_head=True)
            return {i: self.model.feature_info[i] for i in self._indices}
        info = self.model.feature_info
        dicts = info.get_dicts()  # only the selected out_indices, in order
        by_index = dict(zip(info.out_indices, dicts))
        _prune_after(self.model, by_index[max(self._indices)]["module"])
        return by_index

    def set_pre_activation(self, enabled: bool) -> None:
        """Return the stages before (True) or after (False) their final activation."""
        from adtrain.backbones import preact

        enabled = bool(enabled)
        if enabled == self.pre_activation:
            return
        if self.kind == "vit":
            log.debug("%s: a ViT's blocks end in no activation: the pre-activation tap changes nothing", self.name)
        elif enabled:
            self._taps = preact.tap_before_activation(self.model, self._stage_info, self.name)
        else:
            preact.untap(self.model, self._taps)
            self._taps = []
        self.pre_activation = enabled
        self._fused = {}  # a folded copy of the other network must not be reused

    def _set_normalisation(self, mean, std) -> None:
        """x_backbone = x * scale + shift, converting from ImageNet statistics."""
        self._renorm = mean is not None and std is not None and (
            tuple(float(v) for v in mean) != IMAGENET_MEAN
            or tuple(float(v) for v in std) != IMAGENET_STD
        )
        if not self._renorm:
            return
        m_in, s_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        m, s = torch.tensor([float(v) for v in mean]), torch.tensor([float(v) for v in std])
        self.register_buffer("_scale", (s_in / s).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", ((m_in - m) / s).view(1, 3, 1, 1), persistent=False)

    def _use_channels_last(self, enabled: bool) -> None:
        """NHWC convolutions: the same numbers, several times faster on CPU (and with AMP on
        GPU). Outputs are handed back contiguous (NCHW) so downstream code is unaffected."""
        self.channels_last = bool(enabled) and self.kind == "cnn"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """A frozen extractor stays in eval mode (batch-norm statistics fixed)."""
        return super().train(False if self.frozen else mode)

    feature_cache = None  # adtrain.backbones.feature_cache.FeatureCache (feature_cache=on; frozen only)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.feature_cache is not None and self.frozen and not x.requires_grad:
            return self.feature_cache(self, x)
        return self.extract(x)

    def extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The backbone's features for x (forward without the feature cache)."""
        if self._renorm:
            x = x * self._scale.to(x.dtype) + self._shift.to(x.dtype)
        if self.kind == "vit":
            feats = self.model.forward_intermediates(
                x, indices=self._indices, norm=False, output_fmt="NCHW", intermediates_only=True
            )
        else:
            model = self._inference_model(x)
            if self.channels_last:
                feats = [f.contiguous() for f in model(x.contiguous(memory_format=torch.channels_last))]
            else:
                feats = model(x)
        by_index = dict(zip(self._indices, feats))
        return {layer: by_index[self._index[layer]] for layer in self.layers}

    def _inference_model(self, x: torch.Tensor) -> nn.Module:
        """The timm model, or its batch-norm-folded copy (adtrain.backbones.fuse) for an extractor
        in eval mode without gradients (a frozen one, or a trained one being evaluated: STFPM's
        student at validation and test); the copy is rebuilt when the weights, device
        or dtype change (e.g. a checkpoint loaded into the extractor). On the CPU the copy's TF
        "same" convolutions skip their padded input copy (adtrain.backbones.same_pad, bit-identical)."""
        if not (self.fuse_batchnorm and not self.training and not torch.is_grad_enabled()
                and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()):
            return self.model
        from adtrain.memory.bank import tensor_version

        tensors = list(self.model.parameters()) + list(self.model.buffers())
        key = (x.device, tuple((t.data_ptr(), tensor_version(t), t.dtype) for t in tensors))
        if self._fused.get("key") != key:
            from adtrain.backbones.fuse import fold_batchnorm

            example = x[:1].detach()
            with torch.autocast(x.device.type, enabled=False):
                if self.channels_last:
                    example = example.float().contiguous(memory_format=torch.channels_last)
                fused, count = fold_batchnorm(self.model, example.float())
            if fused is not None:
                log.debug("%s: %d batch norms folded into their convolutions", self.name, count)
                if x.device.type == "cpu":  # one copy of the input less per TF-padded conv (bit-identical)
                    from adtrain.backbones.same_pad import use_strip_padding

                    use_strip_padding(fused)
            self._fused = {"key": key, "model": fused, "count": count}
        return self._fused["model"] or self.model

    def extra_repr(self) -> str:
        tap = ", pre_activation=True" if self.pre_activation else ""
        return f"name={self.name}, layers={self.layers}, weights={self.weights_source}{tap}"


def build_extractor(
    backbone_cfg: Mapping[str, Any],
    layers: Sequence[str],
    pretrained: bool | None = None,
    frozen: bool = False,
    role: str = "backbone",
    pre_activation: bool = False,
) -> FeatureExtractor:
    """FeatureExtractor from a ``backbone`` config node (name, kind, pretrained, weights,
    stages, mean, std, optional timm_kwargs). ``pretrained=None`` uses the config's value; ``role`` names it in the log (teacher, student).
    ``pre_activation``: stages before their final activation (a method's choice, e.g. HETMM's ``method.feature_tap``)."""
    cfg = _to_dict(backbone_cfg)
    if not cfg.get("name"):
        raise ConfigError("backbone.name", "missing")
    if not cfg.get("stages"):
        raise ConfigError("backbone.stages", "missing")
    return FeatureExtractor(
        name=cfg["name"],
        stages=cfg["stages"],
        layers=list(layers),
        pretrained=bool(cfg.get("pretrained", True)) if pretrained is None else pretrained,
        weights=cfg.get("weights"),
        kind=cfg.get("kind", "cnn"),
        frozen=frozen,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        channels_last=bool(cfg.get("channels_last", True)),
        role=role,
        fuse_batchnorm=bool(cfg.get("fuse_batchnorm", True)),
        pre_activation=pre_activation,
        **(cfg.get("timm_kwargs") or {}),
    )


def _to_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)
