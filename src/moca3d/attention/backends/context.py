"""Explicit routed context of MoC attention (DESIGN.md §3, steps 3-4), shared by the gather backends.

For query component i and head h the keys are
    [W_k z_i ; o_ij W_k z_j for j in S_i^h ; o_ij W_k p_j for the other j]
(own z ungated, no own p, no anchors) and the values the same without the gate
(or gated, in the "value" ablation). Slots are laid out as 1 + k_max blocks of L_z latent
tokens, then N - 1 - k_min blocks of N_p compressed tokens; a sample whose k or N differs
from the batch's extremes masks its spare slots out.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from moca3d.attention.config import MoCAttentionConfig
from moca3d.attention.routing import Routing


def _scale(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x * g, in place when autograd does not need the unscaled x."""
    if torch.is_grad_enabled() and (x.requires_grad or g.requires_grad):
        return x * g
    return x.mul_(g)


def build_context(
    kz: torch.Tensor,
    vz: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    routing: Routing,
    config: MoCAttentionConfig,
    rows: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gather keys, values and key mask of the query components `rows` (flat b * N + i).

    kz, vz: (B, N, H, Lz, d); kp, vp: (B, N, H, Np, d); rows: (R,) long.
    Returns K, V: (R, H, Lg, d) and an additive mask (R, 1, 1, Lg) or None when all slots are used.
    """
    B, N, H, Lz, d = kz.shape
    Np = kp.shape[3]
    R = rows.numel()
    device = kz.device
    b, i = rows // N, rows % N  # (R,)
    order = routing.order.expand(B, H, N, N - 1)
    gate = routing.gate.expand(B, H, N, N)
    order_r = order[b, :, i]  # (R, H, N-1)
    gate_r = gate[b, :, i]  # (R, H, N)
    k_r = routing.num_routed[b].view(R, 1, 1)  # (R, 1, 1)
    head = torch.arange(H, device=device).view(1, H, 1)
    base = b.view(R, 1, 1) * N

    # Latent slots: own z, then the k_max highest-ranked others.
    k_max = routing.k_max
    z_comp = torch.cat([i.view(R, 1, 1).expand(R, H, 1), order_r[..., :k_max]], dim=-1)  # (R, H, 1+k_max)
    slot = torch.arange(1 + k_max, device=device).view(1, 1, -1)
    z_valid = (slot == 0) | (slot - 1 < k_r)  # (R, 1, 1+k_max)
    z_gate = torch.gather(gate_r, -1, z_comp)  # (R, H, 1+k_max)
    z_rows = ((base + z_comp) * H + head).reshape(-1)
    Kz = kz.reshape(B * N * H, Lz * d).index_select(0, z_rows).view(R, H, 1 + k_max, Lz, d)
    Vz = vz.reshape(B * N * H, Lz * d).index_select(0, z_rows).view(R, H, 1 + k_max, Lz, d)
    if config.gate == "key":
        Kz = _scale(Kz, z_gate[..., None, None].to(Kz.dtype))
    else:
        Vz = _scale(Vz, z_gate[..., None, None].to(Vz.dtype))
    keys, values, valid = [Kz.view(R, H, -1, d)], [Vz.view(R, H, -1, d)], [z_valid.repeat_interleave(Lz, dim=-1)]

    # Compressed slots: the remaining others, ranks k .. N-2 of each sample.
    num_p = N - 1 - routing.k_min if config.unselected == "compressed" else 0
    if num_p > 0 and Np > 0:
        rank = k_r + torch.arange(num_p, device=device).view(1, 1, -1)  # (R, 1, num_p)
        p_valid = rank < (routing.num_real[b].view(R, 1, 1) - 1)
        p_comp = torch.gather(order_r, -1, rank.clamp(max=N - 2).expand(R, H, num_p))  # (R, H, num_p)
        p_gate = torch.gather(gate_r, -1, p_comp)
        p_rows = ((base + p_comp) * H + head).reshape(-1)
        Kp = kp.reshape(B * N * H, Np * d).index_select(0, p_rows).view(R, H, num_p, Np, d)
        Vp = vp.reshape(B * N * H, Np * d).index_select(0, p_rows).view(R, H, num_p, Np, d)
        if config.gate == "key":
            Kp = _scale(Kp, p_gate[..., None, None].to(Kp.dtype))
        else:
            Vp = _scale(Vp, p_gate[..., None, None].to(Vp.dtype))
        keys.append(Kp.view(R, H, -1, d))
        values.append(Vp.view(R, H, -1, d))
        valid.append(p_valid.repeat_interleave(Np, dim=-1))

    K = torch.cat(keys, dim=2) if len(keys) > 1 else keys[0]  # (R, H, Lg, d)
    V = torch.cat(values, dim=2) if len(values) > 1 else values[0]
    valid_t = torch.cat(valid, dim=-1)  # (R, 1, Lg)
    mask = None
    if not bool(valid_t.all()):
        mask = torch.zeros(valid_t.shape, dtype=K.dtype, device=device)
        mask = mask.masked_fill(~valid_t, float("-inf")).unsqueeze(1)  # (R, 1, 1, Lg)
    return K, V, mask
