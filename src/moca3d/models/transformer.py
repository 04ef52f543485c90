"""MoCATransformer: the compositional diffusion transformer over vecset latents (DESIGN.md §3).

Data flow of one forward pass, for B samples of N components with L latents each:

    latents (B, N, L, C) --proj_in--> z (B, N, L, D)            [+ timestep token or embedding]
    pack: p_i, pbar_i = CrossAttn([p; pbar], z_i, z_i)           (B, N, Np + 1, D)
    x_i = [z_i ; p_i ; pbar_i] + e[id_i] (+ layout_i)             (B, N, T, D), T = Lz + Np + 1
    blocks: local (masked, within a component) / global (MoC)    self-attention, cross-attention
            to the condition tokens, FFN; optional long skips
    norm_out, proj_out on the z tokens -> velocity (B, N, L, C)
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch.utils.checkpoint import checkpoint

from moca3d.attention import LocalAttention, MoCAttention, MoCAttentionConfig
from moca3d.attention.routing import tie_breaking_order
from moca3d.defaults import check_component_count
from moca3d.errors import ConfigError, InputError, warn_input
from moca3d.models.modeling import AtomicSaveMixin
from moca3d.models.vae import FeedForward, FourierEmbedder, LayerNorm32


TIME_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}  # gelu: exact (erf), as diffusers' "gelu"


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, sin_first: bool = False) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, dim) sinusoidal features of 1000 t: [cos, sin] (or [sin, cos])."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    pair = [torch.sin(args), torch.cos(args)] if sin_first else [torch.cos(args), torch.sin(args)]
    return F.pad(torch.cat(pair, dim=-1), (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Sinusoidal features -> two-layer MLP (SiLU by default; TripoSG: [sin, cos], GELU, 4D hidden)."""

    def __init__(self, dim: int, freq_dim: int = 256, hidden_dim: Optional[int] = None, act: str = "silu", sin_first: bool = False):
        super().__init__()
        if act not in TIME_ACTIVATIONS:
            raise ConfigError(f"time_act must be one of {sorted(TIME_ACTIVATIONS)}, got {act!r}")
        hidden_dim = hidden_dim or dim
        self.freq_dim, self.sin_first, self.act = freq_dim, sin_first, TIME_ACTIVATIONS[act]
        self.linear_1 = nn.Linear(freq_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, D)."""
        h = timestep_embedding(t, self.freq_dim, sin_first=self.sin_first).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(h)))


class CrossAttention(nn.Module):
    """Tokens of every component attend to condition tokens, shared (B, M, Dc) or per component (B, N, M, Dc)."""

    def __init__(self, dim: int, cond_dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(cond_dim, dim, bias=False)
        self.to_v = nn.Linear(cond_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        d = dim // heads
        self.norm_q = nn.RMSNorm(d, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(d, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, N, T, D) -> (B, N, T, D)."""
        B, N, T, D = x.shape
        H, d = self.heads, D // self.heads
        if cond.dim() == 3:  # one condition for all components: one attention over all N*T queries
            M = cond.shape[1]
            q = self.norm_q(self.to_q(x).view(B, N * T, H, d).transpose(1, 2))  # (B, H, N*T, d)
            k = self.norm_k(self.to_k(cond).view(B, M, H, d).transpose(1, 2))  # (B, H, M, d)
            v = self.to_v(cond).view(B, M, H, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, T, D)
        else:  # per-component condition (scenes): (B, N, M, Dc)
            M = cond.shape[2]
            q = self.norm_q(self.to_q(x).view(B * N, T, H, d).transpose(1, 2))  # (BN, H, T, d)
            k = self.norm_k(self.to_k(cond).view(B * N, M, H, d).transpose(1, 2))
            v = self.to_v(cond).view(B * N, M, H, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, T, D)
        return self.to_out(out)


class LayoutEmbedding(nn.Module):
    """Per-component layout features (B, N, F) (a scene instance's mask box) -> (B, N, D), added to its tokens.

    Features and their Fourier features sin/cos(2^k pi f), k < num_freqs, through a two-layer MLP whose
    output layer starts at zero, so a model fine-tuned with it starts as the one without.
    """

    def __init__(self, num_features: int, dim: int, num_freqs: int = 6):
        super().__init__()
        self.fourier = FourierEmbedder(num_freqs, num_features, include_pi=True)  # (no weights: checkpoints unchanged)
        self.linear_1 = nn.Linear(self.fourier.out_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, layout: torch.Tensor) -> torch.Tensor:
        """(B, N, F) -> (B, N, D)."""
        h = self.fourier(layout.float())  # (B, N, F (1 + 2K))
        return self.linear_2(F.silu(self.linear_1(h.to(self.linear_1.weight.dtype))))


class ComponentPacker(nn.Module):
    """Packs each component's latents into N_p compressed tokens and one anchor token.

    p_i = CrossAttn(p, z_i, z_i) and pbar_i = CrossAttn(pbar, z_i, z_i) with learnable queries
    [p ; pbar] shared by all components (DESIGN.md §3, "Tokens").
    """

    def __init__(self, dim: int, heads: int, num_compressed: int):
        super().__init__()
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(num_compressed + 1, dim) * 0.02)  # [p ; pbar]
        self.norm = LayerNorm32(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, N, Lz, D) -> [p_i ; pbar_i] (B, N, Np + 1, D)."""
        B, N, Lz, D = z.shape
        H, d = self.heads, D // self.heads
        S = self.queries.shape[0]
        zn = self.norm(z)
        q = self.to_q(self.queries).view(1, S, H, d).transpose(1, 2).expand(B * N, H, S, d)
        k = self.to_k(zn).view(B * N, Lz, H, d).transpose(1, 2)  # (BN, H, Lz, d)
        v = self.to_v(zn).view(B * N, Lz, H, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, S, D)
        return self.queries.to(out.dtype) + self.to_out(out)


class MoCABlock(nn.Module):
    """Pre-norm block: local or MoC self-attention, cross-attention to the condition, FFN."""

    def __init__(self, dim: int, cond_dim: int, attention: MoCAttentionConfig, is_global: bool, mlp_ratio: float, skip: bool, time_add: bool):
        super().__init__()
        self.is_global = is_global
        self.norm1 = LayerNorm32(dim)
        self.attn1 = MoCAttention(attention) if is_global else LocalAttention(attention)
        self.norm2 = LayerNorm32(dim)
        self.attn2 = CrossAttention(dim, cond_dim, attention.num_heads, attention.qk_norm)
        self.norm3 = LayerNorm32(dim)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.skip_norm = LayerNorm32(dim) if skip else None
        self.time_linear = nn.Linear(dim, dim) if time_add else None

    def forward(self, x, cond, num_compressed: int, component_mask=None, skip=None, temb=None, routing_seeds=None, tie_order=None):
        """x (B, N, T, D) -> (B, N, T, D); `routing_seeds` (B,) make training routing reproducible, `tie_order` (B, N)
        ranks equal importances (the components in ID order)."""
        if self.skip_linear is not None:
            x = self.skip_norm(self.skip_linear(torch.cat([x, skip], dim=-1)))
        if self.time_linear is not None:
            x = x + self.time_linear(F.silu(temb))[:, None, None]
        h = self.norm1(x)
        if self.is_global:
            seeds = routing_seeds.tolist() if routing_seeds is not None else None
            x = x + self.attn1(h, num_compressed, component_mask, seeds=seeds, tie_order=tie_order)
        else:
            x = x + self.attn1(h, num_compressed, component_mask)
        x = x + self.attn2(self.norm2(x), cond)
        return x + self.ff(self.norm3(x))


def global_block_indices(num_layers: int, global_blocks: Union[str, Sequence[int]]) -> List[int]:
    """Indices of global (MoC) blocks: "even", "odd", "all", "none" or an explicit list."""
    if isinstance(global_blocks, str):
        table = {"even": range(0, num_layers, 2), "odd": range(1, num_layers, 2), "all": range(num_layers), "none": range(0)}
        if global_blocks not in table:
            raise ConfigError(f"global_blocks must be even/odd/all/none or a list, got {global_blocks!r}")
        return list(table[global_blocks])
    idx = sorted(int(i) for i in global_blocks)
    if any(i < 0 or i >= num_layers for i in idx):
        raise ConfigError(f"global block indices {idx} out of range for {num_layers} layers")
    return idx


# The parts of MoCA a TripoSG/PartCrafter prior lacks (moca3d.convert.triposg.init_new_parameters): a LoRA
# fine-tune (moca3d.models.lora) trains them in full, the prior's layers through adapters.
PRIOR_FREE_MODULES = ("packer", "id_embedding", "router", "token_embedding", "layout_embed")


class MoCATransformer(AtomicSaveMixin, ModelMixin, ConfigMixin):
    """Compositional rectified-flow DiT with Mixture-of-Components attention."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 64,
        num_latents: int = 512,
        width: int = 512,
        num_layers: int = 8,
        num_heads: int = 8,
        cond_dim: int = 512,
        mlp_ratio: float = 4.0,
        compression: int = 8,
        global_blocks: Union[str, List[int]] = "even",
        attention_mode: str = "moc",
        topk_ratio: float = 0.25,
        topk: Optional[int] = None,
        router: str = "sigmoid",
        routing: bool = True,
        unselected: str = "compressed",
        gate: str = "key",
        train_routing: str = "sample",
        multihead_routing: bool = True,
        attention_backend: str = "auto",
        qk_norm: bool = True,
        timestep_mode: str = "add",
        long_skips: bool = False,
        id_codebook_size: int = 50,
        id_assignment: str = "random",
        time_freq_dim: int = 256,
        time_hidden_dim: Optional[int] = None,
        time_act: str = "silu",
        time_sin_first: bool = False,
        token_positions: bool = False,
        layout_features: int = 0,
        instance_views: int = 1,
    ):
        """`id_assignment`: "random" (distinct draws, DESIGN §3) or "sequential" (ids 0..N-1, PartCrafter).

        `token_positions`: a learned embedding per token index within a component (TripoSG has none, so the
        model is permutation-equivariant in tokens); it only helps latents in a consistent order, cached with
        `token_order` "canonical" (see `MoCATransformer.token_order`).

        `layout_features`: F > 0 adds a `LayoutEmbedding` of per-component features (B, N, F) to each
        component's tokens; scene models take F = 8, `moca3d.data.scene.mask_layout` of the instance masks.

        `instance_views`: how a scene model's pipeline conditions each instance: 1, the scene crop; 2, also a
        crop zoomed on the instance (`moca3d.data.scene.scene_conditions`), its tokens after the first view's.
        The transformer itself takes any number of condition tokens; the pipeline and trainer read this.

        `time_*` shape the timestep MLP (defaults: 256 cos/sin features, SiLU, hidden = width); a converted
        TripoSG uses width features, [sin, cos], GELU and hidden = 4 * width (see moca3d.convert.triposg).
        """
        super().__init__()
        if num_latents % compression:
            raise ConfigError(f"num_latents ({num_latents}) must be divisible by compression ({compression})")
        if long_skips and num_layers % 2 == 0:
            raise ConfigError(f"long skips need an odd number of layers (push, middle, pop), got {num_layers}")
        if timestep_mode not in ("add", "token"):
            raise ConfigError(f"timestep_mode must be 'add' or 'token', got {timestep_mode!r}")
        if instance_views not in (1, 2):
            raise ConfigError(f"instance_views must be 1 or 2, got {instance_views}")
        if id_assignment not in ("random", "sequential"):
            raise ConfigError(f"id_assignment must be 'random' or 'sequential', got {id_assignment!r}")
        if isinstance(topk, numbers.Integral) and not isinstance(topk, bool):
            topk = int(topk)  # a numpy integer (a sweep's) is saved as a plain one: the config is JSON
            self.register_to_config(topk=topk)
        if attention_mode == "moc" and isinstance(topk, int) and topk >= id_codebook_size - 1:  # (a saved one still loads)
            warn_input(f"topk {topk} routes every component to all the others at any count up to the model's "
                       f"{id_codebook_size} (dense cost, MoC's saving lost): a smaller topk, or topk_ratio "
                       f"({topk_ratio} of the components) instead")
        self.num_compressed = num_latents // compression
        self.attention_config = MoCAttentionConfig(
            dim=width, num_heads=num_heads, mode=attention_mode, topk_ratio=topk_ratio, topk=topk, router=router,
            routing=routing, unselected=unselected, gate=gate, train_routing=train_routing,
            multihead_routing=multihead_routing, qk_norm=qk_norm, backend=attention_backend,
        )
        self.global_indices = global_block_indices(num_layers, global_blocks)
        self.proj_in = nn.Linear(in_channels, width)
        self.time_embed = TimestepEmbedding(width, time_freq_dim, time_hidden_dim, time_act, time_sin_first)
        self.packer = ComponentPacker(width, num_heads, self.num_compressed)
        self.id_embedding = nn.Embedding(id_codebook_size, width)
        self.token_embedding = nn.Parameter(torch.empty(num_latents, width)) if token_positions else None
        self.layout_embed = LayoutEmbedding(layout_features, width) if layout_features > 0 else None
        half = num_layers // 2
        self.blocks = nn.ModuleList(
            MoCABlock(
                width, cond_dim, self.attention_config, is_global=i in self.global_indices, mlp_ratio=mlp_ratio,
                skip=long_skips and i > half, time_add=timestep_mode == "add",
            )
            for i in range(num_layers)
        )
        self.norm_out = LayerNorm32(width)
        self.proj_out = nn.Linear(width, in_channels)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for linear layers, small normal for embeddings, zero output projection and layout output."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.proj_out:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            if block.is_global and block.attn1.router is not None:
                block.attn1.router.reset_parameters()
        nn.init.normal_(self.id_embedding.weight, std=0.02)
        if self.token_embedding is not None:
            nn.init.normal_(self.token_embedding, std=0.02)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        if self.layout_embed is not None:
            nn.init.zeros_(self.layout_embed.linear_2.weight)

    @property
    def max_components(self) -> int:
        return self.config.id_codebook_size

    @property
    def token_order(self) -> str:
        """Latent token order the model needs (`VecSetVAE.encode`'s): "canonical" with token positions, else
        "fps" — though then any order works, the model being permutation-equivariant in tokens."""
        return "canonical" if self.config.token_positions else "fps"

    def sample_ids(self, batch: int, num_components: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """(B, N) distinct random draws from the ID codebook per sample (0..N-1 when id_assignment is sequential)."""
        size = self.config.id_codebook_size
        check_component_count(num_components, size, "components")  # the ID codebook's size
        if self.config.id_assignment == "sequential":
            return torch.arange(num_components, device=device or self.device).expand(batch, num_components)
        keys = torch.rand(batch, size, generator=generator, dtype=torch.float32)  # the same draws whatever the default dtype
        return keys.argsort(dim=1)[:, :num_components].to(device or self.device)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: torch.Tensor,
        component_mask: Optional[torch.Tensor] = None,
        ids: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        routing_seeds: Optional[torch.Tensor] = None,
        layout: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Velocity v(Z_t, t, c): latents (B, N, L, C), timestep (B,) in [0, 1] -> (B, N, L, C).

        Training routing draws from `routing_seeds` (B,) per sample when given, else from `generator`.
        `layout` (B, N, F): per-component features, required by (and only by) a model with `layout_features`.
        """
        if latents.dim() != 4:
            raise InputError(f"latents must be (B, N, L, C), got {tuple(latents.shape)}")
        B, N, L, C = latents.shape
        if L != self.config.num_latents or C != self.config.in_channels:
            raise InputError(f"latents have L={L}, C={C}; the model expects L={self.config.num_latents}, C={self.config.in_channels}")
        wanted = (B, N, self.config.layout_features)
        if self.layout_embed is None and layout is not None:
            raise InputError("this model takes no layout features (its layout_features is 0)")
        if self.layout_embed is not None and (layout is None or tuple(layout.shape) != wanted):
            raise InputError(f"the model takes layout features of shape {wanted}, got {None if layout is None else tuple(layout.shape)}")
        width = self.config.cond_dim
        if not isinstance(cond, torch.Tensor) or cond.dim() not in (3, 4) or cond.shape[0] != B or cond.shape[-1] != width \
                or (cond.dim() == 4 and cond.shape[1] != N):
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise InputError(f"cond must be (B, M, {width}) or (B, N, M, {width}) with B={B}, N={N}, got {got}")
        if not isinstance(timestep, torch.Tensor) or timestep.numel() not in (1, B):
            got = tuple(timestep.shape) if isinstance(timestep, torch.Tensor) else type(timestep).__name__
            raise InputError(f"timestep must be a tensor of shape (B,) = ({B},) or one value, got {got}")
        if ids is None:
            ids = self.sample_ids(B, N, generator, latents.device)
        dtype = self.proj_in.weight.dtype  # (not ModelMixin.dtype: it walks every parameter, 0.6 ms a call)
        latents, cond = latents.to(dtype), cond.to(dtype)  # a bf16 / fp16 model sampled in fp32
        timestep = timestep.to(latents.device).reshape(-1).expand(B)
        temb = self.time_embed(timestep)  # (B, D)
        z = self.proj_in(latents)  # (B, N, L, D)
        if self.token_embedding is not None:
            z = z + self.token_embedding.to(z.dtype)
        if self.config.timestep_mode == "token":
            z = torch.cat([temb[:, None, None].expand(B, N, 1, -1).to(z.dtype), z], dim=2)  # (B, N, L+1, D)
        x = torch.cat([z, self.packer(z)], dim=2)  # (B, N, T, D)
        x = x + self.id_embedding(ids)[:, :, None]
        if self.layout_embed is not None:
            x = x + self.layout_embed(layout).to(x.dtype)[:, :, None]
        Np = self.num_compressed
        if routing_seeds is None and generator is not None and self.training:
            routing_seeds = torch.randint(0, 2**62, (B,), generator=generator)
        tie_order = tie_breaking_order(ids)  # (B, N): equal router scores rank by ID, so routing follows a permutation
        skips, half = [], len(self.blocks) // 2
        for i, block in enumerate(self.blocks):
            skip = skips.pop() if block.skip_linear is not None else None
            # seeds, not a generator: a checkpointed block recomputes the same routing
            seeds = (routing_seeds + 1_000_003 * (i + 1)) % 2**62 if (routing_seeds is not None and block.is_global) else None
            args = (x, cond, Np, component_mask, skip, temb, seeds, tie_order)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
            if self.config.long_skips and i < half:
                skips.append(x)
        z_out = x[:, :, -L - Np - 1 : -Np - 1]  # (B, N, L, D): the latent tokens, without the timestep token
        out = self.proj_out(self.norm_out(z_out))
        if component_mask is not None:
            out = out * component_mask.view(B, N, 1, 1).to(out.dtype)
        return out
