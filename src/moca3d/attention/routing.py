"""The MoC router: anchor-token importance o_ij and per-head routing (DESIGN.md §3, steps 1-2).

Routing is a handful of (N x N)-sized tensor ops per head — one matmul, a sigmoid, one sort —
never token-sized sorting or indexing, so it stays a small fraction of the attention time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from moca3d.attention.config import MoCAttentionConfig


@dataclass
class Routing:
    """Who each component attends to in full, and with what importance."""

    gate: torch.Tensor  # (B, Hr, N, N) importance o_ij; 1 on the diagonal, 0 towards padding
    order: torch.Tensor  # (B, Hr, N, N-1) long: the other components of i, routed first
    num_routed: torch.Tensor  # (B,) long: k of each sample
    num_real: torch.Tensor  # (B,) long: real (unpadded) components of each sample
    component_mask: Optional[torch.Tensor] = None  # (B, N) bool, True = real; None = all real
    # the same counts on the host, so that shapes are decided without a device sync (one per block on a GPU)
    counts: Optional[tuple[tuple[int, int], ...]] = None  # ((k, n_real) per sample)

    def _counts(self) -> tuple[tuple[int, int], ...]:
        if self.counts is None:  # built by hand: read once from the device
            self.counts = tuple(zip(self.num_routed.tolist(), self.num_real.tolist()))
        return self.counts

    @property
    def k_max(self) -> int:
        return max((k for k, _ in self._counts()), default=0)

    @property
    def k_min(self) -> int:
        return min((k for k, _ in self._counts()), default=0)

    @property
    def uniform(self) -> bool:
        """Every sample has all N components real and the same k: no context slot is padding."""
        N = self.gate.shape[-1]
        return all(n == N for _, n in self._counts()) and self.k_max == self.k_min

    def routed_mask(self) -> torch.Tensor:
        """(B, Hr, N, N) bool: True where j is in S_i (routed to i in full)."""
        B, Hr, N, _ = self.gate.shape
        rank = torch.arange(N - 1, device=self.order.device)
        chosen = rank.view(1, 1, 1, -1) < self.num_routed.view(B, 1, 1, 1)  # (B, 1, 1, N-1)
        mask = torch.zeros(B, Hr, N, N, dtype=torch.bool, device=self.order.device)
        return mask.scatter_(3, self.order, chosen.expand_as(self.order))

    def real_mask(self) -> torch.Tensor:
        """(B, N) bool: True for real components."""
        B, _, N, _ = self.gate.shape
        if self.component_mask is None:
            return torch.ones(B, N, dtype=torch.bool, device=self.gate.device)
        return self.component_mask


def routing_counts(config: MoCAttentionConfig, component_mask: Optional[torch.Tensor], batch: int, n: int,
                   device) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, int], ...]]:
    """k and the real component count of each sample: (B,) long tensors on `device` and ((k, n_real), ...) on the host.
    Without a mask (every component real) nothing is read back from the device."""
    if component_mask is None:  # one value each: filled on the device, no host-to-device copy
        k = config.num_routed(n)
        return (torch.full((batch,), k, dtype=torch.long, device=device),
                torch.full((batch,), n, dtype=torch.long, device=device), ((k, n),) * batch)
    num_real = component_mask.sum(dim=1).long()  # (B,)
    counts = tuple((config.num_routed(r), r) for r in num_real.tolist())
    ks = torch.tensor([k for k, _ in counts], dtype=torch.long).to(device, non_blocking=True)
    return ks, num_real, counts


class Router(nn.Module):
    """Anchor-token router: o_ij^h = sigmoid(Qbar_i^h . Kbar_j^h / sqrt(d)) (or softmax over j)."""

    def __init__(self, config: MoCAttentionConfig):
        super().__init__()
        self.config = config
        self.heads = config.router_heads
        self.to_q = nn.Linear(config.dim, config.dim)
        self.to_k = nn.Linear(config.dim, config.dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.to_q, self.to_k):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def importance(self, anchors: torch.Tensor, component_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N, D) anchor tokens -> (B, Hr, N, N) importance o_ij, diagonal 1, padded j 0."""
        B, N, D = anchors.shape
        Hr = self.heads
        q = self.to_q(anchors).view(B, N, Hr, D // Hr).transpose(1, 2)  # (B, Hr, N, dr)
        k = self.to_k(anchors).view(B, N, Hr, D // Hr).transpose(1, 2)  # (B, Hr, N, dr)
        logits = q @ k.transpose(-1, -2) * (D // Hr) ** -0.5  # (B, Hr, N, N)
        eye = torch.eye(N, dtype=torch.bool, device=anchors.device)
        blocked = eye.view(1, 1, N, N)
        if component_mask is not None:
            blocked = blocked | ~component_mask.view(B, 1, 1, N)
        if self.config.router == "sigmoid":
            o = torch.sigmoid(logits).masked_fill(blocked, 0.0)
        else:  # softmax over the other real components
            o = torch.softmax(logits.masked_fill(blocked, float("-inf")), dim=-1)
            o = torch.nan_to_num(o, nan=0.0)  # a sample with one component has no others
        return o.masked_fill(eye.view(1, 1, N, N), 1.0)

    def forward(
        self,
        anchors: torch.Tensor,
        component_mask: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        seeds: Optional[Sequence[int]] = None,
        tie_order: Optional[torch.Tensor] = None,
    ) -> Routing:
        """(B, N, D) anchors -> Routing: top-k at eval, sampling without replacement in training."""
        gate = self.importance(anchors, component_mask)
        sample = self.training and self.config.train_routing == "sample"
        return route(gate, self.config, component_mask, sample=sample, generator=generator, seeds=seeds, tie_order=tie_order)


def tie_breaking_order(ids: torch.Tensor) -> torch.Tensor:
    """(B, N) component IDs -> (B, N) the component indices in ID order: the routing's order among equal importances."""
    return torch.argsort(ids, dim=1, stable=True)


def route(
    gate: torch.Tensor,
    config: MoCAttentionConfig,
    component_mask: Optional[torch.Tensor] = None,
    sample: bool = False,
    generator: Optional[torch.Generator] = None,
    seeds: Optional[Sequence[int]] = None,
    tie_order: Optional[torch.Tensor] = None,
) -> Routing:
    """Rank the other components of each (i, h) by importance; the first k are routed. Equal importances rank in
    `tie_order` (B, N), the components in the order of their IDs (`tie_breaking_order`): a permutation of the
    components then permutes the routing with them; without it, in index order.

    With `sample`, the ranking is a draw without replacement from o_ij / sum_j o_ij (the
    Gumbel-top-k trick: argsort of log o + Gumbel noise), so its first k entries are k draws
    without replacement; otherwise it is the deterministic top-k. `seeds` (one per sample) make
    each sample's draw independent of the rest of the batch (same routing on any process split).
    """
    B, Hr, N, _ = gate.shape
    device = gate.device
    num_routed, num_real, counts = routing_counts(config, component_mask, B, N, device)
    with torch.no_grad():
        score = gate.detach().float()
        if sample:
            if seeds is not None:
                u = torch.stack([torch.rand(score.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
                u = u.to(device).clamp_(1e-12, 1 - 1e-7)
            else:
                u = torch.rand(score.shape, device=device, generator=generator).clamp_(1e-12, 1 - 1e-7)
            gumbel = -torch.log(-torch.log(u))
            score = torch.log(score.clamp_min(1e-30)) + gumbel
        # Padded components rank after every real one, the diagonal after everything.
        if component_mask is not None:
            score = score.masked_fill(~component_mask.view(B, 1, 1, N), torch.finfo(score.dtype).min)
        eye = torch.eye(N, dtype=torch.bool, device=device).view(1, 1, N, N)
        score = score.masked_fill(eye, float("-inf"))
        if tie_order is None:
            order = torch.argsort(score, dim=-1, descending=True, stable=True)[..., : N - 1]  # (B, Hr, N, N-1)
        else:  # a stable sort of the columns laid out in tie order: equal scores keep that order
            columns = tie_order.view(B, 1, 1, N).expand(B, score.shape[1], N, N)
            ranked = torch.argsort(score.gather(-1, columns), dim=-1, descending=True, stable=True)
            order = columns.gather(-1, ranked)[..., : N - 1]  # (B, Hr, N, N-1)
    return Routing(gate=gate, order=order, num_routed=num_routed, num_real=num_real, component_mask=component_mask, counts=counts)
