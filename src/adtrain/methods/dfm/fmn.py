"""Feature Matching Network: nearest-neighbour matching written as pooling over a distance volume.

Sim[n, k] = ||P_n - M_k||_2 for patch features P (N = B*h*w rows) and memory items M (K rows).
  memory modulate (before MinPool):  Sim'[n, k] = a_k * Sim[n, k] + b_k * r
  MinPool over memory  -> S[n] = min_k Sim'[n, k]   (patch score map, Eq. 4 of the paper)
  patch modulate (before MaxPool):    S'[b, p] = c_p * S[b, p] + e_p * r
  MaxPool over patches -> s[b] = max_p S'[b, p]    (image score, Eq. 5)
a, c init 1, b, e init 0: an untrained FMN *is* nearest-neighbour matching (PatchCore's patch
distance, plain max image score). r is a fixed distance scale (mean nearest distance when the
memory was last built: every build measures it anew), so the shifts are in units of typical
distances.

The volume is never held whole: rows x memory chunks, each reduced at once to the few smallest
modulated entries (candidates, no gradient); the candidates' distances are then recomputed
exactly (differences, not the ||a||^2 - 2ab + ||b||^2 expansion) with gradients, and the hard
min picks one: gradients flow through the selected elements only, as for min pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adtrain.errors import AdtrainError
from adtrain.memory import gathered_distances
from adtrain.memory.fp32 import autocast_off
from adtrain.memory.graph_knn import graph_candidates, in_graph


def _sq_block(p: torch.Tensor, m: torch.Tensor, m_sq: torch.Tensor) -> torch.Tensor:
    d = torch.addmm(m_sq.unsqueeze(0), p, m.t(), beta=1.0, alpha=-2.0)
    return d.add_((p * p).sum(dim=1, keepdim=True)).clamp_(min=0.0)


@torch.no_grad()
@autocast_off  # the expansion's cancellation needs fp32: bf16 put dist_ref 3 % off (0.1252 for 0.1212)
def distance_volume(patches: torch.Tensor, memory: torch.Tensor, row_chunk: int | None = None,
                    mem_chunk: int | None = None) -> torch.Tensor:
    """The whole (N,K) Euclidean distance volume, built chunk by chunk (fp32; for inspection and
    tests: training and scoring never hold it whole)."""
    p, m = patches.detach().float(), memory.detach().float().to(patches.device)
    n, k = p.shape[0], m.shape[0]
    rc, mc = row_chunk or max(n, 1), mem_chunk or max(k, 1)
    m_sq = (m * m).sum(dim=1)
    out = torch.empty(n, k, device=p.device)
    for r in range(0, n, rc):
        for c in range(0, k, mc):
            out[r:r + rc, c:c + mc] = _sq_block(p[r:r + rc], m[c:c + mc], m_sq[c:c + mc]).sqrt_()
    return out


@torch.no_grad()
@autocast_off
def modulated_candidates(patches: torch.Tensor, memory: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                         k: int, row_chunk: int = 8192, mem_chunk: int = 4096) -> torch.Tensor:
    """Indices (N,k) of the k smallest a_j * ||p - m_j|| + b_j per row, chunked over rows and memory."""
    p, m = patches.detach().float(), memory.detach().float()
    a, b = scale.detach().float(), shift.detach().float()
    n, size = p.shape[0], m.shape[0]
    k = min(int(k), size)
    m_sq = (m * m).sum(dim=1)
    # untrained (identity) modulates: x * 1 + 0 == x exactly, so the pass over each block is skipped
    identity = bool((a == 1).all()) and bool((b == 0).all())
    out = torch.empty(n, k, dtype=torch.long, device=p.device)
    for r in range(0, n, row_chunk):
        best_v = best_i = None
        for c in range(0, size, mem_chunk):
            v = _sq_block(p[r:r + row_chunk], m[c:c + mem_chunk], m_sq[c:c + mem_chunk]).sqrt_()
            if not identity:
                v.mul_(a[c:c + mem_chunk]).add_(b[c:c + mem_chunk])
            val, idx = torch.topk(v, min(k, v.shape[1]), dim=1, largest=False)
            idx += c
            if best_v is not None:
                val, sel = torch.topk(torch.cat([best_v, val], 1), k, dim=1, largest=False)
                idx = torch.gather(torch.cat([best_i, idx], 1), 1, sel)
            best_v, best_i = val, idx
        out[r:r + row_chunk] = best_i
    return out


@torch.no_grad()
@autocast_off
def unambiguous_nearest(patches: torch.Tensor, memory: torch.Tensor, row_chunk: int = 8192
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest (N,), ambiguous (N,) bool): each row's nearest memory item by the expanded squared
    distance, and whether any other item comes so close that rounding could reorder them.

    With |c - t| <= E for the expanded (c) and exact (t) squared distances, E = gamma_{D+4}
    (|p| + max |m|)^2 (any summation order), and the exact re-check's own relative error gamma, an
    item outside c <= c_min (1 + 8 gamma) + 4 E is farther than the nearest in the re-check too:
    where the nearest is alone in that window, it is the one the candidates' exact minimum picks."""
    p, m = patches.detach().float(), memory.detach().float()
    n, dim = p.shape
    gamma = 1.01 * (dim + 4) * torch.finfo(torch.float32).eps / 2
    m_sq = (m * m).sum(dim=1)
    m_norm = m_sq.max().sqrt()
    nearest = torch.empty(n, dtype=torch.long, device=p.device)
    ambiguous = torch.empty(n, dtype=torch.bool, device=p.device)
    for r in range(0, n, row_chunk):
        rows = p[r:r + row_chunk]
        c = _sq_block(rows, m, m_sq)
        c_min, idx = c.min(dim=1)
        err = gamma * (rows.norm(dim=1) + m_norm).square()
        close = (c <= (c_min * (1 + 8 * gamma) + 4 * err).unsqueeze(1)).sum(dim=1)
        nearest[r:r + row_chunk] = idx
        ambiguous[r:r + row_chunk] = (close != 1) | ~torch.isfinite(c_min)
    return nearest, ambiguous


class FeatureMatchingNetwork(nn.Module):
    """Trainable memory + modulate layers + min/max pooling. ``set_memory`` before use."""

    def __init__(self, dim: int, candidates: int = 8, row_chunk: int = 8192, mem_chunk: int = 4096):
        super().__init__()
        self.dim = int(dim)
        self.candidates = max(1, int(candidates))
        self.row_chunk, self.mem_chunk = max(1, int(row_chunk)), max(1, int(mem_chunk))
        self.memory = nn.Parameter(torch.empty(0, self.dim))
        self.mem_scale = nn.Parameter(torch.ones(0))
        self.mem_shift = nn.Parameter(torch.zeros(0))
        self.patch_scale = nn.Parameter(torch.ones(0, 0))
        self.patch_shift = nn.Parameter(torch.zeros(0, 0))
        self.register_buffer("dist_ref", torch.tensor(1.0))

    @property
    def ready(self) -> bool:
        return self.memory.shape[0] > 0

    def __len__(self) -> int:
        return int(self.memory.shape[0])

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def set_memory(self, bank: torch.Tensor, grid: tuple[int, int] | None = None, dist_ref: float | None = None,
                   reset_patch: bool = False) -> None:
        """New memory (K,D); the memory modulate (tied to item indices) is reset to identity.
        The patch modulate is (re)created on ``grid`` when absent or ``reset_patch``."""
        if bank.dim() != 2 or bank.shape[0] == 0 or bank.shape[1] != self.dim:
            raise AdtrainError(f"FMN.set_memory: expected non-empty (K,{self.dim}), got {tuple(bank.shape)}")
        dev = self.dist_ref.device
        k = bank.shape[0]
        self.memory.data = bank.detach().to(dev, torch.float32).contiguous().clone()
        self.mem_scale.data = torch.ones(k, device=dev)
        self.mem_shift.data = torch.zeros(k, device=dev)
        if grid is not None and (reset_patch or self.patch_scale.numel() == 0):
            self.patch_scale.data = torch.ones(*grid, device=dev)
            self.patch_shift.data = torch.zeros(*grid, device=dev)
        if dist_ref is not None and dist_ref > 0:
            self.dist_ref.fill_(float(dist_ref))

    @torch.no_grad()
    def clear(self) -> None:
        dev = self.dist_ref.device
        self.memory.data = torch.empty(0, self.dim, device=dev)
        self.mem_scale.data = torch.ones(0, device=dev)
        self.mem_shift.data = torch.zeros(0, device=dev)
        self.patch_scale.data = torch.ones(0, 0, device=dev)
        self.patch_shift.data = torch.zeros(0, 0, device=dev)
        self.dist_ref.fill_(1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("memory", "mem_scale", "mem_shift", "patch_scale", "patch_shift"):
            src = state_dict.get(prefix + name)
            param = getattr(self, name)
            if src is not None and tuple(src.shape) != tuple(param.shape):
                param.data = torch.empty(src.shape, dtype=param.dtype, device=param.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ matching
    def match(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MinPool of the modulated volume: (S (N,), nearest index (N,)) for patches (N,D)."""
        if not self.ready:
            raise AdtrainError("FMN: the memory is empty (it is built at the start of training)")
        with torch.autocast(device_type=patches.device.type, enabled=False):
            p = patches.float()
            if self._plain_matching():
                return self._match_nearest(p)
            mem = self.memory
            # pre-select on exactly what is matched: a_k * d + b_k * r (r = dist_ref)
            if in_graph():  # traced for export: chunked over memory only, plain ops
                cand = graph_candidates(p, mem, self.candidates, self.mem_chunk, self.mem_scale,
                                        self.mem_shift * self.dist_ref)
            else:
                cand = modulated_candidates(p, mem, self.mem_scale, self.mem_shift * self.dist_ref,
                                            self.candidates, self.row_chunk, self.mem_chunk)
            d = gathered_distances(p, mem, cand)  # exact, (N,c), gradients to p and mem
            v = d * self.mem_scale[cand] + self.mem_shift[cand] * self.dist_ref
            s, j = v.min(dim=1)
            return s, torch.gather(cand, 1, j.unsqueeze(1)).squeeze(1)

    def _plain_matching(self) -> bool:
        """Untrained modulates that take no gradient and a memory of one chunk: ``_match_nearest``
        gives what the candidates' path does, to the bit."""
        a, b = self.mem_scale, self.mem_shift
        if in_graph() or self.candidates < 2 or len(self) > self.mem_chunk:
            return False
        if torch.get_float32_matmul_precision() != "highest" or (
                self.memory.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
            return False  # a bf16 / TF32 product breaks the rounding bound of ``unambiguous_nearest``
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return False
        return bool((a == 1).all()) and bool((b == 0).all())

    def _match_nearest(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``match`` with identity modulates: the exact distance of each row's nearest item alone,
        and the candidates' re-check only for the rows where rounding could reorder the nearest
        items (``unambiguous_nearest``; a few in a thousand): the volume's top-k is skipped."""
        mem = self.memory
        nearest, ambiguous = unambiguous_nearest(p, mem, self.row_chunk)
        rows = ambiguous.nonzero().squeeze(1)
        if rows.numel():  # the candidates' winner (first of the smallest, as v.min picks in ``match``)
            with torch.no_grad():  # the modulates are the identity here (``_plain_matching``)
                cand = modulated_candidates(p[rows], mem, self.mem_scale, self.mem_shift, self.candidates,
                                            self.row_chunk, self.mem_chunk)
                j = gathered_distances(p[rows], mem, cand).min(dim=1).indices
                nearest[rows] = torch.gather(cand, 1, j.unsqueeze(1)).squeeze(1)
        # one call for every row: the gradients reach the memory in row order, as in ``match``
        return gathered_distances(p, mem, nearest.unsqueeze(1)).squeeze(1), nearest

    def patch_modulate(self, scores: torch.Tensor) -> torch.Tensor:
        """c_p * S + e_p * r on the patch grid (the parameters resized if the grid differs)."""
        if self.patch_scale.numel() == 0:
            return scores
        h, w = scores.shape[-2:]
        scale, shift = self.patch_scale, self.patch_shift
        if tuple(scale.shape) != (h, w):
            both = torch.stack([scale, shift]).unsqueeze(0)
            scale, shift = F.interpolate(both, size=(h, w), mode="bilinear", align_corners=False)[0]
        return scores * scale + shift * self.dist_ref

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding (B,D,h,w) -> (patch scores S' (B,h,w), image scores s (B,)), fp32."""
        b, dim, h, w = embedding.shape
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            flat = embedding.float().permute(0, 2, 3, 1).reshape(-1, dim)
            s_min, _ = self.match(flat)
            maps = self.patch_modulate(s_min.view(b, h, w))
            return maps, maps.flatten(1).max(dim=1).values  # hard max: one element per image

    def extra_repr(self) -> str:
        return f"memory={tuple(self.memory.shape)}, patch_grid={tuple(self.patch_scale.shape)}"
