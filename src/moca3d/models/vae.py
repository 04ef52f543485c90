"""VecSetVAE: point clouds of one component -> L latent vectors -> an SDF-like field (DESIGN §2).

The 3DShape2VecSet / TripoSG family. Module and parameter names follow TripoSG's released VAE
(`embedder`, `encoder.proj_in`, `encoder.blocks.{i}.attn{1,2}.to_{q,k,v,out.0}`, `ff.net.{0.proj,2}`,
`encoder.norm_out`, `quant`, `post_quant`, `decoder.blocks`, `decoder.proj_query`,
`decoder.norm_out`, `decoder.proj_out`) so that its weights can be loaded by a converter; see
`moca3d.convert.triposg.convert_vae_state_dict` for the two layout differences (per-head interleaved q/k/v, and the
sign of the output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from moca3d.errors import ConfigError, InputError
from moca3d.geometry.sampling import farthest_point_indices
from moca3d.models.modeling import AtomicSaveMixin

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # clamp of the posterior log-variance (numerical safety)
LOGVAR_INIT = -8.0  # initial posterior log-variance (std ~0.02): z starts informative, which avoids collapse


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class FourierEmbedder(nn.Module):
    """xyz -> [xyz, sin(2^k xyz), cos(2^k xyz)], k = 0..F-1 (TripoSG's channel order)."""

    def __init__(self, num_freqs: int, input_dim: int = 3, include_pi: bool = False):
        super().__init__()
        freqs = 2.0 ** torch.arange(num_freqs, dtype=torch.float32)
        if include_pi:
            freqs = freqs * torch.pi
        self.register_buffer("frequencies", freqs, persistent=False)
        self.out_dim = input_dim * (2 * num_freqs + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed the last dimension of `x`."""
        angles = (x[..., None] * self.frequencies.to(x.dtype)).flatten(-2)  # (..., D*F)
        return torch.cat([x, angles.sin(), angles.cos()], dim=-1)  # (..., D*(2F+1))


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise `x` in fp32 and cast back."""
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head (cross-)attention; keys/values optionally layer-normed (`norm_cross`)."""

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None, norm_cross: bool = False, eps: float = 1e-5):
        super().__init__()
        if dim % heads != 0:
            raise ConfigError(f"width {dim} is not divisible by {heads} heads")
        kv_dim = dim if kv_dim is None else kv_dim
        self.heads = heads
        self.norm_cross = nn.LayerNorm(kv_dim, eps=eps) if norm_cross else None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=True)])

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, M, D) attends to context (B, N, Dc) (to itself when context is None)."""
        if context is None:
            context = x
        elif self.norm_cross is not None:
            context = self.norm_cross(context)
        B, M, D = x.shape
        h = self.heads
        q = self.to_q(x).view(B, M, h, D // h).transpose(1, 2)  # (B, h, M, d)
        k = self.to_k(context).view(B, -1, h, D // h).transpose(1, 2)  # (B, h, N, d)
        v = self.to_v(context).view(B, -1, h, D // h).transpose(1, 2)  # (B, h, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, M, d)
        out = out.transpose(1, 2).reshape(B, M, D)  # (B, M, D)
        return self.to_out[0](out)


class GELUProj(nn.Module):
    """Linear followed by exact GELU (diffusers' `GELU` layout: `.proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project then GELU."""
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    """Two-layer GELU MLP, named like diffusers' FeedForward (`net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim, bias=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP."""
        for layer in self.net:
            x = layer(x)
        return x


class VecSetBlock(nn.Module):
    """Pre-norm transformer block: [self-attention] [cross-attention] feed-forward."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, self_attention: bool, cross_attention: bool, eps: float):
        super().__init__()
        if self_attention:
            self.norm1 = LayerNorm32(dim, eps=eps)
            self.attn1 = Attention(dim, heads, eps=eps)
        if cross_attention:
            self.norm2 = LayerNorm32(dim, eps=eps)
            self.attn2 = Attention(dim, heads, kv_dim=dim, norm_cross=True, eps=eps)
        self.norm3 = LayerNorm32(dim, eps=eps)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))
        self.self_attention = self_attention
        self.cross_attention = cross_attention

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, M, D), context (B, N, D) -> (B, M, D)."""
        if self.self_attention:
            x = x + self.attn1(self.norm1(x))
        if self.cross_attention:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class VecSetEncoder(nn.Module):
    """One cross-attention from the FPS subset into the dense points, then self-attention."""

    def __init__(self, in_channels: int, dim: int, heads: int, num_layers: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.proj_in = nn.Linear(in_channels, dim, bias=True)
        self.blocks = nn.ModuleList(
            [VecSetBlock(dim, heads, mlp_ratio, self_attention=False, cross_attention=True, eps=eps)]
            + [VecSetBlock(dim, heads, mlp_ratio, self_attention=True, cross_attention=False, eps=eps) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(dim, eps=eps)

    def forward(self, queries: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """queries (B, L, Cin) and dense points (B, P, Cin) -> tokens (B, L, D)."""
        x = self.proj_in(queries)  # (B, L, D)
        context = self.proj_in(points)  # (B, P, D)
        x = self.blocks[0](x, context)
        for block in self.blocks[1:]:
            x = block(x)
        return self.norm_out(x)


class VecSetDecoder(nn.Module):
    """Self-attention over the latent tokens, then one cross-attention from each query point."""

    def __init__(self, in_channels: int, dim: int, heads: int, num_layers: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            [VecSetBlock(dim, heads, mlp_ratio, self_attention=True, cross_attention=False, eps=eps) for _ in range(num_layers)]
            + [VecSetBlock(dim, heads, mlp_ratio, self_attention=False, cross_attention=True, eps=eps)]
        )
        self.proj_query = nn.Linear(in_channels, dim, bias=True)
        self.norm_out = nn.LayerNorm(dim, eps=eps)
        self.proj_out = nn.Linear(dim, 1, bias=True)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Latent tokens (B, L, D) -> decoded tokens (B, L, D), the per-component cache."""
        for block in self.blocks[:-1]:
            x = block(x)
        return x

    def query(self, tokens: torch.Tensor, query_embedding: torch.Tensor) -> torch.Tensor:
        """Decoded tokens (B, L, D) and embedded queries (B, M, E) -> logits (B, M)."""
        q = self.proj_query(query_embedding)  # (B, M, D)
        q = self.blocks[-1](q, tokens)  # (B, M, D)
        return self.proj_out(self.norm_out(q)).squeeze(-1)  # (B, M)


# ----------------------------------------------------------------------------------------------
# Posterior and farthest-point sampling
# ----------------------------------------------------------------------------------------------


@dataclass
class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z | points) over latents (B, L, C)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        """Standard deviation (B, L, C)."""
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Reparameterised sample (B, L, C)."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """Posterior mean (B, L, C)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, averaged over the L*C latent entries: (B,)."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)  # (B, L, C)
        return kl.flatten(1).mean(dim=1)


TOKEN_ORDERS = ("fps", "canonical")  # latent token order: farthest-point order, or matched to a fixed template


def token_template(num_tokens: int) -> torch.Tensor:
    """A fixed, well-spread set of `num_tokens` points in [0, 1]^3 (the first points of a Sobol sequence)."""
    return torch.quasirandom.SobolEngine(3, scramble=False).draw(num_tokens).double() + 0.5 / num_tokens  # (L, 3)


def canonical_token_order(xyz: torch.Tensor) -> torch.Tensor:
    """A consistent order of each component's query points: xyz (B, L, 3) -> permutation (B, L) long.

    Each point set is scaled into its own bounding box [0, 1]^3 and matched one-to-one to a fixed
    template (`token_template`) by minimum total squared distance; token j is the point matched to
    template point j. So token j lands in about the same place of every component's box, which
    breaks the exchangeability of farthest-point tokens for a transformer that knows token indices.
    """
    from scipy.optimize import linear_sum_assignment

    B, L, _ = xyz.shape
    pts = xyz.detach().double().cpu()
    lo, hi = pts.amin(dim=1, keepdim=True), pts.amax(dim=1, keepdim=True)
    unit = (pts - lo) / (hi - lo).clamp_min(1e-6)  # (B, L, 3)
    cost = torch.cdist(token_template(L).expand(B, L, 3), unit).pow(2).numpy()  # (B, L template, L points)
    order = [linear_sum_assignment(cost[b])[1] for b in range(B)]  # template j -> point order[j]
    return torch.from_numpy(np.stack(order).astype(np.int64)).to(xyz.device)


# ----------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------


class VecSetVAE(AtomicSaveMixin, ModelMixin, ConfigMixin):
    """Surface points of one component (B, P, 6) <-> latents z (B, L, C) -> SDF-like logits.

    The decoder's output is positive inside and zero on the surface; with this project's
    training it approximates clamp(sdf / truncation, -1, 1).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        point_feature_channels: int = 3,
        latent_channels: int = 64,
        num_latents: int = 2048,
        num_attention_heads: int = 8,
        width_encoder: int = 512,
        width_decoder: int = 1024,
        num_layers_encoder: int = 8,
        num_layers_decoder: int = 16,
        embed_frequency: int = 8,
        embed_include_pi: bool = False,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        truncation: float = 0.05,
        init_std: float = 0.02,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        for name, value in [("latent_channels", latent_channels), ("num_latents", num_latents),
                            ("num_attention_heads", num_attention_heads), ("width_encoder", width_encoder),
                            ("width_decoder", width_decoder), ("embed_frequency", embed_frequency)]:
            if value <= 0:
                raise ConfigError(f"VecSetVAE {name} must be positive, got {value}")
        if truncation <= 0:
            raise ConfigError(f"VecSetVAE truncation must be positive, got {truncation}")
        if not scaling_factor > 0:
            raise ConfigError(f"VecSetVAE scaling_factor must be positive, got {scaling_factor}")
        self.embedder = FourierEmbedder(embed_frequency, in_channels, embed_include_pi)
        self.encoder = VecSetEncoder(self.embedder.out_dim + point_feature_channels, width_encoder,
                                     num_attention_heads, num_layers_encoder, mlp_ratio, norm_eps)
        self.quant = nn.Linear(width_encoder, 2 * latent_channels, bias=True)
        self.post_quant = nn.Linear(latent_channels, width_decoder, bias=True)
        self.decoder = VecSetDecoder(self.embedder.out_dim, width_decoder, num_attention_heads,
                                     num_layers_decoder, mlp_ratio, norm_eps)
        self.reset_parameters()

    # -- initialisation --------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Explicit init: linears N(0, init_std), zero biases, depth-scaled residual outputs, identity norms."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Residual branch outputs shrink with depth (GPT-2 / nanoGPT scheme).
        for stack in (self.encoder.blocks, self.decoder.blocks):
            scale = std / (2 * len(stack)) ** 0.5
            for block in stack:
                for attn_name in ("attn1", "attn2"):
                    if hasattr(block, attn_name):
                        nn.init.normal_(getattr(block, attn_name).to_out[0].weight, std=scale)
                nn.init.normal_(block.ff.net[2].weight, std=scale)
        # Posterior starts almost deterministic: with std ~1 noise over small means the decoder learns to
        # ignore z at the start and the latents never become informative (posterior collapse).
        nn.init.constant_(self.quant.bias[self.config.latent_channels:], LOGVAR_INIT)
        # Embedded xyz has unit-scale features: a fan-in init keeps the first activations O(1).
        for proj in (self.encoder.proj_in, self.decoder.proj_query, self.post_quant):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)

    # -- encoder -----------------------------------------------------------------------------

    def _embed_points(self, surface: torch.Tensor) -> torch.Tensor:
        """(B, P, 3 + Cf) xyz + features -> (B, P, E + Cf)."""
        n = self.config.in_channels
        return torch.cat([self.embedder(surface[..., :n]), surface[..., n:]], dim=-1)

    def encode(self, surface: torch.Tensor, query_indices: Optional[torch.Tensor] = None,
               num_latents: Optional[int] = None, random_start: bool = False,
               generator: Optional[torch.Generator] = None, token_order: str = "fps") -> DiagonalGaussian:
        """Surface samples (B, P, 6) xyz+normal -> posterior over z (B, L, C).

        The xyz are in the frame the VAE was trained in: the asset's components normalised together, centred with the
        largest side 2 (`geometry.mesh_io.fit_normalization`, `geometry.sampling.sample_surface`; a part far outside
        [-1, 1]^3 encodes poorly). The L query points are a farthest-point subset of the input (deterministic unless
        `random_start`), or `query_indices` (B, L) when given. `token_order` "canonical" reorders
        them by `canonical_token_order` (the tokens are permuted, their values unchanged).
        """
        expected = self.config.in_channels + self.config.point_feature_channels
        if not isinstance(surface, torch.Tensor):
            raise InputError(f"surface must be a torch tensor (B, P, {expected}), got {type(surface).__name__}")
        if surface.ndim != 3 or surface.shape[-1] != expected:
            raise InputError(f"surface must be (B, P, {expected}), got {tuple(surface.shape)}")
        if token_order not in TOKEN_ORDERS:
            raise ConfigError(f"token_order must be one of {', '.join(TOKEN_ORDERS)}, got {token_order!r}")
        L = num_latents or self.config.num_latents
        if query_indices is None:
            query_indices = farthest_point_indices(surface[..., :3], L, random_start=random_start, generator=generator)
        query_indices = query_indices.to(surface.device)
        if token_order == "canonical":
            xyz = torch.gather(surface[..., :3], 1, query_indices[..., None].expand(-1, -1, 3))  # (B, L, 3)
            query_indices = torch.gather(query_indices, 1, canonical_token_order(xyz))
        queries = torch.gather(surface, 1, query_indices[..., None].expand(-1, -1, surface.shape[-1]))  # (B, L, 6)
        tokens = self.encoder(self._embed_points(queries), self._embed_points(surface))  # (B, L, We)
        moments = self.quant(tokens)  # (B, L, 2C)
        mean, logvar = moments.chunk(2, dim=-1)  # (B, L, C) each
        return DiagonalGaussian(mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    # -- latent normalisation (diffusers' scaling_factor / shift_factor) --------------------------

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the unit-scale latents the transformer is trained on and samples: (z - shift) * scale."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_latents`: sampled latents -> VAE latents to decode."""
        return z / self.config.scaling_factor + self.config.shift_factor

    def fit_latent_statistics(self, latents: torch.Tensor) -> tuple[float, float]:
        """Set shift = mean and scale = 1 / std of `latents` (posterior means of training parts); returns them."""
        latents = latents.detach()
        if latents.numel() < 2 or not torch.isfinite(latents).all():
            raise InputError("latent statistics need at least two finite values")
        shift, scale = float(latents.mean()), float(1.0 / latents.std().clamp_min(1e-6))
        self.register_to_config(scaling_factor=scale, shift_factor=shift)
        return shift, scale

    # -- decoder -----------------------------------------------------------------------------

    def decode_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z (B, L, C) -> decoded tokens (B, L, Wd); compute once per component, then query."""
        return self.decoder.tokens(self.post_quant(z))

    def query(self, tokens: torch.Tensor, points: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Decoded tokens (B, L, Wd) and query points (B, M, 3) -> logits (B, M), in chunks of M."""
        if points.ndim != 3 or points.shape[-1] != self.config.in_channels:
            raise InputError(f"query points must be (B, M, {self.config.in_channels}), got {tuple(points.shape)}")
        if chunk_size is None or chunk_size >= points.shape[1]:
            return self.decoder.query(tokens, self.embedder(points))
        outs = [self.decoder.query(tokens, self.embedder(points[:, i:i + chunk_size]))
                for i in range(0, points.shape[1], chunk_size)]
        return torch.cat(outs, dim=1)  # (B, M)

    def decode(self, z: torch.Tensor, points: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Latents (B, L, C) and query points (B, M, 3) -> logits (B, M)."""
        return self.query(self.decode_tokens(z), points, chunk_size)

    def field(self, z: torch.Tensor, chunk_size: int = 65536):
        """Callable `points (M, 3) -> logits (M,)` for one component's latents z (L, C) or (1, L, C)."""
        z = z if z.ndim == 3 else z[None]
        with torch.no_grad():
            tokens = self.decode_tokens(z)

        def fn(points: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                p = points.to(device=tokens.device, dtype=tokens.dtype)[None]
                return self.query(tokens, p, chunk_size)[0]

        return fn

    def forward(self, surface: torch.Tensor, points: torch.Tensor, sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None,
                query_indices: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Encode (B, P, 6), decode at points (B, M, 3) -> (logits (B, M), posterior)."""
        posterior = self.encode(surface, query_indices=query_indices)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, points), posterior
