"""`fused` backend: MoC attention as Triton kernels that read the routed blocks in place.

No context is gathered: for query component i and head h, one kernel walks the other
components j in order and streams, straight from k and v, the tokens that DESIGN.md §3 routes
to i — its own z (ungated), z_j for j in S_i^h and p_j for the rest, scaling each block's
logits by o_ij — with an online softmax (flash attention's recurrence). Memory is that of the
inputs and outputs plus one log-sum-exp per query; work is the routed context's, L_global
keys per query. The backward recomputes the probabilities: one kernel per query block gives
dq and the gate's gradient (its partial sums per block, added up outside, so no atomics),
one per key block gives dk and dv by walking the query components that read that block.

Which block of j component i reads is one int8 per (b, h, i, j) (`routing_kinds`), built
from the Routing with a few (N x N) tensor ops. On CUDA the kernels are compiled by Triton; on
the CPU they run in Triton's interpreter (TRITON_INTERPRET mode), which is slow and serves to
check them against the reference backend.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from moca3d.attention.config import MoCAttentionConfig
from moca3d.attention.routing import Routing
from moca3d.errors import ConfigError

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is not installed
    HAS_TRITON = False

# What component i reads of component j (per sample and head).
SKIP, OWN, ROUTED, COMPRESSED = 0, 1, 2, 3  # the kernels test these values; 1.4426950408889634 there is log2(e)


def _jit(fn):
    """triton.jit where triton is installed; the plain function elsewhere (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


def routing_kinds(routing: Routing, config: MoCAttentionConfig, heads: int, num_compressed: int) -> torch.Tensor:
    """(B, H, N, N) int8: OWN on the diagonal, ROUTED for j in S_i^h, COMPRESSED for the other real j."""
    B, _, N, _ = routing.gate.shape
    device = routing.gate.device
    eye = torch.eye(N, dtype=torch.bool, device=device).view(1, 1, N, N)
    kinds = torch.full((B, heads, N, N), SKIP, dtype=torch.int8, device=device)
    if config.unselected == "compressed" and num_compressed > 0:
        real = routing.real_mask().view(B, 1, 1, N)
        kinds.masked_fill_(real & ~eye, COMPRESSED)
    kinds.masked_fill_(routing.routed_mask().expand(B, heads, N, N), ROUTED)
    return kinds.masked_fill_(eye, OWN)


# ---------------------------------------------------------------------------------------------
# Kernels. q, out: (B, N, H, T, d) and k, v: (B, N, H, S, d), contiguous, S = Lz + Np; a "row" r
# is one (b, i, h) = (b * N + i) * H + h. kinds, gates: (B, H, N, N). Logits are kept in log2
# units (scaled by log2 e) so that exp2 does the softmax; lse is stored in those units too.
# ---------------------------------------------------------------------------------------------


@_jit
def _unrow(r, N, H):
    """(b, i, h) of row r = (b * N + i) * H + h."""
    return r // (N * H), (r // H) % N, r % H


@_jit
def _read_plan(Kinds, Gates, entry, Lz, Np, sm_scale):
    """What query component i reads of component j (table entry (b, h, i, j)): kind, logit scale, token offset and count."""
    kind = tl.load(Kinds + entry)
    c = tl.where(kind == 1, 1.0, tl.load(Gates + entry).to(tl.float32)) * sm_scale  # the own block is ungated
    start = tl.where(kind == 3, Lz, 0)
    length = tl.where(kind == 0, 0, tl.where(kind == 3, Np, Lz))
    return kind, c, start, length


@_jit
def _fwd_kernel(
    Q, K, V, Kinds, Gates, Out, Lse, N, H, T, S, Lz, Np, d, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    b, i, h = _unrow(r, N, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    mask_d = offs_d < d
    q_ptrs = Q + r.to(tl.int64) * T * d + offs_m[:, None] * d + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (M, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = ((b * H + h) * N + i) * N
    for j in range(0, N):
        kind, c, start, length = _read_plan(Kinds, Gates, table + j, Lz, Np, sm_scale)
        c = c * 1.4426950408889634  # log2(e): logits in log2 units
        base = ((b * N + j) * H + h).to(tl.int64) * S * d + start * d
        for n0 in range(0, length, BLOCK_N):
            cols = n0 + offs_n
            mask_n = cols < length
            kt = tl.load(K + base + cols[None, :] * d + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION) * c  # (M, N), log2 units
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vb = tl.load(V + base + cols[:, None] * d + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
            m_i = m_new
    acc = acc / l_i[:, None]
    out_ptrs = Out + r.to(tl.int64) * T * d + offs_m[:, None] * d + offs_d[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + r.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@_jit
def _dq_kernel(
    Q, K, V, Kinds, Gates, dOut, Lse, Delta, dQ, dGates, N, H, T, S, Lz, Np, d, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    b, i, h = _unrow(r, N, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    mask_d = offs_d < d
    mask_md = mask_m[:, None] & mask_d[None, :]
    row = r.to(tl.int64) * T * d + offs_m[:, None] * d + offs_d[None, :]
    q = tl.load(Q + row, mask=mask_md, other=0.0)  # (M, D)
    do = tl.load(dOut + row, mask=mask_md, other=0.0)  # (M, D)
    lse = tl.load(Lse + r.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)  # (M,)
    delta = tl.load(Delta + r.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)  # (M,)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = ((b * H + h) * N + i) * N
    num_m = tl.num_programs(0)
    for j in range(0, N):
        kind, c, start, length = _read_plan(Kinds, Gates, table + j, Lz, Np, sm_scale)
        base = ((b * N + j) * H + h).to(tl.int64) * S * d + start * d
        dg = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, length, BLOCK_N):
            cols = n0 + offs_n
            mask_n = cols < length
            kt = tl.load(K + base + cols[None, :] * d + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            vt = tl.load(V + base + cols[None, :] * d + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            qk = tl.dot(q, kt, input_precision=PRECISION)  # (M, N), raw q . k
            p = tl.exp2(qk * (c * 1.4426950408889634) - lse[:, None])
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
            dp = tl.dot(do, vt, input_precision=PRECISION)  # (M, N)
            ds = p * (dp - delta[:, None])  # d loss / d logit
            dq += tl.dot((ds * c).to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
            dg += tl.sum(ds * qk, 1)
        # d logit / d o_ij = sm_scale * q . k; the own block's gate is the constant 1.
        dg_total = tl.where(kind == 1, 0.0, tl.sum(dg, 0) * sm_scale)
        tl.store(dGates + (r.to(tl.int64) * num_m + pid_m) * N + j, dg_total)
    tl.store(dQ + row, dq.to(dQ.dtype.element_ty), mask=mask_md)


@_jit
def _dkv_kernel(
    Q, K, V, Kinds, Gates, dOut, Lse, Delta, dK, dV, N, H, T, S, Lz, Np, d, sm_scale, NUM_Z_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rk = tl.program_id(1)  # the (b, j, h) whose keys this program owns
    b, j, h = _unrow(rk, N, H)
    in_z = pid_n < NUM_Z_BLOCKS
    start = tl.where(in_z, pid_n * BLOCK_N, Lz + (pid_n - NUM_Z_BLOCKS) * BLOCK_N)
    end = tl.where(in_z, Lz, S)
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < end
    mask_d = offs_d < d
    mask_nd = mask_n[:, None] & mask_d[None, :]
    kv_rows = rk.to(tl.int64) * S * d + offs_n[:, None] * d + offs_d[None, :]
    k = tl.load(K + kv_rows, mask=mask_nd, other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + kv_rows, mask=mask_nd, other=0.0)  # (BLOCK_N, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i in range(0, N):
        kind, c, _, _ = _read_plan(Kinds, Gates, ((b * H + h) * N + i) * N + j, Lz, Np, sm_scale)
        reads = tl.where(in_z, (kind == 1) | (kind == 2), kind == 3)
        rq = (b * N + i) * H + h
        for m0 in range(0, tl.where(reads, T, 0), BLOCK_M):
            rows = m0 + offs_m
            mask_m = rows < T
            mask_md = mask_m[:, None] & mask_d[None, :]
            q_rows = rq.to(tl.int64) * T * d + rows[:, None] * d + offs_d[None, :]
            q = tl.load(Q + q_rows, mask=mask_md, other=0.0)  # (M, D)
            do = tl.load(dOut + q_rows, mask=mask_md, other=0.0)  # (M, D)
            lse = tl.load(Lse + rq.to(tl.int64) * T + rows, mask=mask_m, other=0.0)
            delta = tl.load(Delta + rq.to(tl.int64) * T + rows, mask=mask_m, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (M, N)
            p = tl.exp2(qk * (c * 1.4426950408889634) - lse[:, None])
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (M, N)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans((ds * c).to(q.dtype)), q, input_precision=PRECISION)
    tl.store(dK + kv_rows, dk.to(dK.dtype.element_ty), mask=mask_nd)
    tl.store(dV + kv_rows, dv.to(dV.dtype.element_ty), mask=mask_nd)


# ---------------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------------

def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before it was imported)."""
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads its settings there; older ones the variable
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@dataclass(frozen=True)
class Tiles:
    """Launch shape of one kernel: query and key tile sizes, warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# On CUDA: tiles whose sm_90 build at head size 128 (bf16) spills little or nothing, as ptxas reports it (stack
# bytes: forward 64 x 64 on 4 warps 0; dq 64 x 64 on 8 warps 40; dk/dv 32 queries x 64 keys on 8 warps 0, where
# 64 x 64 on 4 warps spilled 1 264); chosen by compiling, not yet by timing.
CUDA_TILES = {"fwd": Tiles(64, 64, 4, 3), "dq": Tiles(64, 64, 8, 2), "dkv": Tiles(32, 64, 8, 2)}


def kernel_tiles(device: torch.device, block_size: Optional[int] = None) -> dict:
    """Tiles of the three kernels: `block_size` for every tile if set, else CUDA_TILES (16 in the CPU interpreter)."""
    if block_size is None and device.type == "cuda":
        return CUDA_TILES
    b = block_size or 16
    return {name: Tiles(b, b) for name in CUDA_TILES}


def kernel_args(q: torch.Tensor, k: torch.Tensor, num_latent: int, tiles: Tiles) -> dict:
    """Sizes and compile-time constants of one kernel launch."""
    _, N, H, T, d = q.shape
    S = k.shape[3]
    return dict(
        N=N, H=H, T=T, S=S, Lz=num_latent, Np=S - num_latent, d=d, sm_scale=1.0 / math.sqrt(d),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


class FusedMoCAttention(torch.autograd.Function):
    """out = MoC attention of (q, k, v) under (kinds, gates); gradients for q, k, v and gates."""

    @staticmethod
    def forward(ctx, q, k, v, gates, kinds, num_latent: int, tiles: dict):
        B, N, H, T, d = q.shape
        fwd = tiles["fwd"]
        out = torch.empty_like(q)  # (B, N, H, T, d)
        lse = torch.empty(B, N, H, T, dtype=torch.float32, device=q.device)  # log2 units
        _fwd_kernel[(triton.cdiv(T, fwd.block_m), B * N * H)](q, k, v, kinds, gates, out, lse, **kernel_args(q, k, num_latent, fwd))
        ctx.save_for_backward(q, k, v, gates, kinds, out, lse)
        ctx.num_latent, ctx.tiles = num_latent, tiles
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, gates, kinds, out, lse = ctx.saved_tensors
        B, N, H, T, d = q.shape
        dq_tiles, dkv_tiles = ctx.tiles["dq"], ctx.tiles["dkv"]
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)  # (B, N, H, T)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        num_m = triton.cdiv(T, dq_tiles.block_m)
        dgates = torch.empty(B * N * H, num_m, N, dtype=torch.float32, device=q.device)  # per query tile
        args = kernel_args(q, k, ctx.num_latent, dq_tiles)
        _dq_kernel[(num_m, B * N * H)](q, k, v, kinds, gates, dout, lse, delta, dq, dgates, **args)
        args = kernel_args(q, k, ctx.num_latent, dkv_tiles)
        num_z = triton.cdiv(args["Lz"], dkv_tiles.block_n)
        num_blocks = num_z + triton.cdiv(args["Np"], dkv_tiles.block_n)
        _dkv_kernel[(num_blocks, B * N * H)](q, k, v, kinds, gates, dout, lse, delta, dk, dv, NUM_Z_BLOCKS=num_z, **args)
        dgates = dgates.view(B, N, H, num_m, N).sum(3).permute(0, 2, 1, 3).to(gates.dtype)  # (B, H, N, N) [b, h, i, j]
        return dq, dk, dv, dgates, None, None, None


def moc_attention_fused(q, k, v, num_latent: int, routing: Routing, config: MoCAttentionConfig) -> torch.Tensor:
    """Same signature and result as `moc_attention_reference`, with no gathered context."""
    if not HAS_TRITON:
        raise ConfigError("the fused backend needs triton (it comes with CUDA builds of torch; `pip install triton`)")
    if config.gate != "key":
        raise ConfigError("the fused backend supports key gating only; use backend='chunked' for gate='value'")
    if q.device.type != "cuda" and not interpreted():
        raise ConfigError(
            "the fused backend runs on CUDA GPUs; on the CPU only in Triton's interpreter (TRITON_INTERPRET=1 set "
            "before Python starts; slow, for checking the kernels): use backend='chunked' on the CPU"
        )
    B, N, H, T, d = q.shape
    kinds = routing_kinds(routing, config, H, k.shape[3] - num_latent)  # (B, H, N, N) int8
    gates = routing.gate.expand(B, H, N, N).contiguous()  # one routing per head, or one shared by all
    tiles = kernel_tiles(q.device, config.block_size)
    return FusedMoCAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), gates, kinds, num_latent, tiles)
