"""Image scores: pooled maximum of the anomaly map, and a rank fusion with the detection score.

Image score (docs/method.md §10): ``rounds`` rounds of ``k x k`` average pooling (stride 1, "same"
output size, replicate borders) then the maximum, so an isolated hot pixel counts less than a
hot region.

Rank fusion: each score is turned into its rank (empirical CDF) among REFERENCE scores of the
same kind, and the two ranks are averaged. With reference scores of SOURCE normals a single image
gets a meaningful fused score; without a reference the scored set itself is the reference (the
pipeline ranks within the batch, ``dzad.evaluation`` within the category), because the checkpoint
does not store SOURCE score arrays. The CDF is interpolated linearly between reference points and
extended linearly beyond them (slope 1 / reference range), so it never saturates: images that all
exceed every reference score keep their order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dzad.anomaly_map import scaled


def pool_size(pool_k: int, image_size: int) -> int:
    """The pooling window, given at 256 px, for an image side of ``image_size`` (>= 1)."""
    return max(1, round(scaled(pool_k, image_size)))


def image_score(m: torch.Tensor, k: int, rounds: int) -> torch.Tensor:
    """``(B,)`` score: ``rounds`` x (k x k average pooling, stride 1, same size) then max of ``m``.

    ``m`` is ``(B, 1, H, W)``. Even ``k`` pads one more pixel on the right/bottom.
    """
    out = m
    lo, hi = (k - 1) // 2, k // 2
    for _ in range(rounds):
        out = F.avg_pool2d(F.pad(out, (lo, hi, lo, hi), mode="replicate"), k, stride=1)
    return out.flatten(1).amax(dim=1)


def reference_rank(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Rank of each ``x`` ``(B,)`` among ``ref`` ``(R,)``: interpolated CDF, linear beyond the ends.

    Reference point ``i`` of the sorted ``ref`` sits at ``(i + 0.5) / R``. Strictly increasing in
    ``x`` when the reference has a non-zero range.
    """
    ref = ref.detach().double().flatten().sort().values
    x = x.detach().double()
    n = ref.numel()
    if n == 0:
        raise ValueError("reference_rank needs at least one reference score")
    span = float(ref[-1] - ref[0])
    slope = 1.0 / span if span > 0 else 1.0
    if n == 1:
        return 0.5 + (x - ref[0]) * slope
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    idx = torch.searchsorted(ref, x).clamp(1, n - 1)
    x0, x1, q0, q1 = ref[idx - 1], ref[idx], q[idx - 1], q[idx]
    inside = q0 + (q1 - q0) * (x - x0) / (x1 - x0).clamp_min(1e-300)
    below = q[0] + (x - ref[0]) * slope
    above = q[-1] + (x - ref[-1]) * slope
    return torch.where(x < ref[0], below, torch.where(x > ref[-1], above, inside))


def rank_fusion(
    a: torch.Tensor,
    b: torch.Tensor,
    ref_a: torch.Tensor | None = None,
    ref_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the reference ranks of ``a`` and ``b`` ``(B,)``; reference None = the set itself."""
    ra = reference_rank(a, a if ref_a is None or ref_a.numel() == 0 else ref_a)
    rb = reference_rank(b, b if ref_b is None or ref_b.numel() == 0 else ref_b)
    return ((ra + rb) / 2).to(torch.float32)
