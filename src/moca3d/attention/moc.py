"""Mixture-of-Components attention layers (DESIGN.md §3): the local and the global (MoC) block.

Tokens of a batch are laid out as x: (B, N, T, D), component i holding
[z_i (L_z latent tokens, timestep token included) ; p_i (N_p compressed) ; pbar_i (1 anchor)].
`component_mask` (B, N) marks real components, so one batch can mix objects of 2 and 32 parts.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from moca3d.attention.backends import BACKENDS, dense_global_attention, select_backend
from moca3d.attention.config import MoCAttentionConfig
from moca3d.attention.local_mask import local_attention
from moca3d.attention.routing import Router, Routing
from moca3d.errors import InputError


class ComponentAttention(nn.Module):
    """Q/K/V/output projections with optional per-head QK RMSNorm, shared by both blocks."""

    def __init__(self, config: MoCAttentionConfig):
        super().__init__()
        self.config = config
        D, d = config.dim, config.head_dim
        self.to_q = nn.Linear(D, D, bias=config.qkv_bias)
        self.to_k = nn.Linear(D, D, bias=config.qkv_bias)
        self.to_v = nn.Linear(D, D, bias=config.qkv_bias)
        self.to_out = nn.Linear(D, D)
        self.norm_q = nn.RMSNorm(d, eps=1e-6) if config.qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(d, eps=1e-6) if config.qk_norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.to_q, self.to_k, self.to_v, self.to_out):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, n, D) -> (B, N, H, n, d), contiguous."""
        B, N, n, _ = t.shape
        H, d = self.config.num_heads, self.config.head_dim
        return t.view(B, N, n, H, d).transpose(2, 3).contiguous()

    def project(self, x: torch.Tensor, num_keys: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, T, D) -> q (B, N, H, T, d) and k, v over the first `num_keys` tokens."""
        xk = x if num_keys is None else x[:, :, :num_keys]
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(xk)))
        v = self._heads(self.to_v(xk))
        return q, k, v

    def output(self, out: torch.Tensor, component_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, N, H, T, d) -> (B, N, T, D), projected; padded components give zeros."""
        B, N, H, T, d = out.shape
        y = self.to_out(out.transpose(2, 3).reshape(B, N, T, H * d))
        if component_mask is not None:
            y = y * component_mask.view(B, N, 1, 1).to(y.dtype)
        return y


def _check_layout(x: torch.Tensor, num_compressed: int, component_mask: Optional[torch.Tensor]) -> int:
    """Validate (B, N, T, D) input; return L_z, the latent-group length."""
    if x.dim() != 4:
        raise InputError(f"expected tokens of shape (B, N, T, D), got {tuple(x.shape)}")
    B, N, T, _ = x.shape
    num_latent = T - num_compressed - 1
    if num_latent < 1 or num_compressed < 0:
        raise InputError(f"{T} tokens per component cannot hold {num_compressed} compressed tokens, an anchor and latents")
    if component_mask is not None and tuple(component_mask.shape) != (B, N):
        raise InputError(f"component_mask must have shape {(B, N)}, got {tuple(component_mask.shape)}")
    return num_latent


class LocalAttention(ComponentAttention):
    """Attention within each component under the partially blocked causal mask."""

    def forward(self, x: torch.Tensor, num_compressed: int, component_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N, T, D) -> (B, N, T, D)."""
        num_latent = _check_layout(x, num_compressed, component_mask)
        B, N, T, D = x.shape
        q, k, v = self.project(x)  # (B, N, H, T, d)
        H, d = q.shape[2], q.shape[4]
        out = local_attention(q.view(B * N, H, T, d), k.view(B * N, H, T, d), v.view(B * N, H, T, d), num_latent, num_compressed)
        return self.output(out.view(B, N, H, T, d), component_mask)


class MoCAttention(ComponentAttention):
    """The global block: Mixture-of-Components attention (or the dense / local-only baselines)."""

    def __init__(self, config: MoCAttentionConfig):
        super().__init__(config)
        self.router = Router(config) if config.mode == "moc" else None

    def route(
        self, x: torch.Tensor, component_mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
        seeds: Optional[Sequence[int]] = None, tie_order: Optional[torch.Tensor] = None,
    ) -> Routing:
        """Routing of (B, N, T, D) tokens from their anchors (the last token of each component)."""
        return self.router(x[:, :, -1], component_mask, generator, seeds, tie_order)

    def forward(
        self,
        x: torch.Tensor,
        num_compressed: int,
        component_mask: Optional[torch.Tensor] = None,
        routing: Optional[Routing] = None,
        return_routing: bool = False,
        generator: Optional[torch.Generator] = None,
        seeds: Optional[Sequence[int]] = None,
        tie_order: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Optional[Routing]]]:
        """(B, N, T, D) -> (B, N, T, D); optionally also the Routing used (`route`'s seeds and tie_order)."""
        num_latent = _check_layout(x, num_compressed, component_mask)
        B, N, T, D = x.shape
        mode = self.config.mode
        if mode == "none":
            q, k, v = self.project(x)
            H, d = q.shape[2], q.shape[4]
            out = local_attention(q.view(B * N, H, T, d), k.view(B * N, H, T, d), v.view(B * N, H, T, d), num_latent, num_compressed)
            out = out.view(B, N, H, T, d)
        else:
            q, k, v = self.project(x, num_keys=num_latent + num_compressed)  # k, v: (B, N, H, Lz+Np, d)
            if mode == "dense":
                out = dense_global_attention(q, k, v, num_latent, component_mask)
            else:
                if routing is None:
                    routing = self.route(x, component_mask, generator, seeds, tie_order)
                backend = select_backend(self.config, x.device)
                out = BACKENDS[backend](q, k, v, num_latent, routing, self.config)
        y = self.output(out, component_mask)
        return (y, routing) if return_routing else y
