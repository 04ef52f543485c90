"""Image-encoder pre-training: image -> coarse 3D occupancy, a geometric prior for the built-in encoder.

The built-in ViT is trained from scratch. Trained only through the flow loss it learns to read
almost nothing from its image (README, "Why it fails"): the transformer's high-noise layout decision
then has no image evidence. This stage gives the encoder a direct 3D task first, the job DINOv2's
pre-training does for TripoSG: from the render, predict which cells of a res^3 grid over the
normalised object cube [-1, 1]^3 hold surface (every part's surface samples, one grid per object,
dilated by `dilate` cells). A small head — grid-cell queries (Fourier features of the cell centre)
cross-attending to the image tokens, then an MLP — gives one logit per cell. The DiT recipe then
loads the encoder (`image_encoder_from`) and may freeze it.

    render (B, 3, S, S) --ImageEncoder--> tokens (B, M, D) --GridHead(cell centres)--> logits (B, Q)

Scenes (`"condition": "scene"`, issue 7): one training pair per visible instance. The input is the
instance's 7-channel stack (moca3d.data.scene: instance on white, scene RGB, mask) and the target is
the instance's own grid in the shared scene frame: the encoder learns where the masked instance
sits and how big it is, the placement the scene transformer otherwise has to discover through the
flow loss. A 3-channel start (`init_from` an object encoder) is widened to 7 channels first.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from moca3d.errors import ConfigError, InputError
from moca3d.models.image_encoder import SCENE_CHANNELS, WIDEN_INITS, ImageEncoder, input_channels, widen_input_channels
from moca3d.models.vae import FourierEmbedder, LayerNorm32, VecSetBlock
from moca3d.training.checkpoints import (
    atomic_save_tensors, atomic_write_json, claim_run, latest_checkpoint, load_checkpoint, release_run, save_checkpoint,
)
from moca3d.training.distributed import batch_rows, launched_processes, process_maxima, process_mean
from moca3d.training.stop import TrainingStopped, stop_requests
from moca3d.training.recipe import Recipe, check_resume, check_same_data, data_identity, lr_at, recipe_defaults, record_run_config

GRID_CACHE_KIND = "moca3d-surface-grids"
CONDITIONS = ("object", "scene")
BUILTIN_ENCODER = {"in_channels": 3, "image_size": 128, "patch_size": 16, "width": 128, "num_layers": 2, "num_heads": 4}


@dataclass
class EncoderPretrainConfig(Recipe):
    """An encoder pre-training recipe (JSON: these fields; the encoder's config under "image_encoder")."""

    recipe_name = "encoder pre-training"

    image_encoder: dict[str, Any] = field(default_factory=lambda: dict(BUILTIN_ENCODER))
    condition: str = "object"  # "scene": 7-channel instance stacks -> instance grids in the scene frame
    # start from a trained encoder (its folder, or a pipeline folder's image_encoder) instead of `image_encoder`;
    # the run's pretrain_config.json then records that encoder's architecture under "image_encoder"
    init_from: Optional[str] = None
    widen_init: str = "zero"  # scene: the 4 new input channels of a 3-channel encoder, "zero" or "clone"
    grid_resolution: int = 32
    dilate: int = 1  # cells: surface cells grown by this many (a 1-cell-thick surface is a hard target)
    queries_per_image: int = 2048  # half drawn among occupied cells, half uniform over the grid
    head_width: int = 128
    head_heads: int = 4
    head_layers: int = 1
    num_freqs: int = 6
    steps: int = 4000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    val_assets: int = 200  # the last assets (objects or scenes) of the training split, at most a fifth, held out
    log_every: int = 50
    checkpoint_every: int = 250
    seed: int = 0
    num_threads: int = 0  # > 0: torch CPU threads
    time_limit_s: float = 0.0  # > 0: stop after this many seconds (per session); the LR schedule ends there

    def check(self) -> None:
        self.check_positive("grid_resolution", "queries_per_image", "head_width", "head_heads", "head_layers",
                            "num_freqs", "steps", "batch_size", "lr", "log_every", "checkpoint_every")
        self.check_optimizer()
        if self.queries_per_image < 2:
            raise ConfigError(f"queries_per_image must be >= 2 (half occupied, half uniform), got {self.queries_per_image}")
        if self.dilate < 0:
            raise ConfigError(f"dilate must be >= 0, got {self.dilate}")
        if self.head_width % self.head_heads:
            raise ConfigError(f"head_width {self.head_width} is not divisible by head_heads {self.head_heads}")
        if self.val_assets < 0 or self.time_limit_s < 0 or self.num_threads < 0:
            raise ConfigError("val_assets, time_limit_s and num_threads must be >= 0")
        if self.condition not in CONDITIONS:
            raise ConfigError(f"condition must be one of {', '.join(CONDITIONS)}, got {self.condition!r}")
        if self.widen_init not in WIDEN_INITS:
            raise ConfigError(f"widen_init must be one of {', '.join(WIDEN_INITS)}, got {self.widen_init!r}")


def grid_centres(resolution: int) -> torch.Tensor:
    """(R^3, 3) cell centres of a regular grid over [-1, 1]^3, flat index = (i * R + j) * R + k for cell (x_i, y_j, z_k)."""
    c = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1).reshape(-1, 3)


def surface_grid(points: torch.Tensor, resolution: int, dilate: int = 0) -> torch.Tensor:
    """(P, 3) points in [-1, 1]^3 -> (R, R, R) bool grid of the cells they fall in, grown by `dilate` cells."""
    idx = ((points.clamp(-1, 1 - 1e-6) + 1) / 2 * resolution).long()  # (P, 3)
    grid = torch.zeros(resolution, resolution, resolution)
    grid[idx[:, 0], idx[:, 1], idx[:, 2]] = 1.0
    return dilate_grids(grid[None] > 0, dilate)[0]


def load_component_points(asset: Path) -> torch.Tensor:
    """The surface samples of a prepared asset, per component: (N, P, 3) in the normalised frame."""
    path = asset / "samples.npz"
    if not path.is_file():
        raise InputError(f"{asset}: no samples.npz (prepare the dataset first)")
    with np.load(path) as d:
        return torch.from_numpy(d["surface"][..., :3].astype(np.float32))


def load_surface_points(asset: Path) -> torch.Tensor:
    """Every part's surface samples of a prepared asset, as one (P, 3) cloud in the normalised frame."""
    return load_component_points(asset).reshape(-1, 3)


def component_key(asset_id: str, index: int) -> str:
    """The grid-cache key of component `index` of a scene."""
    return f"{asset_id}#{index}"


def build_grid_cache(root: str | Path, ids: list[str], resolution: int, out: str | Path,
                     progress: Optional[Callable[[int], None]] = None, per_component: bool = False) -> Path:
    """Packed surface grids (rows, R^3 / 8 bytes) of the given assets, in their order, to one safetensors file.

    One row per asset (all its parts), or with `per_component` one per component, keyed `component_key`.
    """
    root = Path(root)
    rows, keys = [], []
    for i, asset_id in enumerate(ids):
        points = load_component_points(root / "assets" / asset_id)  # (N, P, 3)
        clouds = list(points) if per_component else [points.reshape(-1, 3)]
        for j, cloud in enumerate(clouds):
            grid = surface_grid(cloud, resolution)
            rows.append(torch.from_numpy(np.packbits(grid.numpy().reshape(-1))))
            keys.append(component_key(asset_id, j) if per_component else asset_id)
        if progress is not None:
            progress(i)
    meta = {"kind": GRID_CACHE_KIND, "ids": json.dumps(keys), "resolution": str(resolution)}
    atomic_save_tensors({"grids": torch.stack(rows)}, Path(out), metadata=meta)
    return Path(out)


def read_grid_cache(path: str | Path) -> tuple[torch.Tensor, list[str], int]:
    """Packed grids (rows, ceil(R^3 / 8)) uint8, their keys (asset ids or `component_key`s) and R, from
    `build_grid_cache`'s file; `unpack_grids` opens rows (tens of thousands of scene instances stay packed)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise InputError(f"surface-grid cache not found: {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != GRID_CACHE_KIND:
            raise InputError(f"{path}: not a moca3d surface-grid cache")
        packed = f.get_tensor("grids")
    return packed, json.loads(meta["ids"]), int(meta["resolution"])


def unpack_grids(packed: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, ceil(R^3 / 8)) uint8 rows -> (B, R, R, R) bool grids."""
    bits = np.unpackbits(packed.numpy(), axis=1)[:, : resolution**3]
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bool).view(-1, resolution, resolution, resolution)


def load_grid_cache(path: str | Path) -> tuple[torch.Tensor, list[str], int]:
    """(A, R, R, R) bool grids, their keys (asset ids or `component_key`s) and R from `build_grid_cache`'s file."""
    packed, keys, r = read_grid_cache(path)
    return unpack_grids(packed, r), keys, r


class GridHead(nn.Module):
    """Image tokens (B, M, Dc) + cell centres (B, Q, 3) -> occupancy logits (B, Q)."""

    def __init__(self, cond_dim: int, width: int = 128, heads: int = 4, num_layers: int = 1, num_freqs: int = 6):
        super().__init__()
        self.embed = FourierEmbedder(num_freqs)
        self.proj_q = nn.Linear(self.embed.out_dim, width)
        self.proj_c = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(
            VecSetBlock(width, heads, 4.0, self_attention=False, cross_attention=True, eps=1e-6) for _ in range(num_layers)
        )
        self.norm = LayerNorm32(width, eps=1e-6)
        self.out = nn.Linear(width, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """(B, M, Dc), (B, Q, 3) -> (B, Q)."""
        q = self.proj_q(self.embed(points))  # (B, Q, W)
        c = self.proj_c(tokens)  # (B, M, W)
        for block in self.blocks:
            q = block(q, c)
        return self.out(self.norm(q))[..., 0]


class GridPredictor(nn.Module):
    """ImageEncoder + GridHead: the module pre-training optimises."""

    def __init__(self, encoder: ImageEncoder, head: GridHead):
        super().__init__()
        self.image_encoder = encoder
        self.head = head

    def forward(self, images: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S), (B, Q, 3) -> logits (B, Q); C = 3 (renders) or 7 (scene instance stacks)."""
        return self.head(self.image_encoder(images), points)


def init_encoder_folder(cfg: EncoderPretrainConfig) -> Optional[Path]:
    """The encoder folder `init_from` names (itself, or a pipeline folder's image_encoder), checked; None without one."""
    if not cfg.init_from:
        return None
    root = Path(cfg.init_from)
    folder = root / "image_encoder" if (root / "model_index.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise ConfigError(f"init_from {root}: neither an image encoder folder nor a pipeline folder")
    return folder


def start_encoder(cfg: EncoderPretrainConfig) -> ImageEncoder:
    """The encoder pre-training starts from: `init_from`'s, or a fresh one; 7 input channels for scenes."""
    folder = init_encoder_folder(cfg)
    if folder is not None:
        encoder = ImageEncoder.from_pretrained(folder)
    else:
        encoder = ImageEncoder(**cfg.image_encoder)
    wanted = SCENE_CHANNELS if cfg.condition == "scene" else 3
    if input_channels(encoder) == 3 and wanted == SCENE_CHANNELS:
        widen_input_channels(encoder, SCENE_CHANNELS, cfg.widen_init)
    if input_channels(encoder) != wanted:
        raise ConfigError(f"a {cfg.condition} encoder takes {wanted} input channels, this one {input_channels(encoder)}")
    return encoder


def build_predictor(cfg: EncoderPretrainConfig) -> GridPredictor:
    """The starting encoder (from the recipe or `init_from`) and a fresh grid head."""
    encoder = start_encoder(cfg)
    head = GridHead(encoder.out_dim, cfg.head_width, cfg.head_heads, cfg.head_layers, cfg.num_freqs)
    return GridPredictor(encoder, head)


def load_run(run: str | Path, config: Optional[str | Path] = None) -> tuple[EncoderPretrainConfig, GridPredictor]:
    """A pretrain-encoder run folder's recipe (or `config`) and its newest checkpoint's encoder + head, in eval mode."""
    from dataclasses import replace

    from moca3d.training.checkpoints import load_tensors

    run = Path(run)
    cfg = EncoderPretrainConfig.from_json(config or run / "pretrain_config.json")
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise InputError(f"{run} has no checkpoint (run `moca3d pretrain-encoder` first)")
    model = build_predictor(replace(cfg, init_from=None))  # the recorded architecture; the weights come from the checkpoint
    model.load_state_dict(load_tensors(ckpt / "model.safetensors"))
    return cfg, model.eval()


def draw_queries(grids: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid: count/2 occupied cells and count/2 uniform cells -> flat indices (B, Q), labels (B, Q)."""
    B = grids.shape[0]
    flat = grids.reshape(B, -1).float()  # (B, R^3)
    half = count // 2
    occupied = torch.multinomial(flat + 1e-12, half, replacement=True, generator=generator)  # (B, half)
    uniform = torch.randint(0, flat.shape[1], (B, count - half), generator=generator)
    idx = torch.cat([occupied, uniform], dim=1)  # (B, Q)
    return idx, flat.gather(1, idx)


@torch.no_grad()
def predict_grid(model: GridPredictor, images: torch.Tensor, resolution: int, chunk: int = 8192) -> torch.Tensor:
    """(B, C, S, S) -> (B, R, R, R) occupancy probabilities."""
    tokens = model.image_encoder(images)
    centres = grid_centres(resolution).to(images.device)
    out = [torch.sigmoid(model.head(tokens, centres[None, s : s + chunk].expand(images.shape[0], -1, -1)))
           for s in range(0, centres.shape[0], chunk)]
    return torch.cat(out, dim=1).view(-1, resolution, resolution, resolution)


def grid_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) bool grids -> (B,) intersection over union."""
    p, t = pred.flatten(1), target.flatten(1)
    inter = (p & t).sum(1).float()
    union = (p | t).sum(1).float().clamp_min(1)
    return inter / union


def evaluate_grids(model: GridPredictor, inputs: Callable[[list[int]], torch.Tensor], grids: torch.Tensor,
                   batch: int = 16) -> dict[str, float]:
    """Mean IoU of the predicted grids (p > 0.5) against the target grids (A, R, R, R); `inputs(indices)`
    gives the encoder inputs of those targets (built a batch at a time)."""
    model.eval()
    ious = []
    for s in range(0, len(grids), batch):
        pred = predict_grid(model, inputs(list(range(s, min(s + batch, len(grids))))), grids.shape[-1]) > 0.5
        ious.append(grid_iou(pred.cpu(), grids[s : s + batch]))
    model.train()
    return {"grid_iou": float(torch.cat(ious).mean())}


def dilate_grids(grids: torch.Tensor, dilate: int) -> torch.Tensor:
    """(B, R, R, R) bool -> grown by `dilate` cells (a cube structuring element)."""
    if not dilate:
        return grids
    g = grids.float()[:, None]
    return F.max_pool3d(g, 2 * dilate + 1, stride=1, padding=dilate)[:, 0] > 0


@dataclass
class PretrainSamples:
    """Pre-training pairs: input i is `inputs([i])`, its target the cached grid `keys[i]`, from asset `assets[i]`."""

    keys: list[str]
    assets: list[int]  # index of the object or scene each pair comes from (the held-out split is by asset)
    inputs: Callable[[list[int]], torch.Tensor]  # pair indices -> (B, C, S, S) encoder inputs


def object_samples(data) -> PretrainSamples:
    """One pair per object: its render (3, S, S) -> its grid."""
    return PretrainSamples(list(data.ids), list(range(len(data.ids))), lambda idx: torch.stack([data.images[i] for i in idx]))


def scene_samples(data) -> PretrainSamples:
    """One pair per visible instance of a SceneLatentDataset: its 7-channel stack -> its grid in the scene frame."""
    from moca3d.data.scene import visible_instances

    pairs = [(a, j) for a, masks in enumerate(data.masks) for j in visible_instances(masks).tolist()]

    def inputs(idx: list[int]) -> torch.Tensor:
        return torch.stack([data.conditions(pairs[i][0], [pairs[i][1]])[0] for i in idx])  # (B, 7, S, S)

    return PretrainSamples([component_key(data.ids[a], j) for a, j in pairs], [a for a, _ in pairs], inputs)


def load_samples(cfg: EncoderPretrainConfig, data_dir: str | Path, cache: Optional[str | Path]):
    """The training split's pairs (objects or scene instances) and the asset ids they come from."""
    from moca3d.training.train_dit import LatentDataset

    size = start_encoder_size(cfg)
    if cfg.condition == "scene":
        from moca3d.data.scene import SceneLatentDataset

        if cache is not None:
            raise ConfigError("scene pre-training reads the prepared scenes folder, not a latent cache (--cache is for objects)")
        data = SceneLatentDataset(data_dir, "train", size, max_components=10**9, latents=False)
        return scene_samples(data), data.ids
    if cache is not None:
        data = LatentDataset.from_cache(cache, max_components=10**9, image_size=size)
    else:
        data = LatentDataset(data_dir, "train", size, max_components=10**9)
    return object_samples(data), data.ids


def start_encoder_size(cfg: EncoderPretrainConfig) -> int:
    """The input size of the encoder pre-training starts from."""
    folder = init_encoder_folder(cfg)
    config = ImageEncoder.load_config(folder) if folder is not None else cfg.image_encoder
    return int(config.get("image_size", 128))


def dilated_chunks(packed: torch.Tensor, resolution: int, dilate: int, chunk: int = 1024):
    """Packed grids (A, bytes) -> their dilated grids, `chunk` rows at a time: (b, R, R, R) bool each."""
    for s in range(0, len(packed), chunk):
        yield dilate_grids(unpack_grids(packed[s : s + chunk], resolution), dilate)


def mean_grid(packed: torch.Tensor, resolution: int, dilate: int) -> torch.Tensor:
    """Packed grids (A, bytes) -> (R, R, R): the cell-wise mean of the dilated grids > 0.5, the best image-free guess."""
    total = sum((g.float().sum(0) for g in dilated_chunks(packed, resolution, dilate)), torch.zeros(resolution, resolution, resolution))
    return total / max(len(packed), 1) > 0.5


def holdout_split(assets: list[int], num_assets: int, val_assets: int) -> tuple[list[int], list[int]]:
    """Pair indices for training and for validation: the last min(val_assets, num_assets // 5) assets are held
    out with all their pairs (a scene's instances never straddle the split)."""
    first_val = num_assets - min(val_assets, num_assets // 5)
    return [i for i, a in enumerate(assets) if a < first_val], [i for i, a in enumerate(assets) if a >= first_val]


def pretrain_encoder(cfg: EncoderPretrainConfig, data_dir: str | Path, out_dir: str | Path, cache: Optional[str | Path] = None,
                     grids_path: Optional[str | Path] = None, log: Callable[[dict], None] = print, device: str = "cpu") -> Optional[Path]:
    """Train encoder + grid head on the training split's renders; writes `out_dir/image_encoder` (resumes).

    The run folder also holds pretrain_config.json, checkpoints/ (encoder + head) and summary.json.

    `cache`: a latent cache of the split (`moca3d cache-latents`) for the renders instead of the folder (objects).
    `grids_path`: the surface-grid cache (default `out_dir/grids<R>.safetensors`, built when missing;
    one grid per object, or per scene instance).
    `device`: where the model trains (fp32); the data and the grids stay on the CPU and move a batch at a time.

    Launched as several processes (`accelerate launch`, torchrun) it trains data-parallel: every process draws the
    same global batch and its queries (seeded by (seed, step)) and encodes its rows of it (`batch_size` must divide
    among the processes), DistributedDataParallel averages the gradients, and the first process alone builds the grid
    cache, logs, writes checkpoints and the encoder, and returns its folder (the others return None). The global batch
    does not depend on the process count: a run resumes under another count and goes on as the same run (up to float
    rounding).
    """
    from moca3d.training.train_dit import schedule_step

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    processes, dev = launched_processes(device)
    world, rank = (processes.num_processes, processes.process_index) if processes else (1, 0)
    main = rank == 0
    mine = batch_rows(cfg.batch_size, rank, world)  # a one-line ConfigError when the processes do not divide the batch
    if not main:  # the first process logs and writes
        log = lambda record: None  # noqa: E731
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    model = build_predictor(cfg).to(dev)
    # the run folder describes itself, with the encoder's actual architecture (init_from's, widened): `load_run`
    record = cfg.to_dict() | {"image_encoder": {k: v for k, v in model.image_encoder.config.items() if not k.startswith("_")}}
    config_path = out_dir / "pretrain_config.json"
    ckpt = latest_checkpoint(out_dir)
    if main:
        claim_run(out_dir, record=False)  # another job training there: refused before anything loads
    notes: list[str] = []
    record_resume = None
    if ckpt is not None and config_path.is_file():  # before any work: another recipe's run is refused, not mixed in
        record_resume = check_resume(config_path, record, notes.append, recipe_defaults(type(cfg)))
    elif main:
        out_dir.mkdir(parents=True, exist_ok=True)
        record_run_config(config_path, record)
    samples, asset_ids = load_samples(cfg, data_dir, cache)
    scene = cfg.condition == "scene"
    grids_path = Path(grids_path) if grids_path is not None else out_dir / f"grids{cfg.grid_resolution}.safetensors"
    if main and not grids_path.is_file():
        log({"event": "building surface grids", "assets": len(asset_ids), "path": str(grids_path)})
        build_grid_cache(data_dir, asset_ids, cfg.grid_resolution, grids_path, per_component=scene)
    if processes:
        processes.wait_for_everyone()  # the others read the grids the first one built
    packed, grid_ids, resolution = read_grid_cache(grids_path)
    if resolution != cfg.grid_resolution:
        raise ConfigError(f"{grids_path}: grids are {resolution}^3, the recipe asks for {cfg.grid_resolution}^3")
    row = {key: i for i, key in enumerate(grid_ids)}
    missing = [k for k in samples.keys if k not in row]
    if missing:
        raise InputError(f"{grids_path}: no grid for {len(missing)} of the training {'instances' if scene else 'assets'} (first: {missing[0]})")
    packed = packed[[row[k] for k in samples.keys]]  # (P, bytes), in the pairs' order; unpacked and dilated per batch
    train_idx, val_idx = holdout_split(samples.assets, len(asset_ids), cfg.val_assets)
    train_rows = torch.tensor(train_idx, dtype=torch.long)
    centres = grid_centres(resolution)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    start, elapsed0 = 0, 0.0
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        start, elapsed0 = state.step, float(state.extra.get("elapsed_s", 0.0))
        check_same_data(state.extra.get("data"), asset_ids, out_dir, data_dir,
                        f"a recipe's image_encoder_from {out_dir}/image_encoder, written when the run finishes: resume it "
                        "on its own data first")
        if record_resume is not None and main:  # the resume accepted: its changes recorded
            record_resume()
        spent = cfg.spent(start, elapsed0)
        log({"event": "resume", "step": start, **({"note": notes[0]} if notes else {}),
             **({"finished": "nothing to train; its encoder is evaluated and written again"} if spent else {})})
    net = model
    if processes:  # gradients averaged over the processes during backward
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if main:
        claim_run(out_dir)  # a second job in this folder is refused, not left to overwrite this one's checkpoints
    t0 = time.time()
    step, losses = start, []
    with stop_requests() as stop:  # SIGTERM or a first Ctrl+C: a checkpoint of the last step, then out
        while step < cfg.steps:
            elapsed = elapsed0 + time.time() - t0  # the run's, resumes included: the limit holds for the whole run
            # one clock and one stop for all processes (the same LR; none left waiting in a collective): one collective
            elapsed, stopped = process_maxima([elapsed, float(bool(stop))], processes, dev)
            if stopped:
                if main and step > start and step % cfg.checkpoint_every:  # the last step's checkpoint, unless written
                    save_checkpoint(out_dir, step, model, optimizer, extra={"elapsed_s": elapsed0 + time.time() - t0, "data": data_identity(asset_ids)})
                if main:
                    release_run(out_dir)
                saved = "checkpoint saved, " if step > start or ckpt is not None else ""  # (a fresh run stopped at once: none)
                raise TrainingStopped(f"stopped at step {step} of {cfg.steps} ({stop.reason or 'another process'}): "
                                      f"{saved}the same command resumes", signum=stop.signum)
            if cfg.time_limit_s and elapsed >= cfg.time_limit_s:
                break
            sched = schedule_step(step, cfg, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(sched, cfg)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # per-step draws: a resumed run draws the same
            pick = torch.randint(0, len(train_idx), (cfg.batch_size,), generator=gen)
            grids = dilate_grids(unpack_grids(packed[train_rows[pick]], resolution), cfg.dilate)  # (B, R, R, R)
            idx, labels = draw_queries(grids, cfg.queries_per_image, gen)  # the global batch's: the same on every process
            pick, idx, labels = pick[mine], idx[mine], labels[mine]  # this process's rows (all of them in one process)
            images = samples.inputs([train_idx[i] for i in pick.tolist()]).to(dev)  # (b, C, S, S)
            logits = net(images, centres[idx].to(dev))  # (b, Q)
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % cfg.log_every == 0:
                loss_mean = process_mean({"loss": float(np.mean(losses))}, processes, dev)["loss"]  # the global batches' loss
                log({"step": step, "loss": loss_mean, "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(elapsed0 + time.time() - t0, 1)})
                losses = []
            if main and step % cfg.checkpoint_every == 0:
                save_checkpoint(out_dir, step, model, optimizer, extra={"elapsed_s": elapsed0 + time.time() - t0, "data": data_identity(asset_ids)})
    if processes:
        processes.wait_for_everyone()
    if not main:  # the same weights on every process (averaged gradients): the first evaluates, writes and reports
        return None
    metrics: dict[str, Any] = {}
    if val_idx:
        val_grids = dilate_grids(unpack_grids(packed[val_idx], resolution), cfg.dilate)
        metrics = evaluate_grids(model, lambda rows: samples.inputs([val_idx[i] for i in rows]).to(dev), val_grids)
        metrics["val_assets"] = len({samples.assets[i] for i in val_idx})
        if scene:  # small instances anywhere in the scene: their mean grid is empty, no reference (benchmarks/scene_encoder_eval.py)
            metrics["val_instances"] = len(val_idx)
        else:  # the image-free reference: every held-out object predicted as the training grids' mean > 0.5
            mean = mean_grid(packed[train_rows], resolution, cfg.dilate)[None]
            metrics["mean_grid_iou"] = float(grid_iou(mean.expand_as(val_grids), val_grids).mean())
    if step > start or ckpt is None:  # a finished run's checkpoint is kept as it is
        save_checkpoint(out_dir, step, model, optimizer, extra={"elapsed_s": elapsed0 + time.time() - t0, "data": data_identity(asset_ids)})
    model.image_encoder.save_pretrained(out_dir / "image_encoder", safe_serialization=True)
    summary = {"step": step, "elapsed_s": round(elapsed0 + time.time() - t0, 1), **metrics, **({"processes": world} if processes else {})}
    atomic_write_json(summary, out_dir / "summary.json")
    log({"event": "done", **summary})
    release_run(out_dir)
    return out_dir / "image_encoder"

