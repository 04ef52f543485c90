"""Dense global attention (the PartCrafter-style baseline): every token sees all z tokens."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def dense_global_attention(q, k, v, num_latent: int, component_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q: (B, N, H, T, d); k, v: (B, N, H, >=Lz, d) -> (B, N, H, T, d); padded components unseen."""
    B, N, H, T, d = q.shape
    Lz = num_latent
    qf = q.permute(0, 2, 1, 3, 4).reshape(B, H, N * T, d)  # (B, H, N*T, d)
    kf = k[:, :, :, :Lz].permute(0, 2, 1, 3, 4).reshape(B, H, N * Lz, d)  # (B, H, N*Lz, d)
    vf = v[:, :, :, :Lz].permute(0, 2, 1, 3, 4).reshape(B, H, N * Lz, d)
    mask = None
    if component_mask is not None and not bool(component_mask.all()):
        keep = component_mask.repeat_interleave(Lz, dim=1).view(B, 1, 1, N * Lz)
        mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)  # (B, H, N*T, d)
    return out.view(B, H, N, T, d).permute(0, 2, 1, 3, 4)
