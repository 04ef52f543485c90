"""Converters from released checkpoints (TripoSG, PartCrafter) to moca3d folders (DESIGN.md §8)."""

from moca3d.convert.partcrafter import convert_partcrafter, load_partcrafter_transformer
from moca3d.convert.triposg import convert_triposg, load_triposg_transformer, load_triposg_vae, scheduler_from_triposg

__all__ = [
    "convert_triposg", "convert_partcrafter", "load_triposg_transformer", "load_partcrafter_transformer",
    "load_triposg_vae", "scheduler_from_triposg",
]
