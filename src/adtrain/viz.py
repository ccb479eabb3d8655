"""Heatmap overlays: image | anomaly map over the image | ground truth, as one PNG."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(3,H,W) normalised tensor -> (H,W,3) uint8."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = image.detach().float().cpu() * std_t + mean_t
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def colorize(norm_map: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(H,W) in [0,1] -> (H,W,3) uint8."""
    rgba = colormaps[cmap](np.clip(norm_map, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay_panel(
    image: np.ndarray,
    norm_map: np.ndarray,
    mask: np.ndarray | None = None,
    title: str = "",
    alpha: float = 0.5,
) -> Image.Image:
    """Side by side: input, heatmap blended over it (0.5 = threshold), ground truth (if any)."""
    heat = colorize(norm_map)
    blend = (alpha * heat + (1 - alpha) * image).round().astype(np.uint8)
    panels = [image, blend]
    if mask is not None:
        m = (mask > 0.5).astype(np.uint8) * 255
        panels.append(np.stack([m, m, m], axis=-1))
    strip = np.concatenate(panels, axis=1)
    pad = 18 if title else 0
    canvas = Image.new("RGB", (strip.shape[1], strip.shape[0] + pad), "white")
    canvas.paste(Image.fromarray(strip), (0, pad))
    if title:
        ImageDraw.Draw(canvas).text((4, 3), title, fill="black")
    return canvas


def score_histogram(scores: np.ndarray, labels: np.ndarray, threshold: float | None, path) -> None:
    """Histogram of image scores by label, with the fitted threshold as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomalous")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="k", linestyle="--", label="threshold")
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
