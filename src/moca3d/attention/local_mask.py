"""The local block's partially blocked causal mask and the attention it defines (DESIGN.md §3).

Within one component the tokens are [z (n_z) ; p (n_p) ; anchor (1)]:
z sees z only (a pretrained shape prior is untouched), p sees z and p, the anchor sees all.
Because every group sees a prefix of the sequence, the masked attention splits exactly into
three unmasked attentions over key prefixes, which is the fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_mask(num_latent: int, num_compressed: int, device=None) -> torch.Tensor:
    """(T, T) bool, True where query token may attend key token; T = n_z + n_p + 1."""
    T = num_latent + num_compressed + 1
    group = torch.zeros(T, dtype=torch.long, device=device)  # 0 = z, 1 = p, 2 = anchor
    group[num_latent : num_latent + num_compressed] = 1
    group[-1] = 2
    q_group, k_group = group.view(T, 1), group.view(1, T)
    return (k_group == 0) | ((k_group == 1) & (q_group >= 1)) | ((k_group == 2) & (q_group == 2))


def local_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_latent: int, num_compressed: int) -> torch.Tensor:
    """Reference: one SDPA with the explicit local mask. q, k, v: (..., H, T, d)."""
    mask = local_mask(num_latent, num_compressed, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_latent: int, num_compressed: int) -> torch.Tensor:
    """Fast path: z over z, p over [z; p], anchor over all — three unmasked SDPAs. (R, H, T, d)."""
    nz, npc = num_latent, num_compressed
    out_z = F.scaled_dot_product_attention(q[:, :, :nz], k[:, :, :nz], v[:, :, :nz])  # (R, H, nz, d)
    parts = [out_z]
    if npc:
        parts.append(F.scaled_dot_product_attention(q[:, :, nz:-1], k[:, :, :-1], v[:, :, :-1]))  # (R, H, np, d)
    parts.append(F.scaled_dot_product_attention(q[:, :, -1:], k, v))  # (R, H, 1, d)
    return torch.cat(parts, dim=2)  # (R, H, T, d)
