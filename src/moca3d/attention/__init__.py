"""Mixture-of-Components attention: router, routing, local mask, backends (DESIGN.md §3)."""

from moca3d.attention.backends import BACKENDS, select_backend
from moca3d.attention.config import MoCAttentionConfig
from moca3d.attention.local_mask import local_attention, local_mask
from moca3d.attention.moc import LocalAttention, MoCAttention
from moca3d.attention.routing import Router, Routing, route

__all__ = [
    "BACKENDS",
    "LocalAttention",
    "MoCAttention",
    "MoCAttentionConfig",
    "Router",
    "Routing",
    "local_attention",
    "local_mask",
    "route",
    "select_backend",
]
