"""The built-in image encoder (a small ViT)."""

from __future__ import annotations

import torch

from moca3d.models.image_encoder import ImageEncoder


def test_one_image_gives_every_gradient_its_parameters_strides():
    """DistributedDataParallel warns and copies when a gradient is strided unlike its bucket (one image per process)."""
    torch.manual_seed(0)
    encoder = ImageEncoder(image_size=32, patch_size=16, width=16, num_layers=1, num_heads=2)
    out = encoder(torch.rand(1, 3, 32, 32))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad.stride() == p.stride(), name
