"""`chunked` backend: the reference context built a few components at a time.

Each chunk's keys and values are sized to stay in the CPU cache while SDPA reads them, so the
gather costs little beside the attention itself; the context is never materialised for all
components at once. Differentiable (index_select + SDPA), so it is the CPU training path too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moca3d.attention.backends.context import build_context
from moca3d.attention.config import MoCAttentionConfig
from moca3d.attention.routing import Routing


def rows_per_chunk(config: MoCAttentionConfig, heads: int, context_len: int, head_dim: int, itemsize: int) -> int:
    """Query components per chunk so that K and V of one chunk take about `chunk_bytes`."""
    per_row = 2 * heads * context_len * head_dim * itemsize
    return max(1, config.chunk_bytes // max(per_row, 1))


def moc_attention_chunked(q, kz, vz, kp, vp, routing: Routing, config: MoCAttentionConfig) -> torch.Tensor:
    """Same signature and result as `moc_attention_reference`, chunked over query components."""
    B, N, H, T, d = q.shape
    Lz, Np = kz.shape[3], kp.shape[3]
    k_max, k_min = routing.k_max, routing.k_min
    num_p = N - 1 - k_min if config.unselected == "compressed" else 0
    context_len = (1 + k_max) * Lz + num_p * Np
    step = rows_per_chunk(config, H, context_len, d, q.element_size())
    q_flat = q.reshape(B * N, H, T, d)
    outs = []
    for start in range(0, B * N, step):
        rows = torch.arange(start, min(start + step, B * N), device=q.device)
        K, V, mask = build_context(kz, vz, kp, vp, routing, config, rows)  # (R, H, Lg, d)
        outs.append(F.scaled_dot_product_attention(q_flat[start : start + rows.numel()], K, V, attn_mask=mask))
    return torch.cat(outs, dim=0).view(B, N, H, T, d)
