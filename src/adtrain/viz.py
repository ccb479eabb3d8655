"""Heatmaps and the score histogram, drawn with matplotlib's object API (no pyplot, no backend
switch: a notebook keeps its inline backend).

`heatmap_figure`: input | anomaly map over the input with its colour bar (the threshold level
marked) | ground truth, titled with the score, the predicted label and the truth, at the source
image's aspect ratio (the run's test heatmaps, and adtrain.predict's without the ground truth).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(3,H,W) normalised tensor -> (H,W,3) uint8. A uint8 tensor (``data.device_normalize``: not yet
    normalised) is returned as it is: the same array, as the round trip of every uint8 value
    through the ImageNet normalisation and back is exact (tests/test_device_norm.py)."""
    if image.dtype == torch.uint8:
        return image.detach().cpu().permute(1, 2, 0).numpy().copy()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = image.detach().float().cpu() * std_t + mean_t
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def colorize(norm_map: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(H,W) in [0,1] -> (H,W,3) uint8."""
    rgba = colormaps[cmap](np.clip(norm_map, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def figure_png(fig, path) -> Path:
    """Save a Figure atomically as PNG (adtrain.io): drawn by Agg and encoded once (the same pixels as
    savefig's PNG, which had to be decoded and encoded again for the atomic write: half the time)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from adtrain.io import save_image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return save_image(Image.fromarray(np.asarray(canvas.buffer_rgba()).copy()), path)


def _resized(array: np.ndarray, height: int, width: int, resample=Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((width, height), resample))


#: a heatmap panel is at most this many times as wide as it is high (a line-scan camera's 4 x 300
#: px images would otherwise make 72,000 px wide figures)
MAX_PANEL_ASPECT = 8


def shown_size(source_size, image_size, center_crop) -> tuple[float, float] | None:
    """The (h, w) of the part of a source image that a model's input shows: the whole source, or with
    a centre crop of the resized image its middle (ch/h of the height, cw/w of the width). A heatmap
    drawn at the whole source's aspect ratio stretched a crop of other proportions than image_size's."""
    if source_size is None or center_crop is None:
        return source_size
    (h0, w0), (h, w), (ch, cw) = source_size, image_size, center_crop
    return float(h0) * ch / h, float(w0) * cw / w


def heatmap_figure(image: np.ndarray, norm_map: np.ndarray, mask: np.ndarray | None, *, score: float,
                   threshold: float | None, label: int | None, defect: str = "", source_size=None,
                   height: int = 320, alpha: float = 0.5, truth: bool = True, map_threshold: float | None = None):
    """A Figure: input | map over the input (+ colour bar, threshold at 0.5) | ground truth (truth=False:
    no ground-truth panel nor line, for images that have none, as adtrain.predict's).

    norm_map is in [0, 1], 0.5 = map_threshold, the pixel threshold of the decision masks, where given
    (AnomalyModule.display_threshold), else the image threshold (without a threshold, min-max of this
    map). source_size (h, w) sets the aspect ratio: that of the part of the source the input shows
    (``shown_size``); height the panel height in pixels."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h0, w0 = (source_size if source_size is not None else image.shape[:2])
    height = int(height)
    width = max(1, round(height * float(w0) / float(h0)))
    if width > MAX_PANEL_ASPECT * height:  # a line-scan image (4 x 300 px): the panel's width is bounded and
        width = MAX_PANEL_ASPECT * height  # its height shrinks with it (the aspect kept down to 8 px high)
        height = max(8, round(width * float(h0) / float(w0)))
    img = _resized(image, height, width)
    heat = _resized(colorize(norm_map), height, width)
    blend = (alpha * heat + (1 - alpha) * img).round().astype(np.uint8)
    has_threshold = threshold is not None and np.isfinite(threshold)
    predicted = (score > threshold) if has_threshold else None

    dpi = 100
    panel_w, panel_h = width / dpi, height / dpi
    panels = 3 if truth else 2
    fig = Figure(figsize=(panels * panel_w + 1.6, panel_h + 1.1), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, panels)
    axes[0].imshow(img)
    axes[0].set_title("input", fontsize=9)
    axes[1].imshow(blend)
    axes[1].set_title("anomaly map", fontsize=9)
    if not truth:
        pass
    elif mask is not None:
        axes[2].imshow(_resized((mask > 0.5).astype(np.uint8) * 255, height, width, Image.NEAREST),
                       cmap="gray", vmin=0, vmax=255)
        axes[2].set_title("ground truth", fontsize=9)
    else:
        axes[2].imshow(np.full((height, width, 3), 235, np.uint8))
        axes[2].text(width / 2, height / 2, "no mask", ha="center", va="center", fontsize=9, color="0.4")
        axes[2].set_title("ground truth", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="jet"), ax=axes[1], fraction=0.06, pad=0.02)
    if has_threshold:
        bar.ax.axhline(0.5, color="white", linewidth=2.5)
        bar.ax.axhline(0.5, color="black", linewidth=1, linestyle="--")
        pixel = map_threshold is not None and np.isfinite(map_threshold)
        bar.set_ticks([0.0, 0.5, 1.0], labels=["normal median", "pixel threshold" if pixel else "threshold",
                                               "median + 2 (thr - median)"], fontsize=7)
        if pixel:
            bar.set_label(f"0.5 = pixel threshold {map_threshold:.4g}", fontsize=7)
    else:
        bar.set_ticks([0.0, 1.0], labels=["min", "max"], fontsize=7)
        bar.set_label("no threshold: min-max", fontsize=7)
    known = {0: "normal", 1: "anomalous"}.get(label, "unknown")
    guess = "no threshold" if predicted is None else ("ANOMALOUS" if predicted else "normal")
    right = predicted is None or label is None or bool(predicted) == bool(label)
    thr_text = f" (threshold {threshold:.4g})" if has_threshold else ""
    said = f"predicted {guess}, truth {known}" if truth else f"predicted {guess}"
    fig.suptitle(f"{defect + ': ' if defect else ''}score {score:.4g}{thr_text}\n{said}", fontsize=9,
                 color="black" if right else "firebrick")
    return fig


def save_heatmap(path, **kwargs) -> Path:
    """heatmap_figure(**kwargs) written to path as PNG (atomic)."""
    return figure_png(heatmap_figure(**kwargs), path)


#: where a run's image threshold comes from (results.json threshold_mode), as the histogram's title says it
THRESHOLD_SOURCES = {"quantile": "threshold from held-out normals",
                     "val_f1": "threshold: the validation set's best F1"}


def histogram_figure(scores: np.ndarray, labels: np.ndarray, threshold: float | None, mode: str = "quantile"):
    """Image scores by label, the fitted threshold as a dashed line; the title says where it comes from."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"normal ({int((labels == 0).sum())})")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"anomalous ({int((labels == 1).sum())})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("image score")
    ax.set_ylabel("test images")
    ax.set_title(f"test image scores ({THRESHOLD_SOURCES.get(mode, 'threshold: ' + str(mode))})", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def score_histogram(scores: np.ndarray, labels: np.ndarray, threshold: float | None, path,
                    mode: str = "quantile") -> Path:
    """histogram_figure written to path as PNG (atomic)."""
    return figure_png(histogram_figure(scores, labels, threshold, mode), path)
