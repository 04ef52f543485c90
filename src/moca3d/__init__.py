"""moca3d: compositional 3D generation with Mixture-of-Components (MoC) attention."""

__version__ = "0.1.0"

_LAZY = {
    "MoCAPipeline": "moca3d.pipeline",
    "MoCAOutput": "moca3d.pipeline",
    "MoCATransformer": "moca3d.models.transformer",
    "VecSetVAE": "moca3d.models.vae",
    "ImageEncoder": "moca3d.models.image_encoder",
    "MoCAttention": "moca3d.attention",
    "MoCAttentionConfig": "moca3d.attention",
}


def __getattr__(name):
    """Import the public classes on first use, so `import moca3d` (and the CLI) stays fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moca3d' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]


def __dir__():
    """The module's names with the lazily imported classes among them (for tab completion and `dir`)."""
    return sorted({*globals(), *_LAZY})
