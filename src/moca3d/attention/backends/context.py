"""Explicit routed context of MoC attention (DESIGN.md §3, steps 3-4), shared by the gather backends.

For query component i and head h the keys are
    [W_k z_i ; o_ij W_k z_j for j in S_i^h ; o_ij W_k p_j for the other j]
(own z ungated, no own p, no anchors) and the values the same without the gate
(or gated, in the "value" ablation). Slots are laid out as 1 + k_max blocks of L_z latent
tokens, then N - 1 - k_min blocks of N_p compressed tokens; a sample whose k or N differs
from the batch's extremes masks its spare slots out.

Keys and values come in as k, v: (B, N, H, L_z + N_p, d), contiguous, so that the z and p
tokens of one (component, head) are adjacent in memory. The context is gathered in rows of
`unit = gcd(L_z, N_p)` tokens with a single index_select, which writes it straight into its
final (R, H, L_global, d) layout — no concatenation pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from moca3d.attention.config import MoCAttentionConfig
from moca3d.attention.routing import Routing

@dataclass
class ContextPlan:
    """Row indices, gates and validity of the routed context of some query components."""

    rows: torch.Tensor  # (R, H, n_rows) long: rows of the (B*N*H*(Lz+Np)/unit, unit*d) table
    comp: torch.Tensor  # (R, H, n_rows) long: the component each row comes from
    gate: torch.Tensor  # (R, H, n_rows) importance of each row's component (1 for own z)
    valid: Optional[torch.Tensor]  # (R, 1, n_rows) bool, None when every slot is used
    unit: int  # tokens per row
    context_len: int  # L_global

    def key_mask(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Additive (R, 1, 1, L_global) mask of unused slots, or None."""
        if self.valid is None:
            return None
        valid = self.valid.repeat_interleave(self.unit, dim=-1)  # (R, 1, Lg)
        mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))
        return mask.unsqueeze(1)


def row_unit(num_latent: int, num_compressed: int) -> int:
    """Tokens per gathered row: gcd(L_z, N_p) (= N_p when sigma divides L).

    A timestep token in the z group (L_z = L + 1) makes rows single tokens: still exact, but
    the gather then moves d floats at a time and is a few times slower.
    """
    return math.gcd(num_latent, num_compressed)


def plan_context(
    routing: Routing, config: MoCAttentionConfig, rows: torch.Tensor, heads: int, num_latent: int, num_compressed: int, unit: int
) -> ContextPlan:
    """Which table rows, with which gates, form the context of query components `rows` (b*N+i)."""
    B, _, N, _ = routing.gate.shape
    R, H, Lz, Np = rows.numel(), heads, num_latent, num_compressed
    device = rows.device
    b, i = rows // N, rows % N  # (R,)
    order_r = routing.order.expand(B, H, N, N - 1)[b, :, i]  # (R, H, N-1)
    gate_r = routing.gate.expand(B, H, N, N)[b, :, i]  # (R, H, N)
    k_r = routing.num_routed[b].view(R, 1, 1)
    head = torch.arange(H, device=device).view(1, H, 1)
    base = b.view(R, 1, 1) * N
    per_comp = (Lz + Np) // unit  # rows per (component, head) in the table
    zs, ps = Lz // unit, Np // unit

    # Latent slots: own z, then the k_max highest-ranked others.
    k_max = routing.k_max
    z_comp = torch.cat([i.view(R, 1, 1).expand(R, H, 1), order_r[..., :k_max]], dim=-1)  # (R, H, 1+k_max)
    slot = torch.arange(1 + k_max, device=device).view(1, 1, -1)
    z_valid = (slot == 0) | (slot - 1 < k_r)  # (R, 1, 1+k_max)
    z_start = ((base + z_comp) * H + head) * per_comp  # (R, H, 1+k_max)
    sub_z = torch.arange(zs, device=device)
    parts_rows = [(z_start.unsqueeze(-1) + sub_z).flatten(2)]  # (R, H, (1+k_max)*zs)
    parts_comp = [z_comp.repeat_interleave(zs, dim=-1)]
    parts_gate = [torch.gather(gate_r, -1, z_comp).repeat_interleave(zs, dim=-1)]
    parts_valid = [z_valid.repeat_interleave(zs, dim=-1)]
    context_len = (1 + k_max) * Lz

    # Compressed slots: the remaining others, ranks k .. N-2 of each sample.
    num_p = N - 1 - routing.k_min if (config.unselected == "compressed" and Np > 0) else 0
    if num_p > 0:
        rank = k_r + torch.arange(num_p, device=device).view(1, 1, -1)  # (R, 1, num_p)
        p_valid = rank < (routing.num_real[b].view(R, 1, 1) - 1)
        p_comp = torch.gather(order_r, -1, rank.clamp(max=N - 2).expand(R, H, num_p))  # (R, H, num_p)
        p_start = ((base + p_comp) * H + head) * per_comp + zs
        parts_rows.append((p_start.unsqueeze(-1) + torch.arange(ps, device=device)).flatten(2))
        parts_comp.append(p_comp.repeat_interleave(ps, dim=-1))
        parts_gate.append(torch.gather(gate_r, -1, p_comp).repeat_interleave(ps, dim=-1))
        parts_valid.append(p_valid.repeat_interleave(ps, dim=-1))
        context_len += num_p * Np

    valid = torch.cat(parts_valid, dim=-1)
    return ContextPlan(
        rows=torch.cat(parts_rows, dim=-1),
        comp=torch.cat(parts_comp, dim=-1),
        gate=torch.cat(parts_gate, dim=-1),
        valid=None if routing.uniform else valid,  # (decided on the host: no device sync)
        unit=unit,
        context_len=context_len,
    )


def gather_rows(table: torch.Tensor, plan: ContextPlan, gate: bool) -> torch.Tensor:
    """(B, N, H, Lz+Np, d) keys or values -> (R, H, L_global, d) context, gated if `gate`."""
    d = table.shape[-1]
    R, H, n_rows = plan.rows.shape
    flat = table.view(-1, plan.unit * d)  # rows of `unit` tokens
    out = flat.index_select(0, plan.rows.reshape(-1)).view(R, H, n_rows, plan.unit * d)
    if gate:
        g = plan.gate.to(out.dtype).unsqueeze(-1)
        out = out * g if (torch.is_grad_enabled() and (out.requires_grad or g.requires_grad)) else out.mul_(g)
    return out.view(R, H, plan.context_len, d)


def build_context(k: torch.Tensor, v: torch.Tensor, num_latent: int, routing: Routing, config: MoCAttentionConfig, rows: torch.Tensor):
    """Keys, values (R, H, L_global, d) and additive key mask (R, 1, 1, L_global) or None."""
    B, N, H, S, d = k.shape
    num_compressed = S - num_latent
    plan = plan_context(routing, config, rows, H, num_latent, num_compressed, row_unit(num_latent, num_compressed))
    K = gather_rows(k, plan, gate=config.gate == "key")
    V = gather_rows(v, plan, gate=config.gate == "value")
    return K, V, plan.key_mask(K.dtype)
