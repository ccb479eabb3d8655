"""Pixel metrics at each test image's own resolution (``metrics.resolution=source``).

By default (``run``) the test's pixel metrics compare each map, at the model's input size, with a
mask brought through the same resize (nearest) and centre crop as the image: the methods' papers
and their code do this. MVTec's own evaluation code (MVTec AD, LOCO AD, AD 2) reads each anomaly
map at the image's full size instead, against the ground-truth files as they are. With ``source``:

- each map goes back to its image's size: a centre-cropped map into its place in the resized
  frame, the border the crop cut off at that map's lowest value (those pixels are scored, and a
  defect there is missed, as on an evaluation server), then the frame resized bilinearly (half-pixel
  centres, no antialiasing: OpenCV's INTER_LINEAR) to the source's height and width;
- the ground truth is the mask (and, for AU-sPRO, each region) read at the file's own size;
- every pixel metric is taken there: AUROC, AP, F1-max, AUPRO, AU-sPRO, each category's figures
  and the pixel decisions at ``pixel_threshold``. Validation stays at its coarse run-size maps.

The same geometry writes MVTec AD 2's server files (adtrain.inference.map_files).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: metrics.resolution's values
RESOLUTIONS = ("run", "source")


def maps_to_source(maps: torch.Tensor, image_size, center_crop, source_hw) -> torch.Tensor:
    """(B, h, w) maps at the model's input size -> (B, H, W) at the source's (H, W), float32."""
    maps = maps.float()
    if center_crop is not None and tuple(center_crop) != tuple(image_size):
        (h, w), (ch, cw) = image_size, center_crop
        if tuple(maps.shape[-2:]) != (ch, cw):
            raise ValueError(f"maps {tuple(maps.shape[-2:])} are not the centre crop's {(ch, cw)}")
        frame = maps.flatten(1).amin(dim=1)[:, None, None].expand(-1, h, w).clone()
        y0, x0 = (h - ch) // 2, (w - cw) // 2  # albumentations' CenterCrop
        frame[:, y0:y0 + ch, x0:x0 + cw] = maps
        maps = frame
    size = (int(source_hw[0]), int(source_hw[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def size_groups(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """The rows of a batch that share a source size, in order of first appearance (one update each)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(tuple(int(v) for v in s), []).append(i)
    return list(groups.values())


def source_updates(anomaly_map: torch.Tensor, batch: dict, image_size, center_crop, spro: bool):
    """A test batch at the images' own sizes: for each group of rows sharing a source size,
    (rows, maps (n,1,H,W), masks (n,1,H,W), spro_code (n,H,W) or None); the batch carries
    ``source_mask`` (and ``source_spro_code`` where AU-sPRO is on), lists of (H, W) tensors."""
    sizes = [tuple(m.shape[-2:]) for m in batch["source_mask"]]
    device = anomaly_map.device
    for rows in size_groups(sizes):
        idx = torch.tensor(rows, device=device)
        maps = maps_to_source(anomaly_map[idx, 0], image_size, center_crop, sizes[rows[0]])
        masks = torch.stack([batch["source_mask"][i] for i in rows]).to(device)
        codes = torch.stack([batch["source_spro_code"][i] for i in rows]).to(device) if spro else None
        yield rows, maps[:, None], masks[:, None], codes
