"""Implementations of routed MoC attention behind one signature, and automatic selection.

Every backend maps (q, k, v, num_latent, routing, config) -> out with q: (B, N, H, T, d),
k/v: (B, N, H, Lz + Np, d) contiguous (z tokens then p tokens), out: (B, N, H, T, d).
"""

from __future__ import annotations

import torch

from moca3d.attention.backends.blocksparse import moc_attention_blocksparse
from moca3d.attention.backends.chunked import moc_attention_chunked
from moca3d.attention.backends.dense import dense_global_attention
from moca3d.attention.backends.fused import moc_attention_fused
from moca3d.attention.backends.matmul import moc_attention_matmul
from moca3d.attention.backends.reference import moc_attention_reference
from moca3d.attention.config import BACKENDS as BACKEND_NAMES
from moca3d.attention.config import MoCAttentionConfig
from moca3d.errors import ConfigError

BACKENDS = {
    "reference": moc_attention_reference,
    "chunked": moc_attention_chunked,
    "blocksparse": moc_attention_blocksparse,
    "matmul": moc_attention_matmul,
    "fused": moc_attention_fused,
}


def select_backend(config: MoCAttentionConfig, device: torch.device) -> str:
    """The backend to use: the forced one, else `reference` on CUDA and `chunked` on the CPU.

    On an H200 (bf16, L = 1024, D = 2048; benchmarks/results/attention_cuda.json) the gathered
    context + flash SDPA of `reference` ran 2.5-2.9x faster than flex_attention (`blocksparse`)
    at N = 8, 16, 32, whose backward was also 19-51x slower than dense attention's. On the CPU,
    flex_attention has no backward and its compiled kernel is slower than cache-sized gathers
    + SDPA, so the CPU takes `chunked` for inference and training alike: its context memory stays
    O(chunk_bytes) at any N. A whole training step (benchmarks/train_step.py, 2 threads, fp32) costs
    little for it: `reference` was 1.03-1.17x faster at N = 4-32 on the built-in model's size (L = 64;
    results/train_step_cpu.json) and the three differentiable backends were within 12 % of each other,
    none fastest throughout, at L = 512 (N = 4-16; results/train_step_cpu_l512.json).
    """
    if config.backend not in BACKEND_NAMES:  # set on a built model (`attention_config.backend = ...`): not checked then
        raise ConfigError(f"attention backend must be one of {', '.join(BACKEND_NAMES)}, got {config.backend!r}")
    if config.backend != "auto":
        return config.backend
    if device.type == "cuda":
        return "reference"
    return "chunked"

__all__ = ["BACKENDS", "select_backend", "dense_global_attention", "moc_attention_reference", "moc_attention_chunked", "moc_attention_blocksparse", "moc_attention_matmul", "moc_attention_fused"]
