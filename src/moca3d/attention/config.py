"""Configuration of Mixture-of-Components attention (DESIGN.md §3), ablation switches included."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Literal, Optional

from moca3d.errors import ConfigError

MODES = ("moc", "dense", "none")
BACKENDS = ("auto", "reference", "chunked", "blocksparse", "matmul", "fused")


@dataclass
class MoCAttentionConfig:
    """Widths, routing and ablation switches of one MoC attention layer."""

    dim: int = 512
    num_heads: int = 8
    # "moc": Mixture-of-Components; "dense": every component sees all z tokens (PartCrafter
    # style baseline); "none": local only (the global block attends within its component).
    mode: Literal["moc", "dense", "none"] = "moc"
    # k, the number of routed components: a fraction of N (rounded, at least 1, at most N-1),
    # or a fixed count when `topk` is set (clamped to N-1).
    topk_ratio: float = 0.25
    topk: Optional[int] = None
    # Ablations of the paper's Table 3.
    router: Literal["sigmoid", "softmax"] = "sigmoid"
    routing: bool = True  # False: "no routing", every other component is seen compressed only
    unselected: Literal["compressed", "drop"] = "compressed"  # "drop": "no compression"
    gate: Literal["key", "value"] = "key"
    train_routing: Literal["sample", "topk"] = "sample"  # "topk": deterministic in training
    multihead_routing: bool = True  # False: one routing decision shared by all heads
    # Projections.
    qk_norm: bool = True
    qkv_bias: bool = False
    # Implementation.
    backend: Literal["auto", "reference", "chunked", "blocksparse", "matmul", "fused"] = "auto"
    chunk_bytes: int = 32 * 2**20  # context bytes (K and V) built at once by "chunked"
    block_size: Optional[int] = None  # tile of blocksparse (default: largest fitting L and L/sigma) and of fused (default: fused.CUDA_TILES)

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.num_heads <= 0 or self.dim % self.num_heads:
            raise ConfigError(f"dim ({self.dim}) must be a positive multiple of num_heads ({self.num_heads})")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        self.check_routing()
        if self.topk is not None:
            self.topk = int(self.topk)  # (a numpy integer of a sweep: plain, as configs are saved as JSON)
        if self.router not in ("sigmoid", "softmax"):
            raise ConfigError(f"router must be 'sigmoid' or 'softmax', got {self.router!r}")
        if self.unselected not in ("compressed", "drop"):
            raise ConfigError(f"unselected must be 'compressed' or 'drop', got {self.unselected!r}")
        if self.gate not in ("key", "value"):
            raise ConfigError(f"gate must be 'key' or 'value', got {self.gate!r}")
        if self.train_routing not in ("sample", "topk"):
            raise ConfigError(f"train_routing must be 'sample' or 'topk', got {self.train_routing!r}")
        if not self.routing and self.unselected == "drop":
            raise ConfigError("routing=False with unselected='drop' leaves no context from other components")
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ConfigError(f"block_size must be a power of two >= 16, got {self.block_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def router_heads(self) -> int:
        return self.num_heads if self.multihead_routing else 1

    def check_routing(self) -> None:
        """ConfigError for a topk that is not a whole number >= 1 (None: topk_ratio decides) or a topk_ratio out of
        (0, 1]; at construction and whenever k is taken (`num_routed`): set on a built model (`attention_config.topk =
        0`) they bypass `__post_init__` (k became 1, silently)."""
        if self.topk is not None and (isinstance(self.topk, bool) or not isinstance(self.topk, numbers.Integral) or self.topk < 1):
            raise ConfigError(f"topk must be a whole number >= 1 (routing=False routes none; None: topk_ratio), got {self.topk!r}")
        if isinstance(self.topk_ratio, bool) or not (isinstance(self.topk_ratio, numbers.Real) and 0.0 < self.topk_ratio <= 1.0):
            raise ConfigError(f"topk_ratio must be in (0, 1], got {self.topk_ratio!r}")

    def num_routed(self, n: int) -> int:
        """k for a sample with n real components (0 when n == 1 or routing is off); the settings checked first."""
        self.check_routing()
        if n <= 1 or not self.routing:
            return 0
        k = self.topk if self.topk is not None else math.floor(self.topk_ratio * n + 0.5)
        return max(1, min(int(k), n - 1))

    def context_length(self, n: int, latent_len: int, num_compressed: int) -> int:
        """Keys each component sees: L + kL + (N-k-1)L/sigma (DESIGN.md §3.4)."""
        if self.mode == "dense":
            return n * latent_len
        if self.mode == "none":
            return latent_len + num_compressed + 1
        k = self.num_routed(n)
        compressed = (n - k - 1) * num_compressed if self.unselected == "compressed" else 0
        return latent_len + k * latent_len + compressed

    def to_dict(self) -> dict:
        return asdict(self)
