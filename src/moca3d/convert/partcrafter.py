"""PartCrafter (VAST-AI-Research, MIT weights) -> moca3d, in the dense-global baseline mode.

PartCrafter is TripoSG's DiT (same keys, see `moca3d.convert.triposg`) plus:

| PartCrafter key / config            | shape / value        | moca3d                                        |
|-------------------------------------|----------------------|-----------------------------------------------|
| part_embedding.weight               | (max_num_parts, D)   | id_embedding.weight (copy); ids are 0..N-1    |
|                                     |                      | (id_assignment="sequential"), as PartCrafter  |
|                                     |                      | adds part_embedding(arange(N))                |
| global_attn_block_ids / _id_range   | block indices        | global_blocks (that list), attention_mode     |
|                                     |                      | "dense": every token of every part attends to |
|                                     |                      | all tokens (timestep token included) of all   |
|                                     |                      | parts — PartCrafter's global processor        |
| enable_{local,global}_cross_attn    | must be true         | (false would zero the condition in some       |
|                                     |                      | blocks; not supported, refused)               |

PartCrafter's global processor also reshapes the cross-attention, but with one image shared by
all parts it attends to the same condition tokens, so it equals the per-part cross-attention.
The packer tokens are initialised as for TripoSG; in dense mode no router exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Union

import torch

from moca3d.convert.common import assemble, read_config, read_safetensors_folder, source_dtype
from moca3d.convert.triposg import (
    DEFAULT_COMPRESSION, DEFAULT_NUM_LATENTS, convert_release, dit_dims, init_new_parameters, map_triposg_dit,
    moca_config_from_triposg,
)
from moca3d.errors import CheckpointError

DEFAULT_MAX_PARTS = 32  # PartCrafter's max_num_parts


def global_block_ids(cfg: dict) -> List[int]:
    """PartCrafter's global-attention blocks from `global_attn_block_ids` or the inclusive `_id_range`."""
    ids = cfg.get("global_attn_block_ids")
    if ids is None:
        rng = cfg.get("global_attn_block_id_range")
        if rng is not None and not (isinstance(rng, list) and len(rng) == 2):
            raise CheckpointError(f"global_attn_block_id_range must be [first, last], got {json.dumps(rng)}")
        ids = list(range(rng[0], rng[1] + 1)) if rng is not None else []
    return sorted(int(i) for i in ids)


def moca_config_from_partcrafter(cfg: dict, num_latents: int = DEFAULT_NUM_LATENTS,
                                 compression: int = DEFAULT_COMPRESSION, **overrides) -> dict:
    """MoCATransformer config reproducing a PartCrafter DiT (dense global blocks, sequential part ids)."""
    for flag in ("enable_local_cross_attn", "enable_global_cross_attn"):
        if not cfg.get(flag, True):
            raise CheckpointError(f"config: {flag}=false (condition dropped in some blocks) is not supported")
    base = dict(attention_mode="dense", global_blocks=global_block_ids(cfg),
                id_codebook_size=int(cfg.get("max_num_parts", DEFAULT_MAX_PARTS)), id_assignment="sequential")
    base.update(overrides)
    return moca_config_from_triposg(cfg, num_latents, compression, **base)


def load_partcrafter_transformer(folder: Union[str, Path], num_latents: int = DEFAULT_NUM_LATENTS,
                                 compression: int = DEFAULT_COMPRESSION, dtype: Optional[torch.dtype] = None, **overrides):
    """A MoCATransformer (dense-global mode) from PartCrafter's `transformer/` folder, meta-device built."""
    from moca3d.models.transformer import MoCATransformer

    folder = Path(folder)
    cfg = read_config(folder)
    if cfg.get("_class_name") == "TripoSGDiTModel":
        raise CheckpointError(f"{folder}: this is a TripoSG transformer; use `moca3d convert triposg`")
    config = moca_config_from_partcrafter(cfg, num_latents, compression, **overrides)
    extra_layout, extra_map = {}, {}
    if cfg.get("enable_part_embedding", True):
        extra_layout["part_embedding.weight"] = (config["id_codebook_size"], dit_dims(cfg)["width"])
        extra_map["id_embedding.weight"] = "part_embedding.weight"
    state = read_safetensors_folder(folder)
    tensors = map_triposg_dit(state, cfg, folder, extra_layout, extra_map)
    tensors.update(init_new_parameters(config, tensors))
    return assemble(MoCATransformer, config, tensors, dtype if dtype is not None else source_dtype(state), folder)


def convert_partcrafter(src: Union[str, Path], dst: Union[str, Path], num_latents: int = DEFAULT_NUM_LATENTS,
                        compression: int = DEFAULT_COMPRESSION, dtype: Optional[torch.dtype] = None, **overrides) -> Path:
    """PartCrafter folder (transformer/, vae/, scheduler/, image_encoder_dinov2/) -> moca3d pipeline folder."""
    return convert_release(src, dst, load_partcrafter_transformer, "PartCrafter", num_latents, compression, dtype, **overrides)
