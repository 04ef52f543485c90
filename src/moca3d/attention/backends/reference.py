"""`reference` backend: gather every (component, head) context explicitly, then one SDPA.

The oracle for the fast backends: easy to read, memory O(B * N * H * L_global * d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moca3d.attention.backends.context import build_context
from moca3d.attention.config import MoCAttentionConfig
from moca3d.attention.routing import Routing


def moc_attention_reference(q, k, v, num_latent: int, routing: Routing, config: MoCAttentionConfig) -> torch.Tensor:
    """q: (B, N, H, T, d); k, v: (B, N, H, Lz+Np, d) -> (B, N, H, T, d)."""
    B, N, H, T, d = q.shape
    rows = torch.arange(B * N, device=q.device)
    K, V, mask = build_context(k, v, num_latent, routing, config, rows)  # (BN, H, Lg, d)
    out = F.scaled_dot_product_attention(q.reshape(B * N, H, T, d), K, V, attn_mask=mask)
    return out.view(B, N, H, T, d)
