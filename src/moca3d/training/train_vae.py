"""Training of the VecSetVAE on a prepared dataset, validation, latent caching, reconstruction.

Dataset layout (written by `moca3d prepare`):

    ROOT/manifest.jsonl              {"id", "split", "kind", "category", "num_components", "names"}
    ROOT/assets/<id>/mesh.glb        normalised components, one named node per component
    ROOT/assets/<id>/samples.npz     surface (N, P, 6); query_points (N, Q, 3); query_sdf (N, Q) (+ inside)

Loss per query point, with the target t = clamp(sdf / truncation, -1, 1):
    |logit - t|  +  sign_weight * BCE(sign_sharpness * logit, sdf > 0; inside queries weighted by
    inside_weight)  (+ kl_weight * KL).
Every random draw of step s comes from a generator seeded by (seed, s), so a resumed run repeats
exactly the run that was not interrupted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from moca3d.data.dataset import load_samples, read_manifest
from moca3d.errors import ConfigError, InputError, warn_input
from moca3d.geometry.extract import ExtractConfig, extract_mesh
from moca3d.geometry.sampling import farthest_point_indices
from moca3d.models.vae import TOKEN_ORDERS, VecSetVAE
from moca3d.progress import Show, progress_bar
from moca3d.training.recipe import Recipe, check_resume, check_same_data, data_identity, lr_at, record_run_config
from moca3d.training.distributed import batch_rows, launched_processes, process_mean
from moca3d.training.stop import TrainingStopped, stop_requests
from moca3d.training.checkpoints import (EMA, atomic_write_json, check_finite, claim_run, fingerprint, frozen_fingerprint, latest_checkpoint,
                                         load_checkpoint, release_run, save_checkpoint, trim_log)

SMALL_MODEL: dict[str, Any] = {  # the built-in CPU-sized VAE (configs/vae_small.json)
    "latent_channels": 8, "num_latents": 64, "num_attention_heads": 4, "width_encoder": 128, "width_decoder": 128,
    "num_layers_encoder": 1, "num_layers_decoder": 3, "embed_frequency": 8, "truncation": 0.1,
    "init_std": 0.06,  # 0.02 (GPT-2's) is too small at width 128: attention stays uniform for hundreds of steps
}
SEED_STRIDE = 1_000_003  # mixes (seed, step) into one generator seed
RANK_SEED_OFFSET = 7_919  # process r > 0 of a multi-process run draws its loss noise from seed + offset * (r + 1)
VAL_SEED = 12345  # fixed seed of the deterministic surface subsets used to encode
LATENT_STAT_COMPONENTS = 2048  # training parts whose latents set the shift/scaling factors


@dataclass
class VAETrainConfig(Recipe):
    """A VAE training recipe (JSON: these fields, the model's config under "model")."""

    recipe_name = "VAE training"
    nested_models = {"model": VecSetVAE}

    model: dict[str, Any] = field(default_factory=lambda: dict(SMALL_MODEL))
    steps: int = 10000
    batch_size: int = 32  # components per step: many shapes with few queries each learn faster than the reverse
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    num_surface_points: int = 512  # dense points P_d fed to the encoder per component
    num_query_points: int = 256  # supervised query points per component and step
    # extra uniform queries per component and step in [-free_space_bound, free_space_bound]^3, labelled
    # "outside" where they lie at least one truncation from the part's (margin-padded) bounding box, where
    # the clamped target is exact; the others are masked out. The prepared queries are half uniform, so
    # the far corners of the domain are rarely seen and decode floaters without this.
    free_space_queries: int = 0
    # > free_space_queries: draw this many free-space candidates and train on the free_space_queries of them
    # the decoder calls most "inside" (hard-example mining: floaters are rare, uniform draws seldom hit them)
    free_space_candidates: int = 0
    free_space_bound: float = 1.05  # the extraction grid's bounds
    free_space_margin: float = 0.02  # bounding box padding: surface samples may miss the extremes
    kl_weight: float = 1e-4
    sign_weight: float = 0.5
    sign_sharpness: float = 10.0  # logits are ~sdf/truncation; BCE sees them times this
    inside_weight: float = 1.5  # BCE weight of inside queries: > 1 keeps thin parts from vanishing
    ema_decay: float = 0.995
    log_every: int = 50
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    validate_every: int = 2500  # full validation: meshes extracted, CD / F-scores
    val_query_every: int = 500  # cheap validation: sign accuracy / IoU at the held-out query points
    val_assets: int = 3  # held-out assets reconstructed at each full validation
    val_resolution: int = 128
    val_coarse_resolution: int = 32
    val_band: float = 0.95
    metric_points: int = 20000  # surface points per side for CD / F-score
    seed: int = 0
    num_threads: int = 0  # torch CPU threads; 0 leaves torch's default
    init_from: Optional[str] = None  # VAE folder to start from (its config replaces `model`)
    # train the decoder only: the encoder, hence every cached latent and the latent scaling factors,
    # stay those of `init_from`, so a transformer trained on its latents still fits the result
    freeze_encoder: bool = False

    def check(self) -> None:
        """Raise ConfigError for values out of range."""
        self.check_positive("steps", "batch_size", "num_surface_points", "num_query_points", "log_every",
                            "checkpoint_every", "validate_every", "val_query_every", "val_resolution", "val_coarse_resolution",
                            "metric_points")
        self.check_optimizer()
        if (self.free_space_queries < 0 or self.free_space_candidates < 0 or self.free_space_bound <= 0
                or self.free_space_margin < 0):
            raise ConfigError(f"bad free-space settings queries={self.free_space_queries} candidates="
                              f"{self.free_space_candidates} bound={self.free_space_bound} margin={self.free_space_margin}")
        if self.inside_weight <= 0:
            raise ConfigError(f"inside_weight must be positive, got {self.inside_weight}")
        if self.freeze_encoder and not self.init_from:
            raise ConfigError("freeze_encoder needs init_from (the VAE whose encoder is kept)")
        self.check_schedule()
        self.check_model_keys("model", VecSetVAE)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclass
class ComponentArrays:
    """All components of a split in memory, flat over assets."""

    surface: torch.Tensor  # (N, P, 6)
    query_points: torch.Tensor  # (N, Q, 3)
    query_sdf: torch.Tensor  # (N, Q)
    asset_ids: list[str]
    component: list[int]

    def __len__(self) -> int:
        return self.surface.shape[0]


def load_split(root: str | Path, split: str, max_assets: Optional[int] = None) -> ComponentArrays:
    """Load every component of the assets of one split (at most `max_assets` assets).

    Assets with more surface points or queries than the split's smallest count keep a fixed random
    subset of that size, so datasets prepared with different --num-surface / --num-queries mix.
    """
    entries = read_manifest(root, split)[:max_assets]
    if not entries:
        raise InputError(f"{root}: no assets in split '{split}'")
    surf, qp, qs, ids, comp = [], [], [], [], []
    for e in entries:
        s = load_samples(root, e["id"])
        n = s["surface"].shape[0]
        surf.append(s["surface"])
        qp.append(s["query_points"])
        qs.append(s["query_sdf"])
        ids += [e["id"]] * n
        comp += list(range(n))
    counts = {len(a[0]) for a in surf}, {len(a[0]) for a in qp}
    if len(counts[0]) > 1 or len(counts[1]) > 1:  # assets prepared with different P or Q (e.g. separate runs):
        P, Q = min(counts[0]), min(counts[1])  # keep a fixed random subset of each, the smallest count
        g = np.random.default_rng(VAL_SEED)
        surf = [a[:, g.permutation(a.shape[1])[:P]] for a in surf]
        keep = [g.permutation(a.shape[1])[:Q] for a in qp]
        qp, qs = [a[:, k] for a, k in zip(qp, keep)], [a[:, k] for a, k in zip(qs, keep)]
    return ComponentArrays(torch.from_numpy(np.concatenate(surf)).float(), torch.from_numpy(np.concatenate(qp)).float(),
                           torch.from_numpy(np.concatenate(qs)).float(), ids, comp)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random draw of one training step."""
    return torch.Generator().manual_seed(seed * SEED_STRIDE + step)


def random_subset(x: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Per-row random subset without replacement: (B, P, ...) -> (B, count, ...)."""
    B, P = x.shape[:2]
    if count >= P:
        return x
    idx = torch.rand(B, P, generator=generator).argsort(dim=1)[:, :count]  # (B, count)
    return torch.gather(x, 1, idx.view(B, count, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:]))


def free_space_queries(surface: torch.Tensor, count: int, bound: float, clearance: float, margin: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform points far from each component: points (B, M, 3), sdf (B, M) and a 0/1 weight (B, M).

    A point at distance d >= clearance from the component's bounding box (padded by `margin`) is
    outside the component and at least d from its surface, so sdf = -d is a lower bound whose
    truncated target, -1, is exact. Points nearer the box get weight 0.
    """
    B = surface.shape[0]
    lo = surface[..., :3].amin(dim=1, keepdim=True) - margin  # (B, 1, 3)
    hi = surface[..., :3].amax(dim=1, keepdim=True) + margin  # (B, 1, 3)
    points = (torch.rand(B, count, 3, generator=generator) * 2 - 1) * bound  # (B, M, 3)
    gap = torch.maximum(lo - points, points - hi).clamp(min=0)  # (B, M, 3) per-axis distance outside the box
    dist = gap.norm(dim=-1)  # (B, M)
    weight = (dist >= clearance).float()
    return points, -dist.clamp(min=clearance), weight


def make_batch(data: ComponentArrays, cfg: VAETrainConfig, step: int, truncation: float = 0.1) -> dict[str, torch.Tensor]:
    """The training batch of `step` (deterministic in (seed, step)); `truncation`: the model's."""
    g = step_generator(cfg.seed, step)
    idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g)  # (B,)
    full_surface = data.surface[idx]  # (B, P, 6)
    surface = random_subset(full_surface, cfg.num_surface_points, g)  # (B, Pd, 6)
    q = torch.cat([data.query_points[idx], data.query_sdf[idx, :, None]], dim=-1)  # (B, Q, 4)
    q = random_subset(q, cfg.num_query_points, g)  # (B, Mq, 4)
    batch = {"surface": surface, "points": q[..., :3].contiguous(), "sdf": q[..., 3].contiguous(), "generator": g}
    if cfg.free_space_queries:  # (B, Mf) candidates; vae_loss keeps free_space_queries of them
        count = max(cfg.free_space_queries, cfg.free_space_candidates)
        batch["free"] = free_space_queries(full_surface, count, cfg.free_space_bound, truncation, cfg.free_space_margin, g)
    return batch


def hardest_free_space(model: VecSetVAE, tokens: torch.Tensor, free: tuple[torch.Tensor, ...], count: int) -> tuple[torch.Tensor, ...]:
    """The `count` free-space candidates per component with the highest ("most inside") logit; `tokens`: decode_tokens(z)."""
    points, sdf, weight = free  # (B, Mc, 3), (B, Mc), (B, Mc)
    if points.shape[1] <= count:
        return free
    with torch.no_grad():
        score = model.query(tokens, points.to(tokens.device)).float().cpu().masked_fill(weight == 0, float("-inf"))  # (B, Mc)
    idx = score.topk(count, dim=1).indices  # (B, count)
    return torch.gather(points, 1, idx[..., None].expand(-1, -1, 3)), torch.gather(sdf, 1, idx), torch.gather(weight, 1, idx)


def deterministic_surface(surface: torch.Tensor, count: int) -> torch.Tensor:
    """The fixed subset of `count` surface points used to encode at evaluation: (N, P, 6) -> (N, min(count, P), 6)."""
    return random_subset(surface, count, torch.Generator().manual_seed(VAL_SEED))


# ----------------------------------------------------------------------------------------------
# Loss and schedule
# ----------------------------------------------------------------------------------------------


def vae_loss(model: VecSetVAE, batch: dict[str, Any], cfg: VAETrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (truncated-SDF L1 + sign BCE) + KL loss of one batch."""
    g = batch["generator"]
    surface = batch["surface"]
    L = model.config.num_latents
    qidx = farthest_point_indices(surface[..., :3].cpu(), L, random_start=True, generator=g)  # (B, L)
    posterior = model.encode(surface, query_indices=qidx)
    z = posterior.sample(g)  # (B, L, C)
    tokens = model.decode_tokens(z)  # (B, L, W): the decoder's latent stack, run once for mining and loss
    points, sdf = batch["points"], batch["sdf"]  # (B, Mq, 3), (B, Mq)
    weight = torch.ones_like(sdf)  # 0 masks a query out
    if "free" in batch:  # free-space queries (mined among the candidates): (B, Mq + Mf)
        fp, fs, fw = hardest_free_space(model, tokens.detach(), batch["free"], cfg.free_space_queries)
        points, sdf, weight = torch.cat([points, fp.to(points)], 1), torch.cat([sdf, fs.to(sdf)], 1), torch.cat([weight, fw.to(sdf)], 1)
    logits = model.query(tokens, points)  # (B, M)
    total = weight.sum().clamp(min=1.0)
    target = (sdf / model.config.truncation).clamp(-1.0, 1.0)
    loss_sdf = ((logits - target).abs() * weight).sum() / total
    pos_weight = torch.tensor(cfg.inside_weight, device=logits.device)
    loss_sign = F.binary_cross_entropy_with_logits(cfg.sign_sharpness * logits, (sdf > 0).float(), pos_weight=pos_weight,
                                                   reduction="none")
    loss_sign = (loss_sign * weight).sum() / total
    loss_kl = posterior.kl().mean()
    loss = loss_sdf + cfg.sign_weight * loss_sign + cfg.kl_weight * loss_kl
    with torch.no_grad():
        sign_acc = (((logits > 0) == (sdf > 0)).float() * weight).sum() / total
    values = torch.stack([loss, loss_sdf, loss_sign, loss_kl, sign_acc]).detach().float().tolist()  # one device read, not five
    stats = dict(zip(("loss", "sdf", "sign", "kl", "sign_acc"), values))
    return loss, stats


def make_optimizer(model: torch.nn.Module, cfg: VAETrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on matrices only (not on biases and norms)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


# ----------------------------------------------------------------------------------------------
# Encoding, decoding, validation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latents(model: VecSetVAE, surface: torch.Tensor, num_points: int, batch_size: int = 16,
                   token_order: str = "fps", num_latents: Optional[int] = None) -> torch.Tensor:
    """Posterior means (N, L, C) float32 of components' surfaces (N, P, 6), deterministic; L = `num_latents`, default
    the VAE's."""
    device = next(model.parameters()).device
    surface = deterministic_surface(surface, num_points)
    out = [model.encode(surface[i:i + batch_size].to(device), token_order=token_order, num_latents=num_latents).mode().float().cpu()
           for i in range(0, len(surface), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def query_metrics(model: VecSetVAE, data: ComponentArrays, cfg: VAETrainConfig, batch_size: int = 16,
                  near: float = 0.02) -> dict[str, float]:
    """Sign accuracy (all / within `near` of the surface), occupancy IoU and truncated-SDF L1 at the query points."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    latents = encode_latents(model, data.surface, cfg.num_surface_points, batch_size)  # (N, L, C)
    correct = near_correct = near_total = inter = union = l1 = 0.0
    for i in range(0, len(data), batch_size):
        logits = model.decode(latents[i:i + batch_size].to(device), data.query_points[i:i + batch_size].to(device),
                              chunk_size=4096).cpu()  # (b, Q)
        sdf = data.query_sdf[i:i + batch_size]
        pred_in, true_in = logits > 0, sdf > 0
        correct += (pred_in == true_in).sum().item()
        close = sdf.abs() < near
        near_correct += ((pred_in == true_in) & close).sum().item()
        near_total += close.sum().item()
        inter += (pred_in & true_in).sum().item()
        union += (pred_in | true_in).sum().item()
        l1 += (logits - (sdf / model.config.truncation).clamp(-1, 1)).abs().sum().item()
    model.train(was_training)
    n = data.query_sdf.numel()
    return {"sign_acc": correct / n, "near_sign_acc": near_correct / max(near_total, 1.0),
            "iou": inter / max(union, 1.0), "tsdf_l1": l1 / n}


def decode_meshes(model: VecSetVAE, latents: torch.Tensor, extract: ExtractConfig) -> list:
    """One mesh per latent set (N, L, C); a component whose field has no surface gives an empty mesh."""
    device = next(model.parameters()).device
    return [extract_mesh(model.field(z.to(device), chunk_size=extract.chunk_size), extract, device) for z in latents]


def load_gt_meshes(root: str | Path, entry: dict[str, Any]) -> list:
    """Ground-truth component meshes of an asset, in the order of samples.npz (manifest names)."""
    from moca3d.geometry.mesh_io import load_file

    meshes, names = load_file(Path(root) / "assets" / entry["id"] / "mesh.glb")
    wanted = entry.get("names") or names
    by_name = dict(zip(names, meshes))
    if all(n in by_name for n in wanted) and len(wanted) == len(meshes):
        return [by_name[n] for n in wanted]
    return meshes


def reconstruction_metrics(pred: list, gt: list, metric_points: int, seed: int = 0) -> dict[str, Any]:
    """CD / F-scores (DESIGN §6) of reconstructed components against ground truth.

    "asset": the fused components, normalised together (the protocol of §6);
    "parts": each component in the shared asset frame (no re-normalisation);
    "parts_normalized": each component normalised alone (strict: tiny parts are magnified).
    """
    from moca3d.geometry.mesh_io import has_surface
    from moca3d.metrics import MetricsConfig, surface_metrics

    shared = MetricsConfig(num_points=metric_points, seed=seed, frame="none")
    alone = MetricsConfig(num_points=metric_points, seed=seed, frame="each")
    zero = {"chamfer": float("nan"), "fscore@0.1": 0.0, "fscore@0.05": 0.0}
    parts = [surface_metrics([p], [g], shared) if has_surface(p) else dict(zero) for p, g in zip(pred, gt)]
    parts_norm = [surface_metrics([p], [g], alone) if has_surface(p) else dict(zero) for p, g in zip(pred, gt)]
    kept = [p for p in pred if has_surface(p)]
    fused = surface_metrics(kept, gt, alone) if kept else dict(zero)
    return {"parts": parts, "parts_normalized": parts_norm, "asset": fused}


def validate(model: VecSetVAE, root: str | Path, cfg: VAETrainConfig, max_assets: Optional[int] = None,
             split: str = "val", progress: Show = False, per_asset: bool = False) -> dict[str, Any]:
    """Reconstruct held-out assets; mean per-part and per-asset CD and F-scores (+ each asset's under "assets")."""
    entries = read_manifest(root, split)[: (max_assets or cfg.val_assets)]
    if not entries:
        raise InputError(f"{root}: no assets in split '{split}' to validate on")
    extract = ExtractConfig(resolution=cfg.val_resolution, coarse_resolution=cfg.val_coarse_resolution,
                            band=cfg.val_band, band_decay=0.5, progress=False)
    results: dict[str, list] = {"parts": [], "parts_normalized": [], "asset": []}
    iterator = entries
    if progress:
        iterator = progress_bar(entries, show=progress, desc="validate", unit="asset", leave=False)
    was_training = model.training
    model.eval()
    for e in iterator:
        surface = torch.from_numpy(load_samples(root, e["id"])["surface"]).float()
        latents = encode_latents(model, surface, cfg.num_surface_points)
        pred = decode_meshes(model, latents, extract)
        m = reconstruction_metrics(pred, load_gt_meshes(root, e), cfg.metric_points)
        results["parts"] += m["parts"]
        results["parts_normalized"] += m["parts_normalized"]
        results["asset"].append(m["asset"])
    model.train(was_training)
    out: dict[str, float] = {"num_assets": len(results["asset"]), "num_parts": len(results["parts"])}
    for group, prefix in (("asset", "asset"), ("parts", "part"), ("parts_normalized", "part_normalized")):
        for key in ("fscore@0.1", "fscore@0.05", "chamfer"):
            out[f"{prefix}_{key}"] = float(np.nanmean([r[key] for r in results[group]]))
    out["part_min_fscore@0.05"] = float(min(p["fscore@0.05"] for p in results["parts"]))
    if per_asset:
        out["assets"] = [{"id": e["id"], "category": e.get("category"), "num_parts": e.get("num_components"),
                          **{k: float(r[k]) for k in ("fscore@0.1", "fscore@0.05", "chamfer")}}
                         for e, r in zip(entries, results["asset"])]
    return out


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


class VAELoss(torch.nn.Module):
    """`vae_loss` as a module's forward: what DistributedDataParallel wraps in a multi-process run."""

    def __init__(self, vae: VecSetVAE, cfg: VAETrainConfig):
        super().__init__()
        self.vae = vae
        self.cfg = cfg

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, stats) of one batch."""
        return vae_loss(self.vae, batch, self.cfg)


def process_rows(batch: dict[str, Any], cfg: VAETrainConfig, step: int, rank: int, world: int) -> dict[str, Any]:
    """Process `rank`'s share of a global batch (rows rank*B/world ...), with its own generator for the loss's draws."""
    if world == 1:
        return batch
    rows = batch_rows(cfg.batch_size, rank, world)
    share = {k: (v[rows] if torch.is_tensor(v) else tuple(t[rows] for t in v) if isinstance(v, tuple) else v)
             for k, v in batch.items()}
    share["generator"] = step_generator(cfg.seed + RANK_SEED_OFFSET * (rank + 1), step)
    return share


def train_vae(data_dir: str | Path, out_dir: str | Path, cfg: VAETrainConfig, resume: bool = False,
              device: str = "cpu", progress: Show = True, validate_at_end: bool = True) -> dict[str, Any]:
    """Train (or resume) a VAE; writes checkpoints, logs and OUT/vae (EMA weights, diffusers folder).

    Launched as several processes (`accelerate launch`, torchrun) it trains data-parallel: each process takes its
    share of every global batch, gradients are averaged, and the first process alone writes. A resume with the same
    process count continues exactly; with another one it continues on the same batches with other loss noise.
    """
    out_dir = Path(out_dir)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    processes, dev = launched_processes(device)
    world, rank = (processes.num_processes, processes.process_index) if processes else (1, 0)
    main = rank == 0
    if main:
        claim_run(out_dir, record=False)  # another job training there: refused before anything is read or written
    ckpt = latest_checkpoint(out_dir) if resume else None
    train = load_split(data_dir, "train")  # data and model first: bad input leaves no run folder behind
    assets = sorted(set(train.asset_ids))  # what the run trains on, recorded in its checkpoints
    has_val = bool(read_manifest(data_dir, "val"))
    val_arrays = load_split(data_dir, "val") if has_val else None
    if not has_val and main:  # it validated nothing, without a word: no val loss, no reconstruction scores in the log
        warn_input(f"{data_dir} has no val split: the run logs no validation (prepare with --val-fraction or a --splits "
                   "list naming val assets; eval-vae --split test scores the VAE after)")
    batch_rows(cfg.batch_size, rank, world)  # a one-line ConfigError when the processes do not divide the batch
    say = print if main else (lambda *args: None)
    torch.manual_seed(cfg.seed)
    model = build_vae(cfg)  # (with init_from, cfg.model becomes its config: as the run recorded it)
    record_resume = None  # another recipe is refused before the checkpoint loads; recorded once accepted
    if ckpt is not None and (out_dir / "train_config.json").is_file():
        record_resume = check_resume(out_dir / "train_config.json", cfg, say)
    frozen = frozen_fingerprint(model)  # a frozen encoder stays out of the checkpoints: a resume reloads it from init_from
    model = model.to(dev)
    optimizer = make_optimizer(model, cfg)
    ema = EMA(model, decay=cfg.ema_decay)
    start, elapsed = 0, 0.0
    log_path = out_dir / "log.jsonl"
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, ema, frozen=frozen)
        start, elapsed = state.step, float(state.extra.get("elapsed_s", 0.0))
        check_same_data(state.extra.get("data"), assets, out_dir, data_dir,
                        f"a new -o with --init-from {out_dir}/vae, written when the run finishes: resume it on its own data first")
        if record_resume is not None and main:  # after the checkpoint and its data: recorded now
            record_resume()
        say(f"resumed from {ckpt} (step {start})")
        if main:
            trim_log(log_path, start)  # lines logged after that checkpoint are logged again
    elif not resume and latest_checkpoint(out_dir) is not None:
        raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue or use a new directory")
    elif main:
        if resume:  # e.g. a mistyped -o: said, not hours of a new run in silence
            say(f"{out_dir}: no checkpoint to resume from: a new run of {cfg.steps} steps")
        out_dir.mkdir(parents=True, exist_ok=True)
        record_run_config(out_dir / "train_config.json", cfg.to_dict())
        trim_log(log_path, 0)  # a run cut before its first checkpoint starts again: so does its log
    if main:
        claim_run(out_dir)  # a second job in this folder is refused, not left to overwrite this one's checkpoints
    loss_fn = VAELoss(model, cfg)
    if processes:  # gradients averaged over the processes during backward
        loss_fn = torch.nn.parallel.DistributedDataParallel(loss_fn, device_ids=[dev.index] if dev.type == "cuda" else None)
        processes.wait_for_everyone()  # no process reads the run folder before the first has set it up

    bar = None
    if progress and main:
        bar = progress_bar(show=progress, total=cfg.steps, initial=start, desc="train-vae", unit="step", dynamic_ncols=True)
    model.train()
    t0 = time.time()
    running: dict[str, float] = {}
    running_steps = 0
    with stop_requests() as stop:  # SIGTERM or a first Ctrl+C: the step's checkpoint, then out
        for step in range(start, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = process_rows(make_batch(train, cfg, step, model.config.truncation), cfg, step, rank, world)
            batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
            loss, stats = loss_fn(batch)
            if not torch.isfinite(loss):
                raise ConfigError(f"non-finite loss at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            optimizer.step()
            ema.update(model)
            stats = process_mean({**stats, "stop": float(bool(stop))}, processes, dev)  # the processes' means, one collective
            stopped = stats.pop("stop") > 0  # SIGTERM / Ctrl+C on any process
            done = step + 1
            for k, v in stats.items():
                running[k] = running.get(k, 0.0) + v
            running_steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['sign_acc']:.3f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                record = {"step": done, "lr": lr_at(step, cfg), "elapsed_s": elapsed + time.time() - t0}
                record.update({k: v / running_steps for k, v in running.items()})
                if main:
                    _append_jsonl(log_path, record)
                running, running_steps = {}, 0
            if not main:  # checkpoints, validation and logs are the first process's
                if stopped:
                    raise TrainingStopped(f"stopped at step {done}", signum=stop.signum)
                continue
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopped:
                save_checkpoint(out_dir, done, model, optimizer, ema, extra={"elapsed_s": elapsed + time.time() - t0, "data": data_identity(assets)},
                                keep_last=cfg.keep_checkpoints, frozen=frozen)
            if stopped:
                release_run(out_dir)
                if bar is not None:
                    bar.close()
                raise TrainingStopped(f"stopped at step {done} of {cfg.steps} ({stop.reason}): checkpoint saved, the same command "
                                      "resumes (train-vae: with --resume)", signum=stop.signum)
            if val_arrays is not None and (done % cfg.val_query_every == 0 or done == cfg.steps):
                metrics = query_metrics(ema_model(ema, cfg, dev), val_arrays, cfg)
                _append_jsonl(log_path, {"step": done, "val_query": metrics})
                if bar is not None:
                    bar.write(f"step {done}: " + ", ".join(f"val {k} {v:.4f}" for k, v in metrics.items()))
            if has_val and done % cfg.validate_every == 0 and done != cfg.steps:
                metrics = validate(ema_model(ema, cfg, dev), data_dir, cfg, progress=progress)
                _append_jsonl(log_path, {"step": done, "val": metrics})
                if bar is not None:
                    bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if bar is not None:
        bar.close()
    train_time = elapsed + time.time() - t0
    final = VecSetVAE(**cfg.model)
    ema.copy_to(final)  # every process: the same weights (averaged gradients), written by the first
    if processes:
        processes.wait_for_everyone()
    summary: dict[str, Any] = {"steps": cfg.steps, "trained_steps": max(cfg.steps - start, 0), "train_time_s": train_time,
                               "session_time_s": time.time() - t0, "processes": world}  # the run's, and this launch's
    if not main:
        return {**summary, "writer": False}  # the first process reports
    if not cfg.freeze_encoder:  # a frozen encoder keeps init_from's factors (in cfg.model)
        fit_latent_scale(final, train, cfg)
    final.save_pretrained(out_dir / "vae", safe_serialization=True)
    if has_val and validate_at_end:
        summary["val"] = validate(final.to(dev), data_dir, cfg, progress=progress)
        _append_jsonl(log_path, {"step": cfg.steps, "val": summary["val"], "final": True})
    atomic_write_json(summary, out_dir / "summary.json")
    release_run(out_dir)
    return summary




def load_vae_folder(folder: Path, hint: str = "") -> VecSetVAE:
    """A VecSetVAE from a diffusers-style folder (config.json + safetensors), checked for NaN/inf."""
    if not (folder / "config.json").is_file():
        inside = next((sub for sub in (folder / "vae", folder / "pipeline" / "vae") if (sub / "config.json").is_file()), None)
        hint = hint or (f" (its VAE is {inside})" if inside else "")  # a pipeline or a training run given whole
        raise InputError(f"{folder}: not a VAE folder, config.json missing{hint}")
    if not any(folder.glob("*.safetensors")):
        raise InputError(f"{folder}: no .safetensors weights")
    model = VecSetVAE.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    check_finite(model.state_dict(), str(folder))
    return model


LATENT_MODULES = ("encoder", "quant")  # the posterior, points -> (mean, log-variance): all a VAE's latents depend on


def encoder_id(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> str:
    """The fingerprint of a VAE's LATENT_MODULES, recorded with the latents it caches: a transformer trained on them
    must be paired with a VAE of the same encoder (a decoder fine-tune keeps it). `dtype`: of the tensors hashed (one
    whatever the dtype the weights are stored or loaded in, e.g. float16 for a pipeline saved in fp16 and loaded in fp32)."""
    state = {k: v if dtype is None or not v.is_floating_point() else v.to(dtype)
             for k, v in model.state_dict().items() if k.split(".")[0] in LATENT_MODULES}
    return "sha256:" + fingerprint(state)["sha256"][:16]


def build_vae(cfg: VAETrainConfig) -> VecSetVAE:
    """A fresh VAE of `cfg.model`, or `cfg.init_from`'s weights (then `cfg.model` becomes its config)."""
    if not cfg.init_from:
        return VecSetVAE(**cfg.model)
    model = load_vae_folder(Path(cfg.init_from))
    base = {k: v for k, v in model.config.items() if not k.startswith("_")}
    # what the recipe's "model" block set (away from the default) that the base has otherwise: not used, said
    ignored = {k: v for k, v in cfg.model.items() if SMALL_MODEL.get(k) != v and base.get(k) != v}
    if ignored:
        shown = ", ".join(f"{k} {v} (its: {base.get(k)})" for k, v in list(ignored.items())[:3])
        warn_input(f"init_from {cfg.init_from}: the recipe's model settings {shown} are not used: a fine-tune keeps its "
                   "base's shape (drop the recipe's \"model\" block, or train from scratch without init_from)")
    cfg.model = base
    if cfg.freeze_encoder:
        for name in LATENT_MODULES:  # the cached latents (and transformers trained on them) stay valid
            getattr(model, name).requires_grad_(False)
    return model


def fit_latent_scale(model: VecSetVAE, data: ComponentArrays, cfg: VAETrainConfig,
                     max_components: int = LATENT_STAT_COMPONENTS) -> tuple[float, float]:
    """Set the VAE's shift/scaling factors from the posterior means of (up to `max_components`) training parts."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    latents = encode_latents(model, data.surface[:max_components], cfg.num_surface_points)  # (n, L, C)
    model.train(was_training)
    return model.fit_latent_statistics(latents.to(device))


def ema_model(ema: EMA, cfg: VAETrainConfig, device: torch.device) -> VecSetVAE:
    """A fresh VecSetVAE holding the EMA weights (the training model is left untouched)."""
    averaged = VecSetVAE(**cfg.model).to(device)
    ema.copy_to(averaged)
    return averaged.eval()


# ----------------------------------------------------------------------------------------------
# Latent caching and reconstruction
# ----------------------------------------------------------------------------------------------


def encode_dataset(data_dir: str | Path, model: VecSetVAE, model_id: str, num_points: int, batch_size: int = 16,
                   overwrite: bool = False, progress: Show = True, token_order: str = "fps",
                   num_latents: Optional[int] = None, replace: bool = False) -> dict[str, int]:
    """Write ROOT/assets/<id>/latents.safetensors ("latents": (N, L, C) posterior means) per asset.

    Resumable: an asset whose file already carries the same model id, latent count, point count and token order is
    skipped (a converted VAE's weights are the same at every `--num-latents`). Latents made otherwise (another VAE: a
    run trained on them could no longer resume) are replaced only with `overwrite` (every asset encoded again) or
    `replace` (those alone, counted as "replaced": train-default, whose own VAE the data must be encoded with), else an
    InputError names them before anything is written. `num_latents`: L, default the VAE's.
    """
    from moca3d.training.checkpoints import atomic_save_tensors, read_metadata

    if token_order not in TOKEN_ORDERS:
        raise ConfigError(f"token_order must be one of {', '.join(TOKEN_ORDERS)}, got {token_order!r}")
    entries = read_manifest(data_dir)
    done = skipped = 0
    iterator = entries
    if progress:
        iterator = progress_bar(entries, show=progress, desc="encode", unit="asset")
    model.eval()
    encoder = encoder_id(model)  # recorded with every asset's latents
    wanted = (model_id, str(num_latents or model.config.num_latents), str(num_points), token_order)
    made = {}  # asset id -> how its existing latents were made (model, L, points, order): `wanted` if the same latents
    for e in entries if not overwrite else []:
        path = Path(data_dir) / "assets" / e["id"] / "latents.safetensors"
        if path.is_file():
            try:
                meta = read_metadata(path)
            except Exception:  # a broken file (a killed write of an old version): encoded again
                continue
            how = (meta.get("model"), meta.get("num_latents"), meta.get("num_points"), meta.get("token_order", "fps"))
            if how[1:] == wanted[1:] and meta.get("encoder") == encoder:  # another folder, the same encoder weights
                how = wanted  # (a decoder-only fine-tune): the same latents
            made[e["id"]] = how
    other = [(i, how) for i, how in made.items() if how != wanted]
    if other and not replace:
        (first, how), keys = other[0], ("model", "L", "points", "order")
        differs = ", ".join(f"{k} {h} (now {w})" for k, h, w in zip(keys, how, wanted) if h != w)
        raise InputError(f"{data_dir}: {len(other)} of {len(entries)} assets hold latents made otherwise ({first}: {differs}); "
                         "re-encoding replaces them, and a run trained on them could no longer resume: pass --overwrite to "
                         "replace them, or encode a copy of the dataset")
    for e in iterator:
        path = Path(data_dir) / "assets" / e["id"] / "latents.safetensors"
        if made.get(e["id"]) == wanted:
            skipped += 1
            continue
        surface = torch.from_numpy(load_samples(data_dir, e["id"])["surface"]).float()
        if surface.shape[1] < num_points:  # they were used silently: latents of another point count than asked
            raise InputError(f"{e['id']}: {num_points} surface points asked (--points), the data has {surface.shape[1]} per part: "
                             f"lower --points or prepare with --num-surface {num_points} or more")
        latents = encode_latents(model, surface, num_points, batch_size, token_order, num_latents)  # (N, L, C)
        meta = {"token_order": token_order, "asset_id": e["id"], "num_components": str(latents.shape[0]), "names": json.dumps(e.get("names", [])),
                "num_latents": str(latents.shape[1]), "latent_channels": str(latents.shape[2]),
                "model": model_id, "encoder": encoder, "num_points": str(num_points), "kind": "posterior_mean"}
        atomic_save_tensors({"latents": latents.contiguous()}, path, metadata=meta)
        done += 1
    return {"encoded": done, "skipped": skipped, **({"replaced": len(other)} if replace else {})}


def reconstruct_components(parts: list, names: list[str], model: VecSetVAE, num_points: int, extract: ExtractConfig,
                           seed: int = 0, label: str = "asset") -> list:
    """Encode every component with faces (`mesh_io.read_components`' parts, validated) and decode it back in the input's
    frame; an empty one (a generation's) stays empty, in its place."""
    from moca3d.geometry.mesh_io import fit_normalization, transform_meshes, validate_components
    from moca3d.geometry.sampling import SurfaceSamplingConfig, sample_surface

    solid = [i for i, part in enumerate(parts) if len(part.faces)]
    meshes = [parts[i] for i in solid]
    validate_components(meshes, [names[i] for i in solid], label=label)
    norm = fit_normalization(meshes)
    canonical = transform_meshes(meshes, norm)
    scfg = SurfaceSamplingConfig(num_points=max(num_points, SurfaceSamplingConfig().num_points))
    surface = torch.from_numpy(np.stack([sample_surface(m, scfg, seed + i) for i, m in enumerate(canonical)]))
    latents = encode_latents(model, surface, num_points)
    out = list(parts)
    for i, mesh in zip(solid, decode_meshes(model, latents, extract)):
        if len(mesh.vertices):
            mesh.vertices = norm.invert(mesh.vertices)
        out[i] = mesh
    return out
