"""How far the export graph's PIL resize (``adtrain.data.resize.resize_tensor``: horizontal pass
first, as Pillow up to 12.x) is from the installed Pillow's own resize, per frame shape: the share
of pixels that differ and the largest difference, and which pass order the installed Pillow ran
(the order that reproduces it exactly; "either" where both do).

    PYTHONPATH=src .venv/bin/python benchmarks/pil_pass_order.py
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import PIL
import torch
from PIL import Image

from adtrain.data.resize import _pil_pass, resize_tensor

SHAPES = [((400, 300), (256, 256)), ((300, 120), (64, 64)), ((300, 400), (256, 256)), ((512, 512), (256, 256)),
          ((1024, 768), (256, 256)), ((768, 1024), (256, 256))]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    out = []
    for (h_in, w_in), (h, w) in SHAPES:
        arr = rng.integers(0, 256, (h_in, w_in, 3), dtype=np.uint8)
        pil = np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR)).astype(np.int16)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None]
        graph = resize_tensor(x, (h, w), "pil_bilinear")[0].permute(1, 2, 0).numpy().astype(np.int16)
        vert = _pil_pass(_pil_pass(x.contiguous(), h, "pil_bilinear").transpose(-1, -2).contiguous(), w,
                         "pil_bilinear").transpose(-1, -2)[0].permute(1, 2, 0).numpy().astype(np.int16)
        diff = np.abs(graph - pil)
        h_ok, v_ok = bool((diff == 0).all()), bool(np.array_equal(vert, pil))
        out.append({"frame_hxw": [h_in, w_in], "to_hxw": [h, w], "pixels_differing": round(float((diff > 0).mean()), 4),
                    "largest_difference": int(diff.max()),
                    "pillow_order": "either" if h_ok and v_ok else "horizontal" if h_ok else "vertical" if v_ok
                    else "neither"})
    print(json.dumps({"pillow": PIL.__version__, "shapes": out}, indent=1))
    return out


if __name__ == "__main__":
    main()
