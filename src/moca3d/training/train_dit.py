"""Rectified-flow training of the MoCA transformer and image encoder (DESIGN.md §5), on accelerate.

One command runs on the CPU, one GPU or many (`accelerate launch` / torchrun, DDP). Every random
draw of a step comes from a generator seeded by (seed, step): the global batch is the same
whatever the number of processes (each takes its slice), and a resumed run continues exactly.

Data: a prepared dataset (`moca3d prepare`) with cached latents (`moca3d encode-dataset`):
ROOT/assets/<id>/latents.safetensors ("latents": (N, L, C)) and render.png; or one cache file of the
training split (`moca3d cache-latents`: latents and 8-bit preprocessed images; for scenes the 8-bit scene
crops and instance masks), which starts in seconds.

Scenes (`"condition": "scene"`, issue 7): fine-tune an object pipeline folder (`init_from`) on
prepared scenes (render.png + mask.png label maps). The encoder's first projection is widened to
7 channels (instance-masked RGB, scene RGB, mask; see moca3d.data.scene), LoRA is injected into
its linear layers, and each component is conditioned on its own instance: cond (B, N, M, D).
The exported pipeline has the LoRA merged into a plain 7-channel encoder; with transformer_lora_rank,
OUT/lora also holds what the run changed, for `MoCAPipeline.from_pretrained(init_from, lora=OUT/lora)`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from moca3d import flow
from moca3d.attention.config import BACKENDS as ATTENTION_BACKENDS
from moca3d.data.dataset import (OBJECT_CACHE, check_latent_encoder, check_latent_lengths, common_encoder, common_token_order, load_cached_latents, load_latent_cache, pad_components, read_manifest,
                                 report_missing_latents, report_too_many_parts, require_token_order, save_latent_cache, PARTS_OPTION)
from moca3d.data.images import load_image, preprocess_image
from moca3d.data.scene import conditions_layout
from moca3d.defaults import TRAINED_KEY
from moca3d.errors import ConfigError, InputError, warn_input
from moca3d.evaluation import evaluate_pipeline, select_records
from moca3d.models.dino import CROP_SIZE, is_dino, is_dino_folder, load_image_encoder
from moca3d.models.image_encoder import (SCENE_CHANNELS, WIDEN_INITS, ImageEncoder, add_encoder_lora, encode_views,
                                        first_projection_path, input_channels, widen_input_channels)
from moca3d.models.lora import add_lora, lora_spec, merge_lora, save_adapter, trainable_summary
from moca3d.models.transformer import PRIOR_FREE_MODULES, MoCATransformer
from moca3d.models.vae import VecSetVAE
from moca3d.pipeline import MoCAPipeline  # at import: a long run validates and exports with the code it started with
from moca3d.progress import Lines, Show
from moca3d.training.stop import TrainingStopped, stop_requests
from moca3d.training.recipe import Recipe, check_resume, check_same_data, data_identity, lr_at, record_run_config
from moca3d.training.distributed import batch_rows, process_max, process_maxima
from moca3d.training.train_vae import encoder_id, load_vae_folder
from moca3d.training.checkpoints import (EMA, claim_run, fingerprint, frozen_fingerprint, latest_checkpoint, load_checkpoint,
                                         release_run, save_checkpoint, state_dict_mismatch, trim_log)

SEED_STRIDE = 1_000_003
CONDITIONS = ("object", "scene")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")  # accelerate's, "auto" resolved by the device


@dataclass
class DiTTrainConfig(Recipe):
    """A DiT training recipe (JSON: these fields; model configs under "transformer" and "image_encoder")."""

    recipe_name = "DiT training"

    transformer: dict[str, Any] = field(default_factory=dict)
    image_encoder: dict[str, Any] = field(default_factory=dict)
    steps: int = 2000
    batch_size: int = 8  # global batch (split across processes)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_drop: float = 0.1  # probability of a zero condition (classifier-free guidance)
    timestep_distribution: str = "logit_normal"
    # logit-normal location and scale (SD3): a positive mean trains more at high noise, where the layout is decided
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    max_components: int = 32  # assets with more parts are skipped
    group_by_parts: int = 0  # > 0: each batch comes from a window of this many assets of similar part count (less padding)
    mixed_precision: str = "auto"  # MIXED_PRECISIONS: "auto": bf16 on CUDA, fp32 on the CPU; or "no" / "bf16" / "fp16"
    gradient_checkpointing: bool = False
    # the MoC backend while training (the saved model keeps its own, "auto"); e.g. "fused" on CUDA: Triton kernels
    # with no gathered context, so less memory at many parts (not yet timed on a GPU; docs/RESULTS.md)
    attention_backend: Optional[str] = None
    # > 0: stop after this many seconds of training, checkpoint and export as at the end; the LR schedule
    # then follows the further of step / steps and elapsed / time_limit_s, so it ends at the limit
    time_limit_s: float = 0.0
    log_every: int = 25
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    seed: int = 0
    num_threads: int = 0
    # validation generations (object runs with a VAE): EMA weights, the first val assets, DESIGN §6 metrics
    validate_every: int = 0  # 0: off
    val_assets: int = 4
    val_steps: int = 25
    val_guidance: float = 7.0
    val_resolution: int = 64
    # scenes (issue 7): per-instance 7-channel conditions, fine-tuned from an object pipeline
    condition: str = "object"  # "object": one image per sample; "scene": one 7-channel stack per component
    init_from: Optional[str] = None  # a pipeline folder to start from (its VAE is reused): scenes, or object fine-tuning
    # keep the (pre-trained or DINOv2) encoder fixed, as TripoSG does; None: fixed in an object LoRA fine-tune
    # (transformer_lora_rank > 0: the memory-lean one), else trained
    freeze_image_encoder: Optional[bool] = None
    # a pre-trained image encoder folder (`moca3d pretrain-encoder`'s image_encoder/) for a fresh transformer,
    # or for a scene recipe the (scene-pre-trained, 3- or 7-channel) encoder to use instead of init_from's
    image_encoder_from: Optional[str] = None
    widen_init: str = "zero"  # scene: "zero" or "clone" for the encoder's 4 new input channels
    lora_rank: int = 16  # scene: LoRA rank of the encoder's linear layers
    lora_alpha: Optional[float] = None  # scene: LoRA scale numerator (default: the rank)
    lora_dropout: float = 0.0
    train_projection: bool = True  # scene: the widened first projection trains in full, next to the LoRA
    # > 0: fine-tune init_from's transformer with LoRA of this rank (peft) instead of in full: its layers stay
    # frozen (no gradients, no optimizer state; a large prior fits one GPU), the parts of MoCA a TripoSG prior
    # lacks (packer, router, ID embedding) train in full; the exported transformer has the adapters merged
    transformer_lora_rank: int = 0
    transformer_lora_alpha: Optional[float] = None  # LoRA scale numerator (default: the rank)
    transformer_lora_dropout: float = 0.0

    def check(self) -> None:
        """Raise ConfigError for values out of range; resolve freeze_image_encoder's None."""
        if self.freeze_image_encoder is None:  # one rule for the recipe key and train's --lora-rank
            self.freeze_image_encoder = bool(self.transformer_lora_rank) and self.condition == "object"
        self.check_positive("steps", "batch_size", "log_every", "checkpoint_every", "max_components")
        self.check_schedule()
        self.check_optimizer()
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}")
        if not self.validate_every >= 0:
            raise ConfigError(f"validate_every must be >= 0 (0: off), got {self.validate_every}")
        self.check_model_keys("transformer", MoCATransformer)
        self.check_model_keys("image_encoder", ImageEncoder)
        if self.group_by_parts < 0:
            raise ConfigError(f"group_by_parts must be >= 0, got {self.group_by_parts}")
        if not 0 <= self.cfg_drop < 1:
            raise ConfigError(f"cfg_drop must be in [0, 1), got {self.cfg_drop}")
        if self.condition not in CONDITIONS:
            raise ConfigError(f"condition must be one of {', '.join(CONDITIONS)}, got {self.condition!r}")
        if self.condition == "scene" and not self.init_from:
            raise ConfigError("a scene recipe needs init_from: the object pipeline folder to fine-tune")
        if self.widen_init not in WIDEN_INITS:
            raise ConfigError(f"widen_init must be one of {', '.join(WIDEN_INITS)}, got {self.widen_init!r}")
        if self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be positive, got {self.lora_rank}")
        if self.transformer_lora_rank < 0:
            raise ConfigError(f"transformer_lora_rank must be >= 0 (0: full fine-tuning), got {self.transformer_lora_rank}")
        if self.transformer_lora_rank and not self.init_from:
            raise ConfigError("transformer_lora_rank fine-tunes a trained transformer: give init_from (a pipeline folder)")
        if self.transformer_lora_alpha is not None and not self.transformer_lora_alpha > 0:
            raise ConfigError(f"transformer_lora_alpha must be positive, got {self.transformer_lora_alpha}")
        if not 0 <= self.transformer_lora_dropout < 1:
            raise ConfigError(f"transformer_lora_dropout must be in [0, 1), got {self.transformer_lora_dropout}")
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}")
        if not 0 <= self.time_limit_s < math.inf:
            raise ConfigError(f"time_limit_s must be >= 0, got {self.time_limit_s}")
        if self.timestep_distribution not in flow.TIMESTEP_DISTRIBUTIONS:
            raise ConfigError(f"timestep_distribution must be one of {', '.join(flow.TIMESTEP_DISTRIBUTIONS)}, got {self.timestep_distribution!r}")
        if not self.timestep_std > 0 or not math.isfinite(self.timestep_mean):
            raise ConfigError(f"timestep_std must be positive and timestep_mean finite, got {self.timestep_std}, {self.timestep_mean}")
        if self.image_encoder_from and (self.image_encoder or (self.init_from and self.condition != "scene")):
            raise ConfigError("image_encoder_from replaces both init_from's encoder and an image_encoder config: give one"
                              " (a scene recipe may name both: the transformer from init_from, the encoder from image_encoder_from)")
        if self.freeze_image_encoder and not (self.init_from or self.image_encoder_from):
            raise ConfigError("freeze_image_encoder needs a trained encoder (init_from or image_encoder_from), not a random one")


class LatentDataset:
    """In-memory latents (N, L, C) and preprocessed renders of a prepared dataset split."""

    def __init__(self, root: str | Path, split: str, image_size: Union[int, Callable[[Path], torch.Tensor]], max_components: int = 32,
                 parts_option: tuple[str, str] = PARTS_OPTION):
        """`image_size`: the small encoder's size, or the encoder's own preprocessing (path -> (3, S, S)); `parts_option`:
        the setting named when assets of more than `max_components` parts are left out (`report_too_many_parts`)."""
        self.root = Path(root)
        preprocess = image_size if callable(image_size) else (lambda path: preprocess_image(path, image_size))
        self.latents: list[torch.Tensor] = []
        self.images: list[torch.Tensor] = []
        self.ids: list[str] = []
        orders, encoders, missing, too_many = set(), set(), [], []
        for rec in read_manifest(root, split):
            asset = self.root / "assets" / rec["id"]
            path = asset / "latents.safetensors"
            if rec["num_components"] > max_components:
                too_many.append(rec["id"])
                continue
            if not path.is_file():
                missing.append(rec["id"])
                continue
            latents, made = load_cached_latents(path)
            self.latents.append(latents)
            orders.add(made["token_order"])
            encoders.add(made["encoder"])
            self.images.append(preprocess(asset / "render.png"))
            self.ids.append(rec["id"])
        too_many_note = report_too_many_parts(too_many, len(self.ids), root, f"'{split}' assets", max_components, parts_option)
        if not self.ids:
            raise InputError(f"{root}: no '{split}' assets with cached latents"
                             + (" (run `moca3d encode-dataset` first)" if missing else "") + too_many_note)
        report_missing_latents(missing, root, split)
        check_latent_lengths(self.latents, root)
        self.token_order = common_token_order(orders, root)  # VecSetVAE.encode's token_order
        self.encoder = common_encoder(encoders, root)  # the VAE encoder's id (None: not recorded)

    def __len__(self) -> int:
        return len(self.ids)

    def save_cache(self, path: str | Path) -> Path:
        """One safetensors file with every latent and image (uint8) of the split: a fast start for big datasets."""
        images = torch.stack(self.images)  # (A, 3, S, S) in [0, 1]
        pixels = (images * 255).round()
        if not torch.equal(pixels / 255, images):
            raise ConfigError("a latent cache holds 8-bit images: this encoder's preprocessing gives other values")
        return save_latent_cache(path, OBJECT_CACHE, self.latents, self.ids, self.token_order, self.encoder, images=pixels.to(torch.uint8))

    @classmethod
    def from_cache(cls, path: str | Path, max_components: int = 32, image_size: Optional[int] = None) -> "LatentDataset":
        """A dataset from `save_cache`'s file (assets with more than `max_components` parts left out)."""
        cache = load_latent_cache(path, OBJECT_CACHE, max_components, image_size)
        self = cls.__new__(cls)
        self.root = Path(path).parent
        self.latents, self.ids, self.token_order, self.encoder = cache["latents"], cache["ids"], cache["token_order"], cache["encoder"]
        self.images = [im.float() / 255 for im in cache["images"]]
        return self

    def to(self, device) -> "LatentDataset":
        """Move every latent and image to `device` (batches are then assembled there)."""
        self.latents = [z.to(device) for z in self.latents]
        self.images = [im.to(device) for im in self.images]
        return self

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Pad to the largest part count: latents (B, N, L, C), component_mask (B, N), images (B, 3, S, S)."""
        latents, mask = pad_components([self.latents[i] for i in indices])
        return {"latents": latents, "component_mask": mask, "images": torch.stack([self.images[i] for i in indices])}


class Generator(nn.Module):
    """The trained pair: image encoder and transformer (one module for DDP, checkpoints and EMA)."""

    def __init__(self, transformer: MoCATransformer, image_encoder: ImageEncoder):
        super().__init__()
        self.transformer = transformer
        self.image_encoder = image_encoder

    def forward(self, latents, timestep, images, component_mask, drop, ids, routing_seeds):
        """Velocity prediction; `drop` (B,) bool zeroes the condition (CFG dropout)."""
        cond = self.image_encoder(images)  # (B, M, D)
        cond = cond * (~drop).view(-1, 1, 1).to(cond.dtype)
        return self.transformer(latents, timestep, cond, component_mask=component_mask, ids=ids, routing_seeds=routing_seeds)


def build_models(cfg: DiTTrainConfig, latent_shape: tuple[int, int], encoder=None) -> Generator:
    """Models from the recipe (or from the pipeline `init_from`, whose encoder may be passed in already loaded)."""
    if cfg.init_from:
        root = init_folder(cfg)
        encoder = encoder if encoder is not None else load_encoder(root)
        if cfg.freeze_image_encoder:
            encoder.requires_grad_(False)
        return Generator(load_transformer(root, cfg, latent_shape), encoder)
    if cfg.image_encoder_from:
        encoder = encoder if encoder is not None else ImageEncoder.from_pretrained(pretrained_encoder_folder(cfg))
    else:
        encoder = ImageEncoder(**cfg.image_encoder)
    if cfg.freeze_image_encoder:
        encoder.requires_grad_(False)
    tcfg = {"num_latents": latent_shape[0], "in_channels": latent_shape[1], **cfg.transformer, "cond_dim": encoder.out_dim}
    return Generator(MoCATransformer(**tcfg), encoder)


class SceneGenerator(Generator):
    """The trained pair for scenes: each component is conditioned on its own 7-channel instance stack."""

    def forward(self, latents, timestep, images, component_mask, drop, ids, routing_seeds):
        """Velocity prediction from images (B, N, 7 * views, S, S); padded components are not encoded."""
        B, N = images.shape[:2]
        tokens = encode_views(self.image_encoder, images[component_mask])  # (K, views * M, D): the K real components
        cond = tokens.new_zeros(B, N, *tokens.shape[1:])
        cond[component_mask] = tokens  # (B, N, M, D)
        cond = cond * (~drop).view(-1, 1, 1, 1).to(cond.dtype)
        # the mask layout is structure, like N: kept when the condition is dropped (and at sampling's unconditional pass)
        layout = conditions_layout(images) if self.transformer.config.layout_features else None  # (B, N, 8)
        return self.transformer(latents, timestep, cond, component_mask=component_mask, ids=ids, routing_seeds=routing_seeds,
                                layout=layout)


def pretrained_encoder_folder(cfg: DiTTrainConfig) -> Path:
    """The pre-trained encoder folder `image_encoder_from`, checked."""
    root = Path(cfg.image_encoder_from or "")
    if not (root / "config.json").is_file():
        raise ConfigError(f"image_encoder_from {root}: not an image encoder folder (config.json missing)")
    if is_dino_folder(root):
        raise ConfigError(f"image_encoder_from {root}: a DINOv2 folder; it takes a moca3d image encoder (`pretrain-encoder`'s), "
                          "and a converted pipeline's DINOv2 comes with it (init_from)")
    return root


def init_folder(cfg: DiTTrainConfig) -> Path:
    """The pipeline folder a scene recipe starts from, checked."""
    root = Path(cfg.init_from or "")
    if not (root / "model_index.json").is_file():
        raise ConfigError(f"init_from {root}: not a moca3d pipeline folder (model_index.json missing)")
    return root


def warn_other_latent_space(vae: VecSetVAE, vae_dir: Path, root: Path) -> None:
    """An InputWarning when a fine-tune's VAE is not its base pipeline's (`root`/vae) and encodes or scales latents
    otherwise: the base transformer learned the latents of its own VAE, so it starts from a prior of other latents."""
    base_dir = root / "vae"
    if vae_dir.resolve() == base_dir.resolve() or not (base_dir / "config.json").is_file():
        return
    base = load_vae_folder(base_dir)
    differs = [what for what, ours, theirs in (
        ("encoder", encoder_id(vae), encoder_id(base)),
        ("latent shift/scale", (vae.config.shift_factor, vae.config.scaling_factor),
         (base.config.shift_factor, base.config.scaling_factor))) if ours != theirs]
    if differs:
        warn_input(f"--vae {vae_dir} is not {root}'s VAE and its {' and '.join(differs)} differ: {root}'s transformer "
                   "learned other latents, so the fine-tune starts from a mismatched prior (a long re-training); to keep "
                   f"it, drop --vae (its own VAE, {base_dir}, is used) and encode the data with that one "
                   f"(encode-dataset DATA --model {base_dir} --overwrite)")


def load_transformer(root: Path, cfg: DiTTrainConfig, latent_shape: Optional[tuple[int, int]]) -> MoCATransformer:
    """The transformer of pipeline `root`, with `cfg.transformer` overrides that keep its weights loadable."""
    transformer = MoCATransformer.from_pretrained(root / "transformer")
    if cfg.transformer:
        unknown = sorted(set(cfg.transformer) - set(transformer.config))
        if unknown:
            raise ConfigError(f"unknown transformer config keys: {', '.join(unknown)}")
        state = transformer.state_dict()
        # without diffusers' private keys: `_use_default_values` (keys missing from an older config.json, such as a
        # newer option) would make from_config drop the override of exactly those keys
        saved = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        transformer = MoCATransformer.from_config({**saved, **cfg.transformer})
        # a longer latent set (the paper's L = 512 -> 1024 stage) needs more compressed queries:
        # repeat each learned query (the anchor query, last, stays single)
        queries, wanted = state["packer.queries"], transformer.packer.queries.shape[0]
        if queries.shape[0] != wanted and (wanted - 1) % (queries.shape[0] - 1) == 0:
            factor = (wanted - 1) // (queries.shape[0] - 1)
            state["packer.queries"] = torch.cat([queries[:-1].repeat_interleave(factor, dim=0), queries[-1:]])
        if transformer.config.attention_mode != "moc":  # a MoCA checkpoint fine-tuned as dense / local-only
            state = {k: v for k, v in state.items() if ".router." not in k}  # has no router to load
        grown, fresh = state["id_embedding.weight"], transformer.id_embedding.weight.detach()
        if fresh.shape[0] > grown.shape[0]:  # a larger ID codebook (more components): the new IDs start at their init
            state["id_embedding.weight"] = torch.cat([grown, fresh[grown.shape[0]:]])
        if transformer.layout_embed is not None:  # a layout embedding added by the overrides starts at its (zero) init
            state.update({k: v for k, v in transformer.state_dict().items() if k.startswith("layout_embed.") and k not in state})
        problem = state_dict_mismatch(transformer, state)
        if problem:
            raise ConfigError(f"the transformer overrides change its weights, {root} no longer loads: {problem}")
        transformer.load_state_dict(state)
    if latent_shape is not None and (transformer.config.num_latents, transformer.config.in_channels) != tuple(latent_shape):
        overridden = "num_latents" in cfg.transformer and transformer.config.num_latents != latent_shape[0]
        fix = (f"the recipe's transformer num_latents {cfg.transformer['num_latents']} asks for another latent set: encode the "
               f"data with that many (`encode-dataset DATA --model VAE --num-latents {cfg.transformer['num_latents']} --overwrite`), "
               "or drop the override") if overridden else \
            "encode the data with its VAE (encode-dataset --model its vae/, --overwrite over other latents)"
        raise ConfigError(
            f"the data's latents are (L={latent_shape[0]}, C={latent_shape[1]}) but {root} with the recipe expects "
            f"(L={transformer.config.num_latents}, C={transformer.config.in_channels}): {fix}"
        )
    return transformer


def load_encoder(root: Path):
    """The image encoder of pipeline `root`: the small ViT, or DINOv2 for converted real-weight pipelines."""
    return load_image_encoder(root / "image_encoder")


def encoder_folder_input(folder: Path) -> tuple[int, int]:
    """An image encoder folder's input channels and pixel side, from its config alone (no weights loaded)."""
    if is_dino_folder(folder):
        return json.loads((folder / "config.json").read_text()).get("num_channels", 3), CROP_SIZE
    config = ImageEncoder.load_config(folder)
    return config.get("in_channels", 3), config["image_size"]


def encoder_preprocess(encoder) -> Callable[[Path], torch.Tensor]:
    """path -> (3, S, S) pixels the way `encoder` expects them."""
    if is_dino(encoder):  # DINOv2: resize 256, centre crop 224, ImageNet normalisation
        return lambda path: encoder.preprocess(load_image(path))[0]
    return lambda path: preprocess_image(path, encoder.image_size)


def scene_encoder_folder(cfg: DiTTrainConfig) -> Path:
    """The encoder a scene recipe fine-tunes: `image_encoder_from` (e.g. scene-pre-trained), else init_from's."""
    return pretrained_encoder_folder(cfg) if cfg.image_encoder_from else init_folder(cfg) / "image_encoder"


def scene_instance_views(cfg: DiTTrainConfig) -> int:
    """The views per instance a scene recipe trains with: its transformer override, else init_from's config."""
    saved = MoCATransformer.load_config(init_folder(cfg) / "transformer")
    return int(cfg.transformer.get("instance_views", saved.get("instance_views", 1)))


def build_scene_models(cfg: DiTTrainConfig, latent_shape: tuple[int, int]) -> SceneGenerator:
    """The transformer of the object pipeline `init_from` and its encoder — or `image_encoder_from`'s, e.g. a
    scene-pre-trained one — widened to 7 channels when it has 3, then wrapped with LoRA.

    `cfg.transformer` may override the object transformer's config (e.g. attention_mode or
    attention_backend) as long as its weights still load; `cfg.image_encoder` is not used.
    """
    root = init_folder(cfg)
    transformer = load_transformer(root, cfg, latent_shape)
    folder = scene_encoder_folder(cfg)
    encoder = load_image_encoder(folder)
    if encoder.out_dim != transformer.config.cond_dim:
        raise ConfigError(f"{folder} gives {encoder.out_dim}-wide tokens, {root}'s transformer takes {transformer.config.cond_dim}")
    if input_channels(encoder) != SCENE_CHANNELS:  # an object encoder; a scene one is fine-tuned as it is
        widen_input_channels(encoder, SCENE_CHANNELS, cfg.widen_init)
    add_encoder_lora(encoder, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, train_projection=cfg.train_projection)
    return SceneGenerator(transformer, encoder)


def step_draws(cfg: DiTTrainConfig, step: int, dataset_size: int, batch_size: int,
               by_parts: Optional[list[int]] = None) -> dict[str, Any]:
    """All random choices of one global step: asset indices, times, CFG drops, and a generator for noise.

    With `cfg.group_by_parts` and `by_parts` (the dataset's indices sorted by part count), the batch
    is drawn from a random window of that many neighbours in this order: its assets have similar
    part counts, so little of the batch is padding; every asset stays (near) equally likely.
    """
    g = torch.Generator().manual_seed(cfg.seed * SEED_STRIDE + step)
    if cfg.group_by_parts and by_parts is not None:
        window = min(cfg.group_by_parts, dataset_size)
        start = int(torch.randint(0, dataset_size - window + 1, (1,), generator=g))
        picks = torch.randint(0, window, (batch_size,), generator=g)  # (B,) positions in the window
        indices = [by_parts[start + int(i)] for i in picks]
    else:
        indices = torch.randint(0, dataset_size, (batch_size,), generator=g).tolist()
    t = flow.sample_timesteps(batch_size, cfg.timestep_distribution, cfg.timestep_mean, cfg.timestep_std, generator=g)
    drop = torch.rand(batch_size, generator=g) < cfg.cfg_drop
    return {"indices": indices, "t": t, "drop": drop, "generator": g}


def training_loss(model: Generator, data: LatentDataset, draws: dict[str, Any], rows: slice, device) -> torch.Tensor:
    """Flow loss of the rows `rows` of the global batch described by `draws`."""
    g = draws["generator"]
    batch = data.batch(draws["indices"])
    z0 = batch["latents"]
    # every per-sample draw is made for the whole global batch, then sliced: process-independent
    noise = torch.randn(z0.shape, generator=g)
    routing_seeds = torch.randint(0, 2**62, (z0.shape[0],), generator=g)
    ids = getattr(model, "module", model).transformer.sample_ids(z0.shape[0], z0.shape[1], g, "cpu")  # as in sampling
    mask = batch["component_mask"][rows].to(device)
    z0, noise = z0[rows].to(device), noise[rows].to(device)
    t = draws["t"][rows].to(device)
    zt = flow.interpolate(z0, noise, t)
    pred = model(zt, t, batch["images"][rows].to(device), mask, draws["drop"][rows].to(device), ids[rows].to(device), routing_seeds[rows])
    return flow.flow_loss(pred, z0, noise, mask)


def validate(model: nn.Module, ema: EMA, cfg: DiTTrainConfig, data_dir: str | Path, vae: VecSetVAE) -> dict[str, float]:
    """Generate the first `val_assets` val objects with the EMA weights and return the mean metrics."""
    shadow = copy.deepcopy(model)  # same structure (LoRA wrappers included), then EMA weights
    ema.copy_to(shadow)
    merge_lora(shadow)  # sampling through plain layers
    pipe = MoCAPipeline(vae, shadow.transformer, shadow.image_encoder).to(next(model.parameters()).device)
    report = evaluate_pipeline(
        pipe, data_dir, "val", count=cfg.val_assets, steps=cfg.val_steps, guidance=cfg.val_guidance,
        resolution=cfg.val_resolution, seed=cfg.seed, metric_points=10000, progress=False,
        max_parts=min(cfg.max_components, shadow.transformer.max_components),
    )
    return {f"val_{k}": v for k, v in report["mean"].items()} | {"val_count": report["count"]}


def schedule_step(step: int, cfg: DiTTrainConfig, elapsed: float) -> int:
    """The step the LR schedule is at: with a time limit, the further of the step and the elapsed share
    of the limit (so the cosine reaches its end at the limit whatever the speed of the machine).
    `elapsed` counts the whole run's training seconds, resumes included."""
    if cfg.time_limit_s <= 0 or step < cfg.warmup_steps:  # the warm-up counts steps
        return step
    return max(step, cfg.warmup_steps + int(elapsed / cfg.time_limit_s * (cfg.steps - cfg.warmup_steps)))


def adapter_config(cfg: DiTTrainConfig, model: Generator, frozen: Optional[dict]) -> dict[str, Any]:
    """The adapter folder's config: how to inject the adapters again (a scene run's: also how its encoder was
    widened and adapted, under "image_encoder"), and the base they belong to."""
    config = {"format": "moca3d-lora", **lora_spec(model.transformer, cfg.transformer_lora_rank, cfg.transformer_lora_alpha, PRIOR_FREE_MODULES),
              "transformer_overrides": cfg.transformer, "base": str(Path(cfg.init_from).resolve()), "base_fingerprint": frozen}
    if cfg.condition == "scene":
        widened = encoder_folder_input(scene_encoder_folder(cfg))[0] != SCENE_CHANNELS
        full = [first_projection_path(model.image_encoder)] if cfg.train_projection else []
        encoder = {**lora_spec(model.image_encoder, cfg.lora_rank, cfg.lora_alpha, full), "widen_init": cfg.widen_init if widened else None}
        if cfg.image_encoder_from:  # not init_from's encoder: the adapter holds it whole, widened (`scene_adapter_parts`)
            encoder.update(source=str(cfg.image_encoder_from), config={k: v for k, v in model.image_encoder.config.items() if not k.startswith("_")})
        config.update(condition="scene", image_encoder=encoder)
    return config


def scene_adapter_parts(cfg: DiTTrainConfig) -> list[str]:
    """The modules an adapter folder holds whole: a scene run's encoder when it is not init_from's (image_encoder_from)."""
    return ["image_encoder"] if cfg.condition == "scene" and cfg.image_encoder_from else []


def export_pipeline(out_dir: str | Path, model: Generator, vae: Union[VecSetVAE, str, Path],
                    trained_components: Optional[int] = None) -> Path:
    """Write a complete pipeline folder with `vae` (a loaded VAE, or its folder); `trained_components`: the most components
    a training example held (recorded: generating more is warned about)."""
    vae = vae if isinstance(vae, VecSetVAE) else VecSetVAE.from_pretrained(vae)
    pipe = MoCAPipeline(vae, model.transformer, model.image_encoder)
    pipe.trained_components = trained_components
    return pipe.save_pretrained(out_dir)


def train(
    data_dir: str | Path, out_dir: str | Path, cfg: DiTTrainConfig, vae_dir: Optional[str | Path] = None,
    device: Optional[str] = None, resume: bool = True, progress: Show = True, export_only: bool = False,
) -> dict[str, Any]:
    """Train; checkpoints under OUT/checkpoints, the final (EMA) pipeline under OUT/pipeline. `export_only`: write the
    pipeline of the newest checkpoint (its EMA weights) and train nothing; the run resumes later as before."""
    from accelerate import Accelerator
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device is not None:  # "auto" resolved; cuda asked without it refused (it trained on the CPU in bf16)
        from moca3d.commands.common import resolve_device

        device = resolve_device(str(device))
    if device is not None and str(device).startswith("cuda:") and str(device) != "cuda:0":  # accelerate takes GPU 0
        raise ConfigError(f"device '{device}': training runs on the first visible GPU; choose it with "
                          f"CUDA_VISIBLE_DEVICES={str(device).split(':', 1)[1]} and --device cuda")
    use_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "no" if use_cpu else "bf16"
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision)
    out = Path(out_dir)
    ckpt = latest_checkpoint(out) if resume else None
    if export_only and ckpt is None:
        raise ConfigError(f"{out}: no checkpoint to export" + ("" if resume else " (export needs resume)"))
    if not resume and latest_checkpoint(out) is not None:  # a fresh run there would delete them as it checkpoints
        raise ConfigError(f"{out} already holds checkpoints; resume it (the default) or use a new directory")
    if accelerator.is_main_process:
        claim_run(out, record=False)  # another job training there: refused before anything loads
    record_resume = None  # another recipe is refused before any data or model is loaded; recorded once accepted
    if ckpt is not None and (out / "train_config.json").is_file():
        record_resume = check_resume(out / "train_config.json", cfg, accelerator.print)
    if cfg.steps < cfg.warmup_steps and not export_only and accelerator.is_main_process:  # e.g. a trial run with --steps
        warn_input(f"warmup_steps {cfg.warmup_steps} > steps {cfg.steps}: the learning rate never reaches lr {cfg.lr:g} "
                   "(more --steps, or a --config recipe with fewer warmup_steps)")
    scene = cfg.condition == "scene"
    if scene:
        from moca3d.data.scene import SceneLatentDataset

        vae_dir = vae_dir if vae_dir is not None else init_folder(cfg) / "vae"
        encoder_size = encoder_folder_input(scene_encoder_folder(cfg))[1]
        views = scene_instance_views(cfg)
        if Path(data_dir).is_file():  # a scene latent cache (SceneLatentDataset.save_cache) of the training split
            data = SceneLatentDataset.from_cache(data_dir, cfg.max_components, encoder_size, views=views)
        else:
            data = SceneLatentDataset(data_dir, "train", encoder_size, cfg.max_components, views=views)
    else:
        encoder = None
        if cfg.init_from:
            vae_dir = vae_dir if vae_dir is not None else init_folder(cfg) / "vae"
            encoder = load_encoder(init_folder(cfg))  # loaded once: its preprocessing, then the model
            preprocess = encoder_preprocess(encoder)
        elif cfg.image_encoder_from:
            encoder = ImageEncoder.from_pretrained(pretrained_encoder_folder(cfg))
            preprocess = encoder.image_size
        else:
            preprocess = ImageEncoder(**cfg.image_encoder).image_size
        if Path(data_dir).is_file():  # a latent cache (LatentDataset.save_cache) of the training split
            size = encoder.image_size if encoder is not None else preprocess  # checked now, not at the first batch
            data = LatentDataset.from_cache(data_dir, cfg.max_components, size)
        else:
            data = LatentDataset(data_dir, "train", preprocess, cfg.max_components)
    vae = load_vae_folder(Path(vae_dir)) if vae_dir is not None else None  # loaded once: validation, export
    vae_id = fingerprint(vae.state_dict())["sha256"] if vae is not None else None  # a resume must bring the same one
    vae_path = str(Path(vae_dir).resolve()) if vae is not None else None  # what a resume without --vae loads
    if vae is not None:  # latents of another encoder would train a transformer its pipeline's VAE cannot decode
        check_latent_encoder(data.encoder, encoder_id(vae), str(data_dir), vae_dir)
    if vae is not None and cfg.init_from and ckpt is None and accelerator.is_main_process:
        warn_other_latent_space(vae, Path(vae_dir), init_folder(cfg))
    if vae is not None:  # train on the unit-scale latents the pipeline samples
        data.latents = [vae.normalize_latents(z) for z in data.latents]
    torch.manual_seed(cfg.seed)
    latent_shape = tuple(data.latents[0].shape[1:])
    by_parts = sorted(range(len(data)), key=lambda i: (data.latents[i].shape[0], i))  # for group_by_parts
    identity = data_identity(data.ids)  # recorded in every checkpoint: a resume on other assets is refused
    model = build_scene_models(cfg, latent_shape) if scene else build_models(cfg, latent_shape, encoder)
    require_token_order(model.transformer.token_order, data.token_order, str(data_dir))
    limit, largest = model.transformer.max_components, by_parts[-1]
    if data.latents[largest].shape[0] > limit:  # it failed at the first batch drawing that asset, hours in perhaps
        raise ConfigError(f"{data_dir}: {data.ids[largest]} has {data.latents[largest].shape[0]} components, more than the "
                          f"transformer's {limit} IDs: lower max_components to {limit} (such assets are left out), or raise "
                          "the recipe's transformer.id_codebook_size (from init_from: the new IDs are learned in the fine-tune)")
    validate_every = cfg.validate_every if vae is not None and not scene and cfg.validate_every <= cfg.steps else 0
    if validate_every and Path(data_dir).is_file():  # a cache holds one split: no val assets to generate
        if accelerator.is_main_process:
            warn_input(f"validate_every {validate_every}: validation reads the dataset folder's val split, which a latent cache "
                       f"({data_dir}) does not hold; training without it (evaluate-model scores the exported pipeline)")
        validate_every = 0
    if validate_every:  # what `validate` reads, checked now
        try:
            select_records(data_dir, "val", cfg.val_assets, 1, min(cfg.max_components, limit))
        except InputError as err:  # a small dataset's 5% val split is often empty
            raise InputError(f"{err}: validate_every {cfg.validate_every} validates on them (set it to 0 to train without)") from None
    if cfg.transformer_lora_rank:
        add_lora(model.transformer, cfg.transformer_lora_rank, cfg.transformer_lora_alpha, cfg.transformer_lora_dropout,
                 train_full=PRIOR_FREE_MODULES)
    trained, total = trainable_summary(model)
    accelerator.print(f"training {trained:,} of {total:,} parameters ({100 * trained / total:.1f}%)")
    frozen = frozen_fingerprint(model)  # checkpoints leave the frozen base out: a resume rebuilds it from its source
    model.transformer.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.attention_backend is not None:  # every block shares this config; the saved model config is not touched
        model.transformer.attention_config.backend = cfg.attention_backend
    trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, but a scene encoder's frozen base
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas
    )
    ema = EMA(model, decay=cfg.ema_decay)
    start, before, spent = 0, 0.0, False  # the step and training seconds the run resumes from; nothing left
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, ema, frozen=frozen)
        start, before = state.step, float(state.extra.get("elapsed_s", 0.0))
        check_same_data(state.extra.get("data"), data.ids, out, data_dir,
                        f"a new -o with --init-from {out}/pipeline, written at the run's end; cut off, `moca3d train <its "
                        f"own data> -o {out} --export-only` writes it from the newest checkpoint")
        if state.extra.get("vae") not in (None, vae_id):  # (None: a checkpoint from before the record)
            raise ConfigError(f"{out} was trained with another VAE than {vae_dir} (its latent scale and decoder differ): "
                              "resume with the run's own --vae, or start a new run from its weights")
        if record_resume is not None and accelerator.is_main_process and not export_only:  # an export changes no setting
            record_resume()
        spent = cfg.spent(start, before) or export_only
        finished = " (finished: nothing to train; its pipeline is exported again)" if spent else ""
        finished = " (its pipeline exported, nothing trained)" if export_only else finished
        accelerator.print(f"resumed from {ckpt} (step {start}){finished}")
        if accelerator.is_main_process and not export_only:
            trim_log(out / "train_log.jsonl", start)  # the steps logged after that checkpoint are run (and logged) again
    elif accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        record_run_config(out / "train_config.json", cfg.to_dict())
        trim_log(out / "train_log.jsonl", 0)  # a run cut before its first checkpoint starts again: so does its log
    if accelerator.is_main_process:
        claim_run(out)  # a second job in this folder is refused, not left to overwrite this one's checkpoints
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.device.type == "cuda":
        data.to(accelerator.device)  # batches assembled on the GPU: no host-to-device copy of images per step
    world, rank = accelerator.num_processes, accelerator.process_index
    rows = batch_rows(cfg.batch_size, rank, world)  # a one-line ConfigError when the processes do not divide the batch
    model.train()
    log: list[dict[str, float]] = []
    loss_value = None
    done = start if spent else cfg.steps  # the last step run (less when the time limit stops the run)
    t0 = time.time()
    columns = [TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[info]}"), TimeRemainingColumn()]
    processes = accelerator if accelerator.num_processes > 1 else None  # (None: no collective)
    shown = progress if accelerator.is_main_process else False
    lines = Lines(total=cfg.steps, desc="train", initial=start, unit="step") if shown == "lines" else None  # a log file
    with Progress(*columns, disable=shown is not True) as bar, stop_requests() as stop:
        task = bar.add_task("train", total=cfg.steps, completed=start, info="")
        for step in range(start, start if spent else cfg.steps):
            elapsed = before + time.time() - t0
            if cfg.time_limit_s > 0:  # one clock for all processes: the same LR everywhere, or DDP's replicas drift apart
                elapsed = process_max(elapsed, processes, accelerator.device)
            lr = lr_at(schedule_step(step, cfg, elapsed), cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            draws = step_draws(cfg, step, len(data), cfg.batch_size, by_parts)
            with accelerator.autocast():
                loss = training_loss(model, data, draws, rows, accelerator.device)
            local_loss = loss.item()  # one device read a step: the finite check before backward, and the logged loss
            if not math.isfinite(local_loss):
                raise ConfigError(f"non-finite loss at step {step}; last checkpoint kept intact (lower the learning rate; the "
                                  "data's latents were checked finite)")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            unwrapped = accelerator.unwrap_model(model)
            ema.update(unwrapped)
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item() if processes else local_loss
            over = cfg.time_limit_s > 0 and before + time.time() - t0 > cfg.time_limit_s
            # one decision for all processes, one collective: SIGTERM / Ctrl+C on any of them, this step's checkpoint, then out
            over, stopped = (v > 0 for v in process_maxima([float(over), float(bool(stop))], processes, accelerator.device))
            out_of_time = over or stopped
            if (step + 1) % cfg.log_every == 0 or step == start or step + 1 == cfg.steps or out_of_time:
                log.append({"step": step + 1, "loss": loss_value, "grad_norm": float(grad_norm), "lr": lr,
                            "time": before + time.time() - t0})  # the run's training seconds, across resumes
            bar.update(task, completed=step + 1, info=f"loss {loss_value:.4f}")
            if lines is not None:
                lines.set_postfix(loss=f"{loss_value:.4f}")
                lines.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or out_of_time:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(out, step + 1, unwrapped, optimizer, ema, keep_last=cfg.keep_checkpoints,
                                    extra={"elapsed_s": before + time.time() - t0, "data": identity, "vae": vae_id,
                                           "vae_dir": vae_path}, frozen=frozen)
                    if validate_every and (step + 1) % validate_every == 0:
                        metrics = validate(unwrapped, ema, cfg, data_dir, vae)
                        log.append({"step": step + 1, **metrics})
                        accelerator.print(f"step {step + 1}: " + ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in metrics.items()))
                    with open(out / "train_log.jsonl", "a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in log)
                    log.clear()
            if stopped:
                release_run(out)
                raise TrainingStopped(f"stopped at step {step + 1} of {cfg.steps} ({stop.reason}): checkpoint saved, the same "
                                      "command resumes", signum=stop.signum)
            if out_of_time:
                done = step + 1
                accelerator.print(f"time limit of {cfg.time_limit_s:.0f} s reached at step {done} of {cfg.steps}")
                break
    accelerator.wait_for_everyone()
    result = {"steps": done, "trained_steps": max(done - start, 0), "seconds": time.time() - t0,
              "final_loss": loss_value if done > start else None, "processes": accelerator.num_processes}
    if not accelerator.is_main_process:
        return {**result, "writer": False}  # the first process exports and reports
    if vae is not None:
        final = copy.deepcopy(accelerator.unwrap_model(model))
        ema.copy_to(final)
        trained = max(z.shape[0] for z in data.latents)  # (N, L, C) each: the most components an example held
        if cfg.init_from:  # a fine-tune keeps the range its base was trained on (if its record is still there)
            try:
                base = json.loads((init_folder(cfg) / "model_index.json").read_text()).get(TRAINED_KEY)
            except (OSError, ValueError, AttributeError, ConfigError):
                base = None
            trained = max(trained, base) if isinstance(base, int) and not isinstance(base, bool) else trained
        if cfg.transformer_lora_rank:  # what the fine-tune changed, apart from its base: OUT/lora
            config = {**adapter_config(cfg, final, frozen), TRAINED_KEY: trained}
            result["lora"] = str(save_adapter(out / "lora", final, config, whole=scene_adapter_parts(cfg)))
        merge_lora(final)  # plain layers in the pipeline folder (a scene's 7-channel encoder, a LoRA-tuned transformer)
        result["pipeline"] = str(export_pipeline(out / "pipeline", final, vae, trained))
    release_run(out)
    return result
