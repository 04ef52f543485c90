"""TripoSG (VAST-AI-Research, MIT weights) -> moca3d: transformer, VAE, scheduler, image encoder.

TripoSG's DiT, as released (config keys `width` D, `num_attention_heads` H, `num_layers`,
`in_channels` C, `cross_attention_dim` Dc; d = D / H):

    t (B,) in [0, 1000] -> sinusoid [sin | cos] of width D -> Linear(D, 4D) -> GELU -> Linear(4D, D)
    x = [temb ; proj_in(latents)]                          timestep token first, no position encoding
    21 pre-LayerNorm blocks (eps 1e-5): self-attention, cross-attention to DINOv2 tokens, GELU FFN;
    blocks 0..9 push their output, blocks 11..20 pop it: x = skip_norm(skip_linear([skip ; x]))
    attention: fused q/k/v rows grouped per head, RMSNorm(d, eps 1e-6) on q and k, no bias
    out = proj_out(norm_out(x))[:, 1:]                     predicts Z_0 - eps (the opposite of ours)

Mapping table (block i; every source key is consumed, checked by `Consumer.finish`):

| TripoSG key                              | shape          | moca3d key                                | transform                         |
|------------------------------------------|----------------|-------------------------------------------|-----------------------------------|
| proj_in.{weight,bias}                    | (D, C), (D,)   | proj_in.*                                 | copy                              |
| time_proj.linear_1.{weight,bias}         | (4D, D), (4D,) | time_embed.linear_1.*                     | copy (time_freq_dim = D, GELU)    |
| time_proj.linear_2.{weight,bias}         | (D, 4D), (D,)  | time_embed.linear_2.*                     | copy                              |
| blocks.i.norm{1,2,3}.{weight,bias}       | (D,)           | blocks.i.norm{1,2,3}.*                    | copy                              |
| blocks.i.attn1.to_{q,k,v}.weight         | (D, D) x 3     | blocks.i.attn1.to_{q,k,v}.weight          | cat, split per head (q,k,v)       |
| blocks.i.attn1.to_out.0.{weight,bias}    | (D, D), (D,)   | blocks.i.attn1.to_out.*                   | copy                              |
| blocks.i.attn1.norm_{q,k}.weight         | (d,)           | blocks.i.attn1.norm_{q,k}.weight          | copy                              |
| blocks.i.attn2.to_q.weight               | (D, D)         | blocks.i.attn2.to_q.weight                | copy (queries are not fused)      |
| blocks.i.attn2.to_{k,v}.weight           | (D, Dc) x 2    | blocks.i.attn2.to_{k,v}.weight            | cat, split per head (k,v)         |
| blocks.i.attn2.to_out.0.{weight,bias}    | (D, D), (D,)   | blocks.i.attn2.to_out.*                   | copy                              |
| blocks.i.attn2.norm_{q,k}.weight         | (d,)           | blocks.i.attn2.norm_{q,k}.weight          | copy                              |
| blocks.i.ff.net.0.proj.{weight,bias}     | (4D, D), (4D,) | blocks.i.ff.net.0.proj.*                  | copy                              |
| blocks.i.ff.net.2.{weight,bias}          | (D, 4D), (D,)  | blocks.i.ff.net.2.*                       | copy                              |
| blocks.i.skip_linear.weight  (i > 10)    | (D, 2D)        | blocks.i.skip_linear.weight               | swap column halves ([skip;x]->[x;skip]) |
| blocks.i.skip_linear.bias, skip_norm.*   | (D,)           | blocks.i.skip_linear.bias, skip_norm.*    | copy (both apply norm after linear) |
| norm_out.{weight,bias}                   | (D,)           | norm_out.*                                | copy                              |
| proj_out.{weight,bias}                   | (C, D), (C,)   | proj_out.*                                | negate: Z_0 - eps -> eps - Z_0    |

New MoCA parameters (not in TripoSG), see `init_new_parameters`:

| moca3d key                               | init                 | why                                                       |
|------------------------------------------|----------------------|-----------------------------------------------------------|
| id_embedding.weight                      | zeros                | N = 1 output is exactly TripoSG's; ids are learned        |
| blocks.g.attn1.router.to_{q,k}.weight    | zeros                | every gate o_ij equal at the start ...                    |
| blocks.g.attn1.router.to_{q,k}.bias      | constant c           | ... and = sigmoid(GATE_INIT_LOGIT) ~ 0.95: routed keys    |
|                                          |                      | enter the prior's softmax almost unscaled (the global     |
|                                          |                      | block starts as the prior's self-attention over the       |
|                                          |                      | component plus its routed neighbours); gradients reach    |
|                                          |                      | the weights through the non-zero biases                   |
| packer.to_v.weight, packer.to_out.weight | identity             | compressed tokens start as averages of (normalised)       |
| packer.to_out.bias                       | zeros                | latent tokens, i.e. in the token space the prior's keys   |
|                                          |                      | and values were trained on                                |
| packer.to_q/to_k.weight                  | xavier (seeded)      | attention pattern of the summary, learned                 |
| packer.queries                           | N(0, 0.02) (seeded)  | distinct summary slots                                    |
| packer.norm.{weight,bias}                | ones, zeros          | plain LayerNorm                                           |

The z tokens never see p / anchor tokens (local mask) and, with N = 1, the global block reduces to
self-attention over the component's own z tokens, so only the zero ID embedding is needed for the
N = 1 velocity to equal TripoSG's (negated) output exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from moca3d.convert.common import (
    Consumer, Layout, StateDict, assemble, check_layout, read_config, read_safetensors_folder, source_dtype, split_per_head,
)
from moca3d.errors import CheckpointError, ConfigError

MLP_RATIO = 4  # TripoSG's FFN and timestep MLP widths are 4 D
GATE_INIT_LOGIT = 3.0  # router logit at conversion: sigmoid(3) ~ 0.953
PACKER_SEED = 0  # seeds the only random init of a conversion (packer queries, q/k), so it is reproducible
DEFAULT_NUM_LATENTS = 2048  # TripoSG's inference token count
DEFAULT_COMPRESSION = 8  # sigma, DESIGN §3
TRIPOSG_SUBFOLDERS = {"transformer": "transformer", "vae": "vae", "scheduler": "scheduler"}
DINO_CLASS = "Dinov2Model"
PIPELINE_SUBFOLDERS = ("transformer", "vae", "scheduler", "image_encoder")  # of the written moca3d folder
PARTCRAFTER_CONFIG_KEYS = ("enable_part_embedding", "global_attn_block_ids", "global_attn_block_id_range", "max_num_parts")


# ----------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------


def dit_dims(cfg: dict) -> Dict[str, int]:
    """Widths of a TripoSG-family DiT from its config.json (defaults: the released 1.5B model)."""
    dims = {
        "width": int(cfg.get("width", 2048)),
        "heads": int(cfg.get("num_attention_heads", 16)),
        "layers": int(cfg.get("num_layers", 21)),
        "in_channels": int(cfg.get("in_channels", 64)),
        "cond_dim": int(cfg.get("cross_attention_dim", 1024)),
    }
    if dims["width"] % dims["heads"]:
        raise CheckpointError(f"config: width {dims['width']} is not divisible by {dims['heads']} heads")
    if dims["layers"] % 2 == 0:
        raise CheckpointError(f"config: {dims['layers']} layers; TripoSG's long skips need an odd number")
    if cfg.get("use_cross_attention_2", False):
        raise CheckpointError("config: use_cross_attention_2 (a second condition stream) is not supported")
    return dims


def triposg_dit_layout(cfg: dict) -> Layout:
    """Every key of a TripoSG DiT state dict with its shape, in the order of the mapping table."""
    g = dit_dims(cfg)
    D, C, Dc, d, F = g["width"], g["in_channels"], g["cond_dim"], g["width"] // g["heads"], MLP_RATIO * g["width"]
    layout: Layout = {
        "proj_in.weight": (D, C), "proj_in.bias": (D,),
        "time_proj.linear_1.weight": (F, D), "time_proj.linear_1.bias": (F,),
        "time_proj.linear_2.weight": (D, F), "time_proj.linear_2.bias": (D,),
    }
    half = g["layers"] // 2
    for i in range(g["layers"]):
        p = f"blocks.{i}"
        for n in ("norm1", "norm2", "norm3"):
            layout[f"{p}.{n}.weight"] = (D,)
            layout[f"{p}.{n}.bias"] = (D,)
        for a, kv_dim in (("attn1", D), ("attn2", Dc)):
            layout[f"{p}.{a}.to_q.weight"] = (D, D)
            layout[f"{p}.{a}.to_k.weight"] = (D, kv_dim)
            layout[f"{p}.{a}.to_v.weight"] = (D, kv_dim)
            layout[f"{p}.{a}.to_out.0.weight"] = (D, D)
            layout[f"{p}.{a}.to_out.0.bias"] = (D,)
            layout[f"{p}.{a}.norm_q.weight"] = (d,)
            layout[f"{p}.{a}.norm_k.weight"] = (d,)
        layout[f"{p}.ff.net.0.proj.weight"] = (F, D)
        layout[f"{p}.ff.net.0.proj.bias"] = (F,)
        layout[f"{p}.ff.net.2.weight"] = (D, F)
        layout[f"{p}.ff.net.2.bias"] = (D,)
        if i > half:
            layout[f"{p}.skip_linear.weight"] = (D, 2 * D)
            layout[f"{p}.skip_linear.bias"] = (D,)
            layout[f"{p}.skip_norm.weight"] = (D,)
            layout[f"{p}.skip_norm.bias"] = (D,)
    layout.update({"norm_out.weight": (D,), "norm_out.bias": (D,), "proj_out.weight": (C, D), "proj_out.bias": (C,)})
    return layout


def moca_config_from_triposg(cfg: dict, num_latents: int = DEFAULT_NUM_LATENTS, compression: int = DEFAULT_COMPRESSION,
                             **overrides) -> dict:
    """MoCATransformer config reproducing a TripoSG DiT; `overrides` set MoCA options (global_blocks, topk_ratio, ...)."""
    g = dit_dims(cfg)
    config = dict(
        in_channels=g["in_channels"], num_latents=num_latents, width=g["width"], num_layers=g["layers"],
        num_heads=g["heads"], cond_dim=g["cond_dim"], mlp_ratio=float(MLP_RATIO), compression=compression,
        qk_norm=True, timestep_mode="token", long_skips=True,
        time_freq_dim=g["width"], time_hidden_dim=MLP_RATIO * g["width"], time_act="gelu", time_sin_first=True,
    )
    config.update(overrides)
    check_moca_config(config)
    return config


def check_moca_config(config: dict) -> None:
    """The MoCA options of a conversion (global blocks against the source's depth), before any weights are read."""
    from moca3d.models.transformer import global_block_indices

    global_block_indices(config["num_layers"], config.get("global_blocks", "even"))


def map_triposg_dit(state: StateDict, cfg: dict, where: Union[str, Path] = "transformer",
                    extra_layout: Optional[Layout] = None, extra_map: Optional[Dict[str, str]] = None) -> StateDict:
    """TripoSG DiT tensors -> moca3d tensors for every prior parameter (table in the module docstring).

    `extra_layout` / `extra_map` (moca3d key -> source key, copied) extend it for derived models (PartCrafter).
    """
    check_layout(state, {**triposg_dit_layout(cfg), **(extra_layout or {})}, where)
    g = dit_dims(cfg)
    H, D, half = g["heads"], g["width"], g["layers"] // 2
    src = Consumer(state, where)
    out: StateDict = {}
    copy = {"proj_in.weight": "proj_in.weight", "proj_in.bias": "proj_in.bias",
            "time_embed.linear_1.weight": "time_proj.linear_1.weight", "time_embed.linear_1.bias": "time_proj.linear_1.bias",
            "time_embed.linear_2.weight": "time_proj.linear_2.weight", "time_embed.linear_2.bias": "time_proj.linear_2.bias",
            "norm_out.weight": "norm_out.weight", "norm_out.bias": "norm_out.bias"}
    for i in range(g["layers"]):
        p = f"blocks.{i}"
        for n in ("norm1", "norm2", "norm3"):
            copy[f"{p}.{n}.weight"], copy[f"{p}.{n}.bias"] = f"{p}.{n}.weight", f"{p}.{n}.bias"
        for a in ("attn1", "attn2"):
            copy[f"{p}.{a}.to_out.weight"] = f"{p}.{a}.to_out.0.weight"
            copy[f"{p}.{a}.to_out.bias"] = f"{p}.{a}.to_out.0.bias"
            copy[f"{p}.{a}.norm_q.weight"] = f"{p}.{a}.norm_q.weight"
            copy[f"{p}.{a}.norm_k.weight"] = f"{p}.{a}.norm_k.weight"
        for n in ("ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias"):
            copy[f"{p}.{n}"] = f"{p}.{n}"
        # self-attention: rows of cat([q, k, v]) are grouped per head
        fused = torch.cat([src(f"{p}.attn1.to_{n}.weight") for n in "qkv"], dim=0)  # (3D, D)
        for n, w in zip("qkv", split_per_head(fused, H, 3)):
            out[f"{p}.attn1.to_{n}.weight"] = w
        # cross-attention: queries plain, rows of cat([k, v]) grouped per head
        out[f"{p}.attn2.to_q.weight"] = src(f"{p}.attn2.to_q.weight")
        fused = torch.cat([src(f"{p}.attn2.to_{n}.weight") for n in "kv"], dim=0)  # (2D, Dc)
        for n, w in zip("kv", split_per_head(fused, H, 2)):
            out[f"{p}.attn2.to_{n}.weight"] = w
        if i > half:
            w = src(f"{p}.skip_linear.weight")  # (D, 2D) acting on [skip ; x]; ours acts on [x ; skip]
            out[f"{p}.skip_linear.weight"] = torch.cat([w[:, D:], w[:, :D]], dim=1)
            for n in ("skip_linear.bias", "skip_norm.weight", "skip_norm.bias"):
                copy[f"{p}.{n}"] = f"{p}.{n}"
    copy.update(extra_map or {})
    for dst, key in copy.items():
        out[dst] = src(key)
    # velocity sign (DESIGN §5): TripoSG predicts Z_0 - eps, moca3d eps - Z_0
    out["proj_out.weight"] = -src("proj_out.weight")
    out["proj_out.bias"] = -src("proj_out.bias")
    src.finish()
    return out


def init_new_parameters(config: dict, filled: StateDict, seed: int = PACKER_SEED) -> StateDict:
    """Tensors for every MoCA parameter TripoSG lacks (table in the module docstring)."""
    D, heads = config["width"], config["num_heads"]
    g = torch.Generator().manual_seed(seed)
    new: StateDict = {}
    if "id_embedding.weight" not in filled:
        new["id_embedding.weight"] = torch.zeros(config.get("id_codebook_size", 50), D)
    num_slots = config["num_latents"] // config["compression"] + 1  # [p ; pbar]
    new["packer.queries"] = 0.02 * torch.randn(num_slots, D, generator=g)
    new["packer.norm.weight"], new["packer.norm.bias"] = torch.ones(D), torch.zeros(D)
    bound = math.sqrt(6.0 / (2 * D))  # xavier-uniform bound of a (D, D) matrix
    new["packer.to_q.weight"] = (torch.rand(D, D, generator=g) * 2 - 1) * bound
    new["packer.to_k.weight"] = (torch.rand(D, D, generator=g) * 2 - 1) * bound
    new["packer.to_v.weight"] = torch.eye(D)
    new["packer.to_out.weight"], new["packer.to_out.bias"] = torch.eye(D), torch.zeros(D)
    if config.get("attention_mode", "moc") == "moc":
        from moca3d.models.transformer import global_block_indices

        router_heads = heads if config.get("multihead_routing", True) else 1
        dr = D // router_heads
        # logit = (c 1) . (c 1) / sqrt(dr) = c^2 sqrt(dr) = GATE_INIT_LOGIT
        c = math.sqrt(GATE_INIT_LOGIT / math.sqrt(dr))
        for i in global_block_indices(config["num_layers"], config.get("global_blocks", "even")):
            for n in ("to_q", "to_k"):
                new[f"blocks.{i}.attn1.router.{n}.weight"] = torch.zeros(D, D)
                new[f"blocks.{i}.attn1.router.{n}.bias"] = torch.full((D,), c)
    return new


def load_triposg_transformer(folder: Union[str, Path], num_latents: int = DEFAULT_NUM_LATENTS,
                             compression: int = DEFAULT_COMPRESSION, dtype: Optional[torch.dtype] = None, **overrides):
    """A MoCATransformer from TripoSG's `transformer/` folder (config.json + safetensors), meta-device built."""
    from moca3d.models.transformer import MoCATransformer

    folder = Path(folder)
    cfg = read_config(folder)
    if cfg.get("_class_name") == "PartCrafterDiTModel" or any(k in cfg for k in PARTCRAFTER_CONFIG_KEYS):
        raise CheckpointError(f"{folder}: this is a PartCrafter transformer; use `moca3d convert partcrafter`")
    config = moca_config_from_triposg(cfg, num_latents, compression, **overrides)
    state = read_safetensors_folder(folder)
    tensors = map_triposg_dit(state, cfg, folder)
    tensors.update(init_new_parameters(config, tensors))
    return assemble(MoCATransformer, config, tensors, dtype if dtype is not None else source_dtype(state), folder)


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------

VAE_CONFIG_KEYS = ("in_channels", "latent_channels", "num_attention_heads", "width_encoder", "width_decoder",
                   "num_layers_encoder", "num_layers_decoder", "embed_frequency", "embed_include_pi")
VAE_OPTIONAL_KEYS = ("embedder.frequencies",)  # a non-persistent buffer, present only in some exports


def vae_config_from_triposg(cfg: dict, num_latents: int = DEFAULT_NUM_LATENTS) -> dict:
    """VecSetVAE config from TripoSG's `vae/config.json` (xyz + normals in, Fourier 2^0..2^(F-1) with input)."""
    if cfg.get("embedding_type", "frequency") != "frequency":
        raise CheckpointError(f"vae config: embedding_type {cfg['embedding_type']!r} is not supported")
    config = {k: cfg[k] for k in VAE_CONFIG_KEYS if k in cfg}
    config.update(point_feature_channels=3, num_latents=num_latents)
    return config


def vae_layout(config: dict) -> Layout:
    """TripoSG's VAE keys equal VecSetVAE's by construction (vae.py); shapes from a meta-device model."""
    from accelerate import init_empty_weights

    from moca3d.models.vae import VecSetVAE

    with init_empty_weights():
        model = VecSetVAE(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_vae_state_dict(state_dict: StateDict, num_heads: int) -> StateDict:
    """Map a TripoSG VAE state dict onto VecSetVAE's layout.

    TripoSG stores q|k|v (self-attention) and k|v (cross-attention) so that, once concatenated, the
    rows are grouped per head ([q_h, k_h, v_h] for each head h); this model uses plain separate
    projections, so the rows are regrouped (`split_per_head`, as for the DiT). TripoSG's decoder also
    returns the negated projection, so `decoder.proj_out` is negated to keep "positive inside" equal.
    """
    out = dict(state_dict)
    prefixes = sorted({k.rsplit(".", 2)[0] for k in state_dict if k.endswith("to_k.weight")})
    for prefix in prefixes:
        names = ["to_q", "to_k", "to_v"] if f"{prefix}.to_q.weight" in state_dict and prefix.endswith("attn1") else ["to_k", "to_v"]
        fused = torch.cat([state_dict[f"{prefix}.{n}.weight"] for n in names], dim=0)  # (n*D, Din)
        for n, weight in zip(names, split_per_head(fused, num_heads, len(names))):
            out[f"{prefix}.{n}.weight"] = weight
    for key in ("decoder.proj_out.weight", "decoder.proj_out.bias"):
        if key in out:
            out[key] = -out[key]
    return out


def load_triposg_vae(folder: Union[str, Path], num_latents: int = DEFAULT_NUM_LATENTS, dtype: Optional[torch.dtype] = None):
    """A VecSetVAE from TripoSG's `vae/` folder: per-head q/k/v regrouped, decoder output sign kept."""
    from moca3d.models.vae import VecSetVAE

    folder = Path(folder)
    config = vae_config_from_triposg(read_config(folder), num_latents)
    state = read_safetensors_folder(folder)
    check_layout(state, vae_layout(config), folder, optional=VAE_OPTIONAL_KEYS)
    if "embedder.frequencies" in state:
        freqs = 2.0 ** torch.arange(config.get("embed_frequency", 8), dtype=torch.float32)
        if config.get("embed_include_pi", False):
            freqs = freqs * math.pi
        if not torch.allclose(state["embedder.frequencies"].float(), freqs):
            raise CheckpointError(f"{folder}: 'embedder.frequencies' are not 2^0..2^(F-1)")
        state = {k: v for k, v in state.items() if k != "embedder.frequencies"}
    tensors = convert_vae_state_dict(state, config.get("num_attention_heads", 8))
    return assemble(VecSetVAE, config, tensors, dtype if dtype is not None else source_dtype(state), folder)


# ----------------------------------------------------------------------------------------------
# Scheduler, image encoder, whole folders
# ----------------------------------------------------------------------------------------------


def scheduler_from_triposg(folder: Union[str, Path]):
    """FlowMatchEulerDiscreteScheduler with TripoSG's train timesteps and shift (its sign is handled by proj_out)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    cfg = read_config(folder, "scheduler_config.json")
    if cfg.get("use_dynamic_shifting", False):
        raise CheckpointError(f"{folder}: dynamic shifting is not supported")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                                           shift=float(cfg.get("shift", 1.0)))


def find_subfolder(root: Path, class_name: str, default: str) -> Path:
    """The subfolder model_index.json assigns to `class_name` (e.g. image_encoder_dinov2), else `default`."""
    if (root / "model_index.json").is_file():
        for name, value in read_config(root, "model_index.json").items():
            if isinstance(value, list) and len(value) == 2 and value[1] == class_name:
                return root / name
    return root / default


def write_pipeline_folder(dst: Union[str, Path], transformer, vae, scheduler, image_encoder_dir: Path,
                          source: str) -> Path:
    """A moca3d pipeline folder: transformer/, vae/, scheduler/, image_encoder/ (DINOv2 copied), model_index.json last."""
    from moca3d.pipeline import _version

    root = Path(dst)
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").unlink(missing_ok=True)  # over an earlier conversion: incomplete until the end
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    scheduler.save_config(root / "scheduler")
    if (root / "image_encoder").exists():
        shutil.rmtree(root / "image_encoder")
    shutil.copytree(image_encoder_dir, root / "image_encoder")
    index = {"_class_name": "MoCAPipeline", "_moca3d_version": _version(), "_converted_from": source,
             "transformer": ["moca3d", "MoCATransformer"], "vae": ["moca3d", "VecSetVAE"],
             "image_encoder": ["transformers", DINO_CLASS], "scheduler": ["diffusers", type(scheduler).__name__]}
    tmp = root / "model_index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, root / "model_index.json")
    return root


def check_source_folder(src: Path) -> Dict[str, Path]:
    """The subfolders of a TripoSG-style folder; one clear error for the first one missing."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: folder missing")
    parts = {name: src / sub for name, sub in TRIPOSG_SUBFOLDERS.items()}
    parts["image_encoder"] = find_subfolder(src, DINO_CLASS, "image_encoder_dinov2")
    for name, path in parts.items():
        if not path.is_dir():
            raise CheckpointError(f"{src}: subfolder '{path.name}/' ({name}) missing")
    read_config(parts["image_encoder"])
    # DINOv2 is copied as is: its weights are checked here (present, readable, finite), not by the pipeline's
    # first load after a conversion that reported success
    read_safetensors_folder(parts["image_encoder"])
    return parts


def convert_triposg(src: Union[str, Path], dst: Union[str, Path], num_latents: int = DEFAULT_NUM_LATENTS,
                    compression: int = DEFAULT_COMPRESSION, dtype: Optional[torch.dtype] = None, **overrides) -> Path:
    """TripoSG folder (transformer/, vae/, scheduler/, image_encoder_dinov2/) -> moca3d pipeline folder.

    `dtype` is written for the transformer and VAE (None: the source's dtype, float32 if it mixes several);
    DINOv2 is copied as it is.
    """
    return convert_release(src, dst, load_triposg_transformer, "TripoSG", num_latents, compression, dtype, **overrides)


def convert_release(src, dst, load_transformer, name: str, num_latents: int, compression: int,
                    dtype: Optional[torch.dtype] = None, **overrides) -> Path:
    """A TripoSG-family release folder -> moca3d pipeline folder, its transformer read by `load_transformer`."""
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    replaced = [dst_path / sub for sub in PIPELINE_SUBFOLDERS]  # what write_pipeline_folder overwrites
    if src_path == dst_path or any(r == src_path or r in src_path.parents for r in replaced):
        raise ConfigError(f"DST {dst} would overwrite SRC {src} (with its transformer/, vae/, ...); choose another folder")
    parts = check_source_folder(Path(src))
    transformer = load_transformer(parts["transformer"], num_latents, compression, dtype, **overrides)
    vae = load_triposg_vae(parts["vae"], num_latents, dtype)
    scheduler = scheduler_from_triposg(parts["scheduler"])
    return write_pipeline_folder(dst, transformer, vae, scheduler, parts["image_encoder"], name)
