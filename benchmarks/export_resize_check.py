"""How far an ONNX export's own resize moves scores: test images fed at their file size (the graph
resizes them) against the run's scores.csv (resized by its data.resize rule on the host).

    python benchmarks/export_resize_check.py --run RUN [--onnx RUN/export/model.onnx] [--n 40]

Prints the median and max relative score difference and how many decisions agree.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--onnx", default=None)
    ap.add_argument("--n", type=int, default=40, help="first N test images of scores.csv (one batch: same size)")
    args = ap.parse_args()

    import onnxruntime as ort
    from PIL import Image

    run = Path(args.run)
    rows = list(csv.DictReader(open(run / "scores.csv")))[: args.n]
    x = np.stack([np.asarray(Image.open(r["path"]).convert("RGB")) for r in rows])
    sess = ort.InferenceSession(str(args.onnx or run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    score, _, decision, _ = sess.run(None, {"images": x})
    ref = np.array([float(r["score"]) for r in rows])
    rel = np.abs(score - ref) / np.abs(ref)
    print(json.dumps({"images": len(rows), "input": list(x.shape[1:3]), "median_rel_diff": float(np.median(rel)),
                      "max_rel_diff": float(rel.max()),
                      "same_decisions": int(sum(int(d) == int(r["prediction"]) for d, r in zip(decision, rows)))}))


if __name__ == "__main__":
    main()
