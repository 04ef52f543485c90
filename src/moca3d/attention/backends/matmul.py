"""`matmul` backend: the routed context as a product with a sparse-in-content, dense-in-storage
selection matrix, then one SDPA call with the components as its heads.

The same context as `reference` (context.plan_context), built differently. For every sample b
and head h, the table of key rows (N components x (L_z + N_p)/unit rows of `unit` tokens) is
multiplied by a selection matrix S (N * n_rows, N * rows_per_component) holding the gate o_ij at
the one row it copies and 0 elsewhere:

    K[b, h] = S_gated[b, h] @ table_k[b, h]        V[b, h] = S[b, h] @ table_v[b, h]

The forward costs a few percent of the attention's FLOPs; its gain is the backward: autograd
turns it into two more matrix products (dtable = S^T dK, dS = dK table^T, which carries the
gradient to the router), where an index gather's backward is an atomic scatter-add over the
whole context, the slowest step of `reference` training on a GPU. The context comes out in
(B, H, N, L_global, d) order, so SDPA sees (B * H) batches of N "heads" with no copy of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moca3d.attention.backends.context import plan_context, row_unit
from moca3d.attention.config import MoCAttentionConfig
from moca3d.attention.routing import Routing


def selection_matrices(routing: Routing, config: MoCAttentionConfig, B: int, N: int, H: int, num_latent: int, num_compressed: int, dtype):
    """Selection S (B, H, N * n_rows, N * per) with and without gates, the key mask, and the row unit."""
    unit = row_unit(num_latent, num_compressed)
    per = (num_latent + num_compressed) // unit  # table rows per component
    rows = torch.arange(B * N, device=routing.gate.device)
    plan = plan_context(routing, config, rows, H, num_latent, num_compressed, unit)
    n_rows = plan.rows.shape[-1]
    local = plan.comp * per + plan.rows % per  # (R, H, n_rows): row r of component j in the (b, h) table, j*per + r
    onehot = F.one_hot(local, N * per).to(dtype)  # (R, H, n_rows, N*per)
    onehot = onehot.view(B, N, H, n_rows, N * per).transpose(1, 2).reshape(B, H, N * n_rows, N * per)
    gate = plan.gate.to(dtype).view(B, N, H, n_rows).transpose(1, 2).reshape(B, H, N * n_rows, 1)
    gated = onehot * gate  # (B, H, N*n_rows, N*per): gradients reach the router through here
    mask = plan.key_mask(dtype)  # (B*N, 1, 1, Lg) or None
    if mask is not None:
        mask = mask.view(B, 1, N, 1, plan.context_len).expand(B, H, N, 1, plan.context_len).reshape(B * H, N, 1, plan.context_len)
    return onehot, gated, mask, unit, plan.context_len


def moc_attention_matmul(q, k, v, num_latent: int, routing: Routing, config: MoCAttentionConfig) -> torch.Tensor:
    """q: (B, N, H, T, d); k, v: (B, N, H, Lz+Np, d) -> (B, N, H, T, d)."""
    B, N, H, T, d = q.shape
    S_len = k.shape[3]
    plain, gated, mask, unit, context_len = selection_matrices(routing, config, B, N, H, num_latent, S_len - num_latent, q.dtype)
    per = S_len // unit

    def context(table: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        rows = table.transpose(1, 2).reshape(B, H, N * per, unit * d)  # (B, H, N*per, unit*d)
        return (select @ rows).view(B * H, N, context_len, d)  # (B*H, N, Lg, d)

    K = context(k, gated if config.gate == "key" else plain)
    V = context(v, gated if config.gate == "value" else plain)
    qh = q.transpose(1, 2).reshape(B * H, N, T, d)  # (B*H, N, T, d): components as SDPA heads
    out = F.scaled_dot_product_attention(qh, K, V, attn_mask=mask)  # (B*H, N, T, d)
    return out.view(B, H, N, T, d).transpose(1, 2).contiguous()  # (B, N, H, T, d)
