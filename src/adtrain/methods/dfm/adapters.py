"""Identity-initialised adapters on a frozen backbone.

An adapter is residual with a zero-initialised map: A(x) = x + W x + b, W = 0, b = 0 at init,
so A is *exactly* the identity at init on every device and precision (x + 0 == x; an
identity-initialised conv would not be exact under TF32 or bf16). Same function class as an
identity-initialised linear layer (I + W).

* CNN backbones: a 1x1 conv per chosen layer, applied to that layer's output (before the host's
  local aggregation).
* ViT backbones (``kind: vit``): a token-wise linear adapter inserted after each chosen block,
  inside the backbone, so later blocks see the adapted tokens (the paper: CLIP ViT-B/16, features
  of block 6, adapters on blocks 5 and 6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from adtrain.errors import ConfigError


class ResidualConv1x1(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class ResidualLinear(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


class AdaptedBlock(nn.Module):
    """A frozen transformer block followed by a token adapter (bypassed when ``enabled`` is False)."""

    def __init__(self, block: nn.Module, adapter: nn.Module):
        super().__init__()
        self.block = block
        self.adapter = adapter
        self.enabled = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.block(x, *args, **kwargs)
        return self.adapter(y) if self.enabled else y


class Adapters(nn.Module):
    """The adapters of one extractor. ``inside`` (ViT): they live in the backbone's blocks and act
    during the extractor's forward; otherwise ``forward(feats)`` adapts the layer outputs."""

    def __init__(self, conv: Mapping[str, nn.Module] | None = None, blocks: Sequence[AdaptedBlock] = ()):
        super().__init__()
        self.conv = nn.ModuleDict(dict(conv or {}))
        # the adapters of wrapped blocks, registered here too so they are found as "adapters.*"
        self.tokens = nn.ModuleList([b.adapter for b in blocks])
        self._blocks = list(blocks)  # plain list: the blocks belong to the extractor
        self._enabled = True

    @property
    def inside(self) -> bool:
        return bool(self._blocks)

    def __len__(self) -> int:
        return len(self.conv) + len(self.tokens)

    @contextmanager
    def enabled(self, flag: bool = True):
        """Temporarily switch all adapters on or off (off: the frozen backbone's own features)."""
        before = self._enabled
        self._set(flag)
        try:
            yield
        finally:
            self._set(before)

    def _set(self, flag: bool) -> None:
        self._enabled = bool(flag)
        for b in self._blocks:
            b.enabled = self._enabled

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self._enabled or not len(self.conv):
            return feats
        return {k: (self.conv[k](v) if k in self.conv else v) for k, v in feats.items()}

    def is_identity(self) -> bool:
        return all(bool((p == 0).all()) for p in self.parameters())


def build_adapters(extractor: nn.Module, layers: Sequence[str], adapter_layers: Sequence[str] | None,
                   stages: Mapping[str, int] | None = None) -> Adapters:
    """Adapters for ``adapter_layers`` (default: ``layers``) of a FeatureExtractor.

    CNN: names must be among ``layers``; ViT: any block name in ``stages`` at or before the
    last block read (the blocks after it are pruned)."""
    names = list(layers if adapter_layers is None else adapter_layers)
    kind = getattr(extractor, "kind", "cnn")
    if kind != "vit":
        bad = [n for n in names if n not in layers]
        if bad:
            raise ConfigError("method.adapter_layers", f"{bad} are not among the layers used {list(layers)} "
                              "(CNN adapters act on the layers' outputs)")
        channels = extractor.channels
        return Adapters(conv={n: ResidualConv1x1(int(channels[n])) for n in names})
    if stages is None:
        raise ConfigError("backbone.stages", "needed to place ViT adapters")
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise ConfigError("method.adapter_layers", f"{unknown} not in backbone.stages ({list(stages)})")
    last = max(int(stages[n]) for n in layers)
    late = [n for n in names if int(stages[n]) > last]
    if late:
        raise ConfigError("method.adapter_layers", f"{late} come after the last block read ({list(layers)}); "
                          "those blocks are not run")
    vit = extractor.model
    dim = int(getattr(vit, "embed_dim", None) or extractor.channels[layers[0]])
    wrapped = []
    for n in sorted(names, key=lambda n: int(stages[n])):
        i = int(stages[n])
        block = vit.blocks[i]
        if not isinstance(block, AdaptedBlock):
            block = AdaptedBlock(block, ResidualLinear(dim))
            vit.blocks[i] = block
        wrapped.append(block)
    return Adapters(blocks=wrapped)
