"""Image conditioning (DESIGN.md §4): image -> condition tokens for cross-attention.

`ImageEncoder` is a small ViT trained from scratch with the built-in model; real-world weights
use DINOv2 (issue 8). Both take images in [0, 1] and return (B, M, D) tokens; `moca3d.data.images`
prepares them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from moca3d.data.images import SCENE_CHANNELS
from moca3d.errors import ConfigError, InputError
from moca3d.models.lora import add_lora, merge_lora
from moca3d.models.modeling import AtomicSaveMixin
from moca3d.models.vae import LayerNorm32, VecSetBlock

class ImageEncoder(AtomicSaveMixin, ModelMixin, ConfigMixin):
    """A small ViT: (B, C_in, S, S) images in [0, 1] -> (B, 1 + (S/patch)^2, width) tokens."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 128,
        patch_size: int = 16,
        width: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise InputError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.blocks = nn.ModuleList(
            VecSetBlock(width, num_heads, mlp_ratio, self_attention=True, cross_attention=False, eps=1e-6) for _ in range(num_layers)
        )
        self.norm = LayerNorm32(width, eps=1e-6)
        # With one image per process the token's gradient is a slice of the cat's, strided as (1, M, width):
        # DistributedDataParallel then warns that grad strides do not match its bucket and copies every step.
        self.cls_token.register_hook(_dense_grad)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def out_dim(self) -> int:
        return self.config.width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C_in, S, S) in [0, 1] -> (B, M, width)."""
        if images.dim() != 4 or images.shape[1] != self.config.in_channels or images.shape[-1] != self.config.image_size:
            raise InputError(
                f"images must be (B, {self.config.in_channels}, {self.image_size}, {self.image_size}), got {tuple(images.shape)}"
            )
        x = self.patch_embed(((images - 0.5) / 0.5).to(self.patch_embed.weight.dtype))  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _dense_grad(grad: torch.Tensor) -> torch.Tensor:
    """The gradient with its parameter's (contiguous) strides."""
    return grad.clone(memory_format=torch.contiguous_format)


# -- scene conditioning (DESIGN.md §4): a 7-channel first projection, LoRA fine-tuning ---------------
#
# A scene model's encoder sees, per instance, [instance-masked RGB (3), scene RGB (3), mask (1)]
# (MIDI's recipe). The object encoder's first projection (a patch Conv2d) is widened from 3 to 7
# input channels, the original channels first, and the encoder is then fine-tuned with LoRA.
# The helpers find the projection by attribute path, so they serve the built-in ImageEncoder
# (`patch_embed`) and a transformers `Dinov2Model` (`embeddings.patch_embeddings.projection`) alike,
# bare or inside a wrapper module.

FIRST_PROJECTION_NAMES = ("patch_embed", "embeddings.patch_embeddings.projection")
WIDEN_INITS = ("zero", "clone")


def encode_views(encoder: nn.Module, stacks: torch.Tensor) -> torch.Tensor:
    """Per-instance stacks of V views (K, 7V, S, S) -> each instance's tokens of all its views, in view order
    (K, V*M, D): every view is encoded on its own, by the same encoder (`moca3d.data.scene.scene_conditions`)."""
    K, C = stacks.shape[:2]
    if C % SCENE_CHANNELS:
        raise InputError(f"scene conditions must have a multiple of {SCENE_CHANNELS} channels, got {C}")
    views = C // SCENE_CHANNELS
    pixels = stacks.reshape(K * views, SCENE_CHANNELS, *stacks.shape[2:])  # (K*V, 7, S, S)
    if hasattr(encoder, "normalize_stacks"):  # DINOv2 takes ImageNet-normalised RGB (models/dino.py)
        pixels = encoder.normalize_stacks(pixels)
    tokens = encoder(pixels)  # (K*V, M, D)
    return tokens.reshape(K, views * tokens.shape[1], tokens.shape[2])


def first_projection_path(encoder: nn.Module) -> str:
    """Attribute path of the encoder's first projection: the first Conv2d named like a known patch embedding."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d) and any(name == n or name.endswith("." + n) for n in FIRST_PROJECTION_NAMES):
            return name
    raise ConfigError(f"{type(encoder).__name__}: no first projection Conv2d named {' or '.join(FIRST_PROJECTION_NAMES)}")


def input_channels(encoder: nn.Module) -> int:
    """Number of image channels the encoder takes (3 for objects, 7 for scenes)."""
    return encoder.get_submodule(first_projection_path(encoder)).in_channels


def widen_input_channels(encoder: nn.Module, in_channels: int = SCENE_CHANNELS, init: str = "zero", path: str | None = None) -> nn.Module:
    """Widen the first projection Conv2d (found by `path`, or by name) to `in_channels` inputs, in place.

    The original channels keep their weights and come first. init="zero": the new channels get zero
    weights, so the output for the original channels is unchanged. init="clone": each full group of
    new channels copies the original weights (the scene RGB gets the RGB weights), a remaining partial
    group (the mask) gets their mean over channels. The encoder's channel count in its config (and a
    transformers patch embedding's `num_channels` check) follows.
    """
    if init not in WIDEN_INITS:
        raise ConfigError(f"init must be one of {', '.join(WIDEN_INITS)}, got {init!r}")
    path = path or first_projection_path(encoder)
    old = encoder.get_submodule(path)
    if not isinstance(old, nn.Conv2d):
        raise ConfigError(f"{path} is a {type(old).__name__}, not a Conv2d")
    c_old = old.in_channels
    if in_channels <= c_old:
        raise ConfigError(f"cannot widen {path} from {c_old} to {in_channels} channels")
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, old.groups,
        bias=old.bias is not None, padding_mode=old.padding_mode,
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        w = old.weight  # (D, c_old, p, p)
        new.weight.zero_()
        new.weight[:, :c_old] = w
        if init == "clone":
            for start in range(c_old, in_channels, c_old):
                stop = min(start + c_old, in_channels)
                new.weight[:, start:stop] = w if stop - start == c_old else w.mean(dim=1, keepdim=True)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent_path, _, child = path.rpartition(".")
    parent = encoder.get_submodule(parent_path) if parent_path else encoder
    setattr(parent, child, new)
    if hasattr(parent, "num_channels"):  # transformers' Dinov2PatchEmbeddings checks its input against it
        parent.num_channels = in_channels
    parts = path.split(".")
    for depth in range(len(parts)):  # the encoder and every module on the way (a wrapped Dinov2Model)
        _set_config_channels(encoder.get_submodule(".".join(parts[:depth])), in_channels)
    return encoder


def _set_config_channels(encoder: nn.Module, in_channels: int) -> None:
    """Record the channel count in a diffusers (`in_channels`) or transformers (`num_channels`) config."""
    config = getattr(encoder, "config", None)
    if isinstance(encoder, ConfigMixin) and "in_channels" in encoder.config:
        encoder.register_to_config(in_channels=in_channels)
    elif config is not None and hasattr(config, "num_channels"):
        config.num_channels = in_channels


def add_encoder_lora(
    encoder: nn.Module, rank: int = 16, alpha: float | None = None, dropout: float = 0.0,
    target_modules: list[str] | None = None, train_projection: bool = True,
) -> nn.Module:
    """Inject peft LoRA into the encoder's linear layers, in place; only LoRA (and the first projection) train.

    `target_modules` defaults to every nn.Linear of the encoder (attention and MLP projections).
    `train_projection` keeps the first projection Conv2d fully trainable: the new channels of a
    widened encoder start at zero (or as copies) and need full-rank updates to learn the mask and
    scene inputs. Every other base weight is frozen.
    """
    full = [first_projection_path(encoder)] if train_projection else []
    return add_lora(encoder, rank, alpha, dropout, target_modules=target_modules, train_full=full)


def merge_encoder_lora(encoder: nn.Module) -> int:
    """Fold the encoder's LoRA adapters into its layers (plain names again, so it saves as an ordinary encoder)."""
    return merge_lora(encoder)
