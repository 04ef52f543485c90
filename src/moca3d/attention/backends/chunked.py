"""`chunked` backend: the reference context built a few components at a time.

Each chunk's keys and values are sized to stay in the CPU cache while SDPA reads them, so the
gather costs little beside the attention itself, and the context is never materialised for
all components at once. In training a custom autograd function recomputes each chunk's
context in the backward pass (flash-style) and scatters the gradients straight into dk, dv
and the router's gate, so memory stays O(chunk) and the CPU has a differentiable fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moca3d.attention.backends.context import ContextPlan, gather_rows, plan_context, row_unit
from moca3d.attention.config import MoCAttentionConfig
from moca3d.attention.routing import Routing


def rows_per_chunk(config: MoCAttentionConfig, heads: int, context_len: int, head_dim: int, itemsize: int) -> int:
    """Query components per chunk so that K and V of one chunk take about `chunk_bytes`."""
    per_row = 2 * heads * context_len * head_dim * itemsize
    return max(1, config.chunk_bytes // max(per_row, 1))


def _chunks(q, k, num_latent: int, routing: Routing, config: MoCAttentionConfig):
    """Yield (start, stop, plan) over query components b*N+i."""
    B, N, H, T, d = q.shape
    num_compressed = k.shape[3] - num_latent
    unit = row_unit(num_latent, num_compressed)
    num_p = N - 1 - routing.k_min if (config.unselected == "compressed" and num_compressed) else 0
    context_len = (1 + routing.k_max) * num_latent + num_p * num_compressed
    step = rows_per_chunk(config, H, context_len, d, q.element_size())
    for start in range(0, B * N, step):
        stop = min(start + step, B * N)
        rows = torch.arange(start, stop, device=q.device)
        yield start, stop, plan_context(routing, config, rows, H, num_latent, num_compressed, unit)


def _attend(q_rows, k, v, plan: ContextPlan, config: MoCAttentionConfig) -> torch.Tensor:
    K = gather_rows(k, plan, gate=config.gate == "key")  # (R, H, Lg, d)
    V = gather_rows(v, plan, gate=config.gate == "value")
    return F.scaled_dot_product_attention(q_rows, K, V, attn_mask=plan.key_mask(K.dtype))


class _ChunkedMoCAttention(torch.autograd.Function):
    """Chunked MoC attention with a recomputing backward; gradients for q, k, v and the gate."""

    @staticmethod
    def forward(ctx, q, k, v, gate, num_latent, routing, config):
        B, N, H, T, d = q.shape
        q_flat = q.reshape(B * N, H, T, d)
        out = torch.empty_like(q_flat)
        for start, stop, plan in _chunks(q, k, num_latent, routing, config):
            out[start:stop] = _attend(q_flat[start:stop], k, v, plan, config)
        ctx.save_for_backward(q, k, v, gate)
        ctx.num_latent, ctx.routing, ctx.config = num_latent, routing, config
        return out.view(B, N, H, T, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, gate = ctx.saved_tensors
        config, num_latent = ctx.config, ctx.num_latent
        # The routing object holds a gate with its own graph; plan only from detached values.
        routing = ctx.routing
        routing = Routing(gate.detach(), routing.order, routing.num_routed, routing.num_real, routing.component_mask, routing.counts)
        B, N, H, T, d = q.shape
        Hr = gate.shape[1]
        q_flat, g_flat = q.reshape(B * N, H, T, d), grad_out.reshape(B * N, H, T, d)
        dq = torch.empty_like(q_flat)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dgate = torch.zeros(B, H, N, N, dtype=torch.float32, device=q.device)
        for start, stop, plan in _chunks(q, k, num_latent, routing, config):
            R, _, n_rows = plan.rows.shape
            unit = plan.unit
            idx = plan.rows.reshape(-1)
            with torch.enable_grad():
                qc = q_flat[start:stop].detach().requires_grad_(True)
                k_raw = k.view(-1, unit * d).index_select(0, idx).view(R, H, n_rows, unit * d).requires_grad_(True)
                v_raw = v.view(-1, unit * d).index_select(0, idx).view(R, H, n_rows, unit * d).requires_grad_(True)
                g = plan.gate.to(q.dtype).unsqueeze(-1).requires_grad_(True)  # (R, H, n_rows, 1)
                K = k_raw * g if config.gate == "key" else k_raw
                V = v_raw * g if config.gate == "value" else v_raw
                o = F.scaled_dot_product_attention(
                    qc, K.view(R, H, plan.context_len, d), V.view(R, H, plan.context_len, d), attn_mask=plan.key_mask(q.dtype)
                )
                dqc, dk_raw, dv_raw, dg = torch.autograd.grad(o, (qc, k_raw, v_raw, g), g_flat[start:stop])
            dq[start:stop] = dqc
            dk.view(-1, unit * d).index_add_(0, idx, dk_raw.reshape(-1, unit * d))
            dv.view(-1, unit * d).index_add_(0, idx, dv_raw.reshape(-1, unit * d))
            # gate rows -> (b, h, i, j) entries of the importance matrix
            rows = torch.arange(start, stop, device=q.device)
            b, i = (rows // N).view(R, 1, 1), (rows % N).view(R, 1, 1)
            head = torch.arange(H, device=q.device).view(1, H, 1)
            target = ((b * H + head) * N + i) * N + plan.comp  # (R, H, n_rows)
            dgate.view(-1).index_add_(0, target.reshape(-1), dg.reshape(-1).float())
        if Hr == 1:
            dgate = dgate.sum(dim=1, keepdim=True)
        return dq.view_as(q), dk, dv, dgate.to(gate.dtype), None, None, None


def moc_attention_chunked(q, k, v, num_latent: int, routing: Routing, config: MoCAttentionConfig) -> torch.Tensor:
    """Same signature and result as `moc_attention_reference`, chunked over query components."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, routing.gate)):
        return _ChunkedMoCAttention.apply(q, k, v, routing.gate, num_latent, routing, config)
    B, N, H, T, d = q.shape
    q_flat = q.reshape(B * N, H, T, d)
    out = torch.empty_like(q_flat)
    for start, stop, plan in _chunks(q, k, num_latent, routing, config):
        out[start:stop] = _attend(q_flat[start:stop], k, v, plan, config)
    return out.view(B, N, H, T, d)
