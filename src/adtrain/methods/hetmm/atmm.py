"""Affine-invariant Template Mutual Matching (ATMM), vectorised in pure torch.

Query Q (B,C,H,W) and templates T (N,C,H,W) are L2-normalised over C by the caller.
With a square window of odd side w (radius r = w // 2), positions outside the grid skipped:

    forward   S_f(p) = 1 - max_t max_{p' in window(p)} <Q(p), T_t(p')>
    backward  S_b(p) = 1 - max_t max_{p' in window(p)} <Q(p'), T_t(p)>

Both are computed from one quantity per window offset o, with T kept in place and only Q
shifted:  R_o(q) = max_t <Q(q + o), T_t(q)>  (-inf where q + o is off the grid). Then
S_b(p) = 1 - max_o R_o(p) and S_f(p) = 1 - max_o R_o(p - o), so one pass over the larger
window's offsets serves both directions. Each R_o is a per-position batched matmul
(HW, b, C) x (HW, C, n) over chunks of images (b) and templates (n), so memory stays bounded.
Dot products run in the input dtype (fp32/fp16/bf16); maxima are kept in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adtrain.errors import ConfigError
from adtrain.memory.graph_knn import in_graph

__all__ = ["atmm_forward", "atmm_backward", "atmm_mutual", "atmm_naive"]


def _check(q: torch.Tensor, t: torch.Tensor, windows: tuple[int, ...], chunk_size: int) -> None:
    if q.dim() != 4 or t.dim() != 4:
        raise ValueError(f"ATMM expects 4-d tensors, got query {tuple(q.shape)}, templates {tuple(t.shape)}")
    if q.shape[1:] != t.shape[1:]:
        raise ValueError(f"query {tuple(q.shape)} and templates {tuple(t.shape)} differ in (C,H,W)")
    if t.shape[0] == 0:
        raise ValueError("ATMM needs at least one template")
    for w in windows:
        if not isinstance(w, int) or w < 1 or w % 2 == 0:
            raise ConfigError("method.windows", f"window sizes must be odd positive ints, got {w}")
    if chunk_size < 1:
        raise ConfigError("method.chunk_size", f"must be >= 1, got {chunk_size}")


def _shift_map(x: torch.Tensor, dy: int, dx: int, r: int) -> torch.Tensor:
    """y[..., i, j] = x[..., i + dy, j + dx], -inf where that lies off the grid (|dy|,|dx| <= r)."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    xp = F.pad(x, (r, r, r, r), value=float("-inf"))
    return xp[..., r + dy : r + dy + h, r + dx : r + dx + w]


def _position_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n,C,H,W) -> contiguous (H*W, n, C) in `dtype`, as one 2-d transpose copy."""
    n, c, h, w = x.shape
    if in_graph():  # traced for export: no in-place copy; the batch size stays symbolic
        return x.reshape(n * c, h * w).t().to(dtype).reshape(h * w, -1, c)
    out = torch.empty(h * w, n * c, dtype=dtype, device=x.device)
    out.copy_(x.reshape(n * c, h * w).t())
    return out.view(h * w, n, c)


class _Buffer:
    """One flat tensor, grown to the largest size asked for; ``take`` returns a contiguous view
    of its start in the asked shape (the previous view's contents are overwritten)."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= int(d)
        if self.data is None or self.data.numel() < n or self.data.dtype != dtype or self.data.device != device:
            self.data = torch.empty(n, dtype=dtype, device=device)
        return self.data[:n].view(shape)


def atmm_mutual(
    query: torch.Tensor,
    templates: torch.Tensor,
    forward_window: int,
    backward_window: int,
    chunk_size: int = 64,
    compute_dtype: torch.dtype | None = None,
    rows_per_bmm: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (S_f, S_b), each (B,H,W) fp32, in one pass over the window offsets.

    chunk_size: images and templates per chunk (peak extra memory ~ H*W*chunk^2 + H*W*C*chunk).
    compute_dtype: dtype of the dot products; default: the promoted dtype of the inputs.
    rows_per_bmm: window offsets are grouped so one bmm has about this many rows (offsets x
    images); small batches then read the templates once per group, not once per offset.
    """
    _check(query, templates, (forward_window, backward_window), chunk_size)
    if compute_dtype is None:
        compute_dtype = torch.promote_types(query.dtype, templates.dtype)
    b_all, c, h, w = query.shape
    rf, rb = forward_window // 2, backward_window // 2
    r = max(rf, rb)
    hw = h * w
    dev = query.device
    neg = float("-inf")
    f_parts: dict[int, torch.Tensor] = {}  # per image chunk: running maxima over template chunks
    b_parts: dict[int, torch.Tensor] = {}
    # validity of q + o for every offset: built once on the (H,W) grid
    ones = torch.zeros(1, h, w, dtype=torch.float32, device=dev)
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    valid = {o: _shift_map(ones, o[0], o[1], r)[0] for o in offsets}  # 0 valid / -inf invalid
    n_all = templates.shape[0]
    # The stacked offsets and the bmm's products are written into two buffers made once per call
    # (not when traced for export or differentiated): fresh tensors of tens of MB each bmm went to
    # mmap and page-faulted every page on the CPU (docs/BENCHMARKS.md, "HETMM's matching without
    # page faults").
    reuse = not in_graph() and not (torch.is_grad_enabled() and (query.requires_grad or templates.requires_grad))
    stack_buf, dots_buf = _Buffer(), _Buffer()
    padded: dict[int, torch.Tensor] = {}  # one image chunk: its padded copy serves every template chunk
    for t0 in range(0, n_all, chunk_size):
        # (n,C,H,W) -> (HW, n, C) in one 2-d transpose copy (fast); bmm takes its transpose
        tc = _position_major(templates[t0 : t0 + chunk_size].to(dev), compute_dtype).transpose(1, 2)
        # traced for export: one image chunk, the whole batch unsliced (a slice's bounds would be baked
        # into the graph, and a larger batch would lose its images past them)
        image_chunks = [(0, query)] if in_graph() else [(b0, query[b0: b0 + chunk_size]) for b0 in range(0, b_all, chunk_size)]
        for b0, qc in image_chunks:
            nb = qc.shape[0]
            # (b,C,H+2r,W+2r) -> (H+2r, W+2r, b, C): slicing a window offset is then cheap
            qp = padded.get(b0)
            if qp is None:
                qp = _position_major(F.pad(qc, (r, r, r, r)), compute_dtype).reshape(h + 2 * r, w + 2 * r, -1, c)
                if len(image_chunks) == 1:
                    padded[b0] = qp
            f_acc = f_parts.get(b0, torch.full_like(qc[:, 0], neg, dtype=torch.float32))
            b_acc = b_parts.get(b0, torch.full_like(qc[:, 0], neg, dtype=torch.float32))
            # several offsets share one bmm (rows = offsets x images): T is read once per group
            group = max(1, min(len(offsets), rows_per_bmm // nb))
            for g0 in range(0, len(offsets), group):
                offs = offsets[g0 : g0 + group]
                parts = [qp[r + dy : r + dy + h, r + dx : r + dx + w] for dy, dx in offs]
                if reuse:
                    qs = torch.stack(parts, dim=2, out=stack_buf.take((h, w, len(offs), nb, c), compute_dtype, dev))
                    dots = torch.bmm(qs.view(hw, -1, c), tc,  # <Q(q+o), T_t(q)>
                                     out=dots_buf.take((hw, len(offs) * nb, tc.shape[2]), compute_dtype, dev))
                else:
                    dots = torch.bmm(torch.stack(parts, dim=2).reshape(hw, -1, c), tc)
                best = dots.amax(dim=2).float().reshape(h, w, len(offs), -1)
                for i, (dy, dx) in enumerate(offs):
                    r_o = best[:, :, i].permute(2, 0, 1) + valid[(dy, dx)]  # (b,H,W)
                    if abs(dy) <= rb and abs(dx) <= rb:
                        b_acc = torch.maximum(b_acc, r_o)
                    if abs(dy) <= rf and abs(dx) <= rf:
                        f_acc = torch.maximum(f_acc, _shift_map(r_o, -dy, -dx, r))
            f_parts[b0], b_parts[b0] = f_acc, b_acc
    s_f = torch.cat([f_parts[k] for k in sorted(f_parts)])
    s_b = torch.cat([b_parts[k] for k in sorted(b_parts)])
    return 1.0 - s_f, 1.0 - s_b


def atmm_forward(
    query: torch.Tensor,
    templates: torch.Tensor,
    window: int,
    chunk_size: int = 64,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """S_f (B,H,W): each query position against templates around the same position."""
    return atmm_mutual(query, templates, window, 1, chunk_size, compute_dtype)[0]


def atmm_backward(
    query: torch.Tensor,
    templates: torch.Tensor,
    window: int,
    chunk_size: int = 64,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """S_b (B,H,W): each template position against the query around the same position."""
    return atmm_mutual(query, templates, 1, window, chunk_size, compute_dtype)[1]


def atmm_naive(query: torch.Tensor, templates: torch.Tensor, window: int, direction: str) -> torch.Tensor:
    """Plain-loop reference (tests only: tiny tensors). direction: 'forward' or 'backward'."""
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    b, _, h, w = query.shape
    r = window // 2
    q = query.double()
    t = templates.double()
    out = torch.empty(b, h, w, dtype=torch.float64)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                best = float("-inf")
                for ii in range(max(0, i - r), min(h, i + r + 1)):
                    for jj in range(max(0, j - r), min(w, j + r + 1)):
                        if direction == "forward":
                            dots = (t[:, :, ii, jj] * q[bi, :, i, j]).sum(1)
                        else:
                            dots = (t[:, :, i, j] * q[bi, :, ii, jj]).sum(1)
                        best = max(best, dots.max().item())
                out[bi, i, j] = 1.0 - best
    return out.float()
