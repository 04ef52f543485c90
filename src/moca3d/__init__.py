"""moca3d: compositional 3D generation with Mixture-of-Components (MoC) attention."""

__version__ = "0.1.0"



__all__ = ["__version__"]
