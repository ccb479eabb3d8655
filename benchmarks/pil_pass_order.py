"""How far the export graph's PIL resize (``adtrain.data.resize.resize_tensor``: horizontal pass
first, as Pillow up to 12.x) is from the installed Pillow's own resize, per frame shape: the share
of pixels that differ and the largest difference, and which pass order the installed Pillow ran
(the order that reproduces it exactly; "either" where both do). ``--rule`` picks the PIL rule,
``--runtime`` runs the graph's resize eagerly (torch, what TorchScript traces) or exported to ONNX
and run by ONNX Runtime or OpenVINO (each its own float arithmetic).

    PYTHONPATH=src .venv/bin/python benchmarks/pil_pass_order.py [--rule pil_lanczos] [--runtime openvino]
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import PIL
import torch

from adtrain.data.resize import _pil_pass, resize_image, resize_tensor

SHAPES = [((400, 300), (256, 256)), ((300, 120), (64, 64)), ((150, 100), (64, 64)), ((300, 400), (256, 256)),
          ((512, 512), (256, 256)), ((1024, 768), (256, 256)), ((768, 1024), (256, 256))]


class _Resize(torch.nn.Module):
    def __init__(self, size, rule):
        super().__init__()
        self.size, self.rule = size, rule

    def forward(self, x):
        return resize_tensor(x, self.size, self.rule)


def _graph(x: torch.Tensor, size, rule: str, runtime: str) -> np.ndarray:
    """The graph's resize of uint8 (1,3,H,W) ``x``, as (h,w,3) int16, run by ``runtime``."""
    if runtime == "torch":
        y = resize_tensor(x, size, rule)
    else:
        buf = io.BytesIO()
        torch.onnx.export(_Resize(size, rule), (x,), buf, input_names=["x"], output_names=["y"], dynamo=False)
        if runtime == "onnxruntime":
            import onnxruntime as ort

            y = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        else:
            import openvino as ov

            core = ov.Core()
            model = core.read_model(buf.getvalue(), b"")  # an in-memory ONNX model
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})  # as adtrain's exports
            y = compiled({"x": x.numpy()})[compiled.output(0)]
        y = torch.as_tensor(np.asarray(y))
    return y[0].permute(1, 2, 0).numpy().astype(np.int16)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rule", default="pil_bilinear", choices=["pil_bilinear", "pil_lanczos"])
    p.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime", "openvino"])
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    out = []
    for (h_in, w_in), (h, w) in SHAPES:
        arr = rng.integers(0, 256, (h_in, w_in, 3), dtype=np.uint8)
        pil = resize_image(arr, (h, w), args.rule).astype(np.int16)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()
        graph = _graph(x, (h, w), args.rule, args.runtime)
        vert = _pil_pass(_pil_pass(x, h, args.rule).transpose(-1, -2).contiguous(), w,
                         args.rule).transpose(-1, -2)[0].permute(1, 2, 0).numpy().astype(np.int16)
        horiz = resize_tensor(x, (h, w), args.rule)[0].permute(1, 2, 0).numpy().astype(np.int16)
        diff = np.abs(graph - pil)
        h_ok, v_ok = bool(np.array_equal(horiz, pil)), bool(np.array_equal(vert, pil))
        out.append({"frame_hxw": [h_in, w_in], "to_hxw": [h, w], "pixels_differing": round(float((diff > 0).mean()), 4),
                    "largest_difference": int(diff.max()),
                    "pillow_order": "either" if h_ok and v_ok else "horizontal" if h_ok else "vertical" if v_ok
                    else "neither"})
    print(json.dumps({"pillow": PIL.__version__, "rule": args.rule, "runtime": args.runtime, "shapes": out}, indent=1))
    return out


if __name__ == "__main__":
    main()
