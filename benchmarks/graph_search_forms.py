"""One distance block of the export graph's exact search, in three forms, TorchScript and ONNX Runtime.

    python benchmarks/graph_search_forms.py [--queries 6272] [--chunk 4096] [--dim 152] [--k 9]
        [--threads 2] [--rounds 2]

The block `adtrain.memory.graph_knn.graph_candidates` runs once per bank chunk: squared-distance
ordering of every query against `chunk` bank rows, then a top-k. Forms:
- `original`: ||q||^2 - 2 q.b + ||b||^2, clamped (before 2026-12-06);
- `addmm`: ||b||^2 - 2 q.b as a GEMM with the norms as its bias (a70456f);
- `product`: the same as one plain product [q, 1] . [-2 b, ||b||^2] (the graph's form now).
Each is traced and frozen (TorchScript) and exported (ONNX, dynamic query count); median of 5
calls after one warm-up, ms per block, random normal data (seed 0).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings

import torch


class Original(torch.nn.Module):
    def __init__(self, bank: torch.Tensor, k: int):
        super().__init__()
        self.bank, self.k = bank, k

    def forward(self, q):
        m = self.bank
        d = ((q * q).sum(1, keepdim=True) - 2.0 * (q @ m.t()) + (m * m).sum(1).unsqueeze(0)).clamp(min=0.0)
        return torch.topk(d, self.k, dim=1, largest=False)[1]


class Addmm(Original):
    def forward(self, q):
        m = self.bank
        d = torch.addmm((m * m).sum(1).unsqueeze(0), q, m.t(), beta=1.0, alpha=-2.0)
        return torch.topk(d, self.k, dim=1, largest=False)[1]


class Product(Original):
    def forward(self, q):
        from adtrain.memory.graph_knn import graph_candidates

        return graph_candidates(q, self.bank, self.k, chunk=int(self.bank.shape[0]))


def median_ms(fn) -> float:
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=6272)  # 8 images x 28 x 28 patches (PatchCore, 224 crop)
    ap.add_argument("--chunk", type=int, default=4096)    # adtrain.memory.graph_knn.GRAPH_CHUNK
    ap.add_argument("--dim", type=int, default=152)       # EfficientNet-Lite0 layers 2 + 3
    ap.add_argument("--k", type=int, default=9)           # PatchCore: 1 + the re-ranking pad
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import onnxruntime as ort

    warnings.simplefilter("ignore")  # the tracer's and the exporter's notes on every form
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(args.chunk, args.dim, generator=g), torch.randn(args.queries, args.dim, generator=g)
    forms = {"original": Original, "addmm": Addmm, "product": Product}
    first = None
    for rnd in range(args.rounds):
        for name, cls in forms.items():
            mod = cls(bank, args.k).eval()
            with torch.no_grad():
                ts = torch.jit.freeze(torch.jit.trace(mod, q).eval())
                f = io.BytesIO()
                torch.onnx.export(mod, (q,), f, input_names=["q"], dynamic_axes={"q": {0: "m"}}, dynamo=False)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
                sess = ort.InferenceSession(f.getvalue(), opts, providers=["CPUExecutionProvider"])
                nearest = ts(q)[:, 0]
                first = nearest if first is None else first
                print(f"round {rnd} {name:8s} torchscript {median_ms(lambda: ts(q)):7.1f} ms  onnxruntime "
                      f"{median_ms(lambda: sess.run(None, {'q': q.numpy()})):7.1f} ms  same nearest as original: "
                      f"{float((nearest == first).float().mean()):.4f}", flush=True)


if __name__ == "__main__":
    main()
