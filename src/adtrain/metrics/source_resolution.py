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

import numpy as np
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


#: one update holds at most this many source pixels (16 images of 1024 x 1024): the maps, their
#: copies in the accumulators and a flush's sort stay bounded whatever the batch size
MAX_UPDATE_PIXELS = 1 << 24


def size_groups(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """The rows of a batch that share a source size, in order of first appearance (one update each)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(tuple(int(v) for v in s), []).append(i)
    return list(groups.values())


def update_groups(sizes: list[tuple[int, int]], max_pixels: int = MAX_UPDATE_PIXELS) -> list[list[int]]:
    """``size_groups``, each cut into runs of at most ``max_pixels`` source pixels (one row at least)."""
    out = []
    for rows in size_groups(sizes):
        h, w = sizes[rows[0]]
        step = max(1, int(max_pixels) // max(1, int(h) * int(w)))
        out += [rows[k:k + step] for k in range(0, len(rows), step)]
    return out


def update_at_source(evaluator, anomaly_map: torch.Tensor, batch: dict, geometry, by_category: bool,
                     spro: bool) -> None:
    """A test batch's pixel statistics at its images' own sizes: one ``update_pixels`` per run of
    ``update_groups`` (maps (n,1,H,W), masks, labels, and where asked each image's category and its
    AU-sPRO regions). The batch carries ``source_mask`` (and ``source_spro_code`` for AU-sPRO), lists
    of (H, W) tensors. Under DDP the evaluator records the batch (``record_source``) and replays it
    through here, so both count the same updates in the same order."""
    if hasattr(evaluator, "record_source"):
        evaluator.record_source(anomaly_map, batch, geometry, by_category, spro)
        return
    image_size, center_crop = geometry
    sizes = [tuple(m.shape[-2:]) for m in batch["source_mask"]]
    device, label, has_mask = anomaly_map.device, batch["label"], batch["has_mask"]
    for rows in update_groups(sizes):
        idx = torch.tensor(rows, device=device)
        maps = maps_to_source(anomaly_map[idx, 0], image_size, center_crop, sizes[rows[0]])
        masks = torch.stack([batch["source_mask"][i] for i in rows]).to(device)
        pick = idx.to(label.device)
        names = [batch["category"][i] for i in rows]
        regions = None
        if spro:
            codes = torch.stack([batch["source_spro_code"][i] for i in rows]).to(device=device, dtype=torch.int64)
            regions = (codes, batch["spro_fraction"][pick], names, [batch["defect"][i] for i in rows])
        evaluator.update_pixels(maps[:, None], label[pick], masks[:, None], has_mask[pick],
                                names if by_category else None, regions)


def pack_batch(anomaly_map: torch.Tensor, batch: dict, spro: bool) -> list[dict]:
    """A batch's images, each small, for a DDP rank to send (each its own tensors: a view would
    pickle its whole batch): the map at the model's size, the mask as bits, the region code in the
    smallest integer type that holds it. The batch's tensors come to the host once, not per image."""
    maps = anomaly_map.detach().float().cpu()
    labels, has_mask = batch["label"].tolist(), batch["has_mask"].tolist()
    fractions = batch["spro_fraction"].detach().cpu() if spro else None
    items = []
    for i, m in enumerate(batch["source_mask"]):
        mask = m.detach().cpu().numpy().astype(bool)
        item = {"map": maps[i].clone(), "label": int(labels[i]), "has_mask": bool(has_mask[i]),
                "category": batch["category"][i], "defect": batch["defect"][i], "shape": mask.shape,
                "mask": np.packbits(mask)}
        if spro:
            code = batch["source_spro_code"][i].detach().cpu()
            top = int(code.max()) if code.numel() else 0
            small = next(t for t in (torch.uint8, torch.int16, torch.int32, torch.int64) if top <= torch.iinfo(t).max)
            item.update(code=code.to(small).clone(), fraction=fractions[i].clone())
        items.append(item)
    return items


def unpack_batch(items: list[dict], spro: bool) -> tuple[torch.Tensor, dict]:
    """``pack_batch``'s items -> (anomaly maps, the batch ``update_at_source`` reads)."""
    def mask(it):
        h, w = it["shape"]
        return torch.from_numpy(np.unpackbits(it["mask"], count=h * w).reshape(h, w))

    batch = {"source_mask": [mask(it) for it in items], "label": torch.tensor([it["label"] for it in items]),
             "has_mask": torch.tensor([it["has_mask"] for it in items]),
             "category": [it["category"] for it in items], "defect": [it["defect"] for it in items]}
    if spro:
        batch.update(source_spro_code=[it["code"] for it in items],
                     spro_fraction=torch.stack([it["fraction"] for it in items]))
    return torch.stack([it["map"] for it in items]), batch
