"""`blocksparse` backend: one flex_attention call with a block mask built from the routing.

No context copies: queries are all tokens of all components, keys are all z tokens then all
p tokens, and a (query block, key block) pair is computed only when the routing keeps it. The
gate o_ij multiplies the score (key gating) through `score_mod`, so gradients reach the router.

Sequence layout per sample, every group padded to a multiple of the block size `bs` so that
each z or p block belongs to one component:
    queries: [z of comp 0 .. N-1 (Lzp each) ; p of comp 0 .. N-1 (Npp each) ; anchors (Na)]
    keys   : [z of comp 0 .. N-1 (Lzp each) ; p of comp 0 .. N-1 (Npp each)]
Anchor query blocks hold up to `bs` components and are evaluated with the exact mask_mod.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from moca3d.attention.config import MoCAttentionConfig
from moca3d.attention.routing import Routing
from moca3d.errors import ConfigError

try:  # flex_attention needs torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    HAS_FLEX = True
except ImportError:  # pragma: no cover - exercised only on old torch
    HAS_FLEX = False

_COMPILED = {}


def default_block_size(latent_len: int, num_compressed: int, device: torch.device) -> int:
    """Largest power of two (16..128, 64 on CPU) dividing both L and L/sigma, else 16 with padding."""
    cap = 128 if device.type == "cuda" else 64
    g = math.gcd(latent_len, num_compressed) if num_compressed else latent_len
    bs = cap
    while bs > 16 and g % bs:
        bs //= 2
    return bs


_EAGER_QUIETED = []  # non-empty once torch's once-a-process advice to compile eager flex_attention has been silenced


def _eager_flex(*args, **kwargs) -> torch.Tensor:
    """flex_attention unfused (differentiable on the CPU; chosen on purpose), without torch's multi-line advice to compile
    (torch gives it once a process: only the first call is wrapped, the others run as they are)."""
    if _EAGER_QUIETED:
        return flex_attention(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)
        out = flex_attention(*args, **kwargs)
    _EAGER_QUIETED.append(True)
    return out


def _flex(compiled: bool):
    """flex_attention, compiled once (CUDA) or eager."""
    if not compiled:
        return _eager_flex
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim 3 (tokens) of (B, N, H, n, d) with zeros to `length`."""
    n = x.shape[3]
    return x if n == length else F.pad(x, (0, 0, 0, length - n))


def _sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, N, H, n, d) -> (B, H, N*n, d)."""
    B, N, H, n, d = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(B, H, N * n, d)


def _dense_to_indices(blocks: torch.Tensor):
    """(B, H, QB, KB) bool -> (counts int32 (B, H, QB), indices int32 (B, H, QB, KB))."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, indices


def moc_attention_blocksparse(
    q, k, v, num_latent: int, routing: Routing, config: MoCAttentionConfig, compiled: Optional[bool] = None
) -> torch.Tensor:
    """Same signature and result as `moc_attention_reference`, as one block-sparse attention."""
    if not HAS_FLEX:
        raise ConfigError("the blocksparse backend needs torch >= 2.5 (flex_attention)")
    if config.gate != "key":
        raise ConfigError("the blocksparse backend supports key gating only; use backend='chunked' for gate='value'")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, routing.gate))
    if q.device.type == "cpu" and needs_grad:
        raise ConfigError("flex_attention has no backward on the CPU: run inference under torch.no_grad() (or "
                          "torch.inference_mode()), and train with backend='chunked' (the CPU default)")
    B, N, H, T, d = q.shape
    Lz, Np = num_latent, k.shape[3] - num_latent
    kz, kp, vz, vp = k[:, :, :, :Lz], k[:, :, :, Lz:], v[:, :, :, :Lz], v[:, :, :, Lz:]
    device = q.device
    bs = config.block_size or default_block_size(Lz, Np, device)
    Lzp, Npp, Na = -(-Lz // bs) * bs, -(-Np // bs) * bs, -(-N // bs) * bs
    compress = config.unselected == "compressed" and Np > 0

    # Sequences.
    q_seq = torch.cat(
        [
            _sequence(_pad_tokens(q[:, :, :, :Lz], Lzp)),
            _sequence(_pad_tokens(q[:, :, :, Lz : Lz + Np], Npp)),
            F.pad(q[:, :, :, -1].permute(0, 2, 1, 3), (0, 0, 0, Na - N)),  # (B, H, Na, d)
        ],
        dim=2,
    )  # (B, H, Qlen, d)
    k_seq = torch.cat([_sequence(_pad_tokens(kz, Lzp)), _sequence(_pad_tokens(kp, Npp))], dim=2)  # (B, H, KVlen, d)
    v_seq = torch.cat([_sequence(_pad_tokens(vz, Lzp)), _sequence(_pad_tokens(vp, Npp))], dim=2)
    Qlen, KVlen = q_seq.shape[2], k_seq.shape[2]

    # Token tables.
    comps = torch.arange(N, device=device)
    q_comp = torch.cat([comps.repeat_interleave(Lzp), comps.repeat_interleave(Npp), torch.arange(Na, device=device).clamp(max=N - 1)])
    kv_comp = torch.cat([comps.repeat_interleave(Lzp), comps.repeat_interleave(Npp)])
    kv_is_z = torch.cat([torch.ones(N * Lzp, dtype=torch.bool, device=device), torch.zeros(N * Npp, dtype=torch.bool, device=device)])
    pos_z, pos_p = torch.arange(Lzp, device=device).repeat(N), torch.arange(Npp, device=device).repeat(N)
    kv_valid = torch.cat([pos_z < Lz, pos_p < Np])

    # Component-level permissions: A_z[b, h, i, j] (z_j visible to i), A_p (p_j visible to i).
    routed = routing.routed_mask().expand(B, H, N, N).contiguous()
    gate = routing.gate.expand(B, H, N, N).contiguous()
    real = routing.real_mask().view(B, 1, 1, N)
    eye = torch.eye(N, dtype=torch.bool, device=device).view(1, 1, N, N)
    allow_z = real & (eye | routed)  # (B, H, N, N)
    allow_p = real & ~eye & ~routed & compress

    def mask_mod(b, h, q_idx, kv_idx):
        ci, cj = q_comp[q_idx], kv_comp[kv_idx]
        z = kv_is_z[kv_idx]
        return kv_valid[kv_idx] & ((z & allow_z[b, h, ci, cj]) | (~z & allow_p[b, h, ci, cj]))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * gate[b, h, q_comp[q_idx], kv_comp[kv_idx]]

    # Block mask, built directly from the routing (no dense mask evaluation).
    zb, pb = Lzp // bs, Npp // bs
    kb_comp = torch.cat([comps.repeat_interleave(zb), comps.repeat_interleave(pb)])  # (KB,)
    kb_is_z = torch.cat([torch.ones(N * zb, dtype=torch.bool, device=device), torch.zeros(N * pb, dtype=torch.bool, device=device)])
    kb_padded = torch.cat([(torch.arange(zb, device=device) == zb - 1).repeat(N) & (Lz % bs != 0), (torch.arange(pb, device=device) == pb - 1).repeat(N) & (Np % bs != 0)])
    qb_comp = torch.cat([comps.repeat_interleave(zb), comps.repeat_interleave(pb)])  # pure query blocks

    pure_z = allow_z.index_select(2, qb_comp).index_select(3, kb_comp)  # (B, H, QBp, KB)
    pure_p = allow_p.index_select(2, qb_comp).index_select(3, kb_comp)
    pure = torch.where(kb_is_z.view(1, 1, 1, -1), pure_z, pure_p)
    # Anchor blocks: union over the components they hold.
    pad_rows = Na - N
    anchor_z = F.pad(allow_z, (0, 0, 0, pad_rows)).view(B, H, Na // bs, bs, N).any(dim=3)  # (B, H, Na/bs, N)
    anchor_p = F.pad(allow_p, (0, 0, 0, pad_rows)).view(B, H, Na // bs, bs, N).any(dim=3)
    anchor = torch.where(kb_is_z.view(1, 1, 1, -1), anchor_z.index_select(3, kb_comp), anchor_p.index_select(3, kb_comp))
    full = torch.cat([pure & ~kb_padded.view(1, 1, 1, -1), torch.zeros_like(anchor)], dim=2)
    partial = torch.cat([pure & kb_padded.view(1, 1, 1, -1), anchor], dim=2)
    kv_num, kv_idx = _dense_to_indices(partial)
    full_num, full_idx = _dense_to_indices(full)
    block_mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(Qlen, KVlen)
    )

    if compiled is None:
        compiled = device.type == "cuda"
    out = _flex(compiled)(q_seq, k_seq, v_seq, score_mod=score_mod, block_mask=block_mask)  # (B, H, Qlen, d)

    # Back to (B, N, H, T, d).
    oz = out[:, :, : N * Lzp].view(B, H, N, Lzp, d)[:, :, :, :Lz]
    op = out[:, :, N * Lzp : N * (Lzp + Npp)].view(B, H, N, Npp, d)[:, :, :, :Np]
    oa = out[:, :, N * (Lzp + Npp) : N * (Lzp + Npp) + N].unsqueeze(3)  # (B, H, N, 1, d)
    return torch.cat([oz, op, oa], dim=3).permute(0, 2, 1, 3, 4)
