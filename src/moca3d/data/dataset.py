"""Torch Datasets over a prepared dataset folder (see moca3d.data.prepare for the layout)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from moca3d.errors import ConfigError, InputError, one_line, warn_input

SPLITS = ("train", "val", "test")
OBJECT_CACHE, SCENE_CACHE = "moca3d-latent-cache", "moca3d-scene-latent-cache"  # a latent cache's metadata "kind"
CACHE_HOLDS = {OBJECT_CACHE: "object", SCENE_CACHE: "scene"}  # kind -> the recipe "condition" that trains on it
CACHE_PER_ASSET = ("counts", "images", "renders", "labels")  # a latent cache's tensors of one row per asset; every other one has a row per part


def read_manifest(root: str | Path, split: str | None = None) -> list[dict]:
    """Manifest records of `root`, optionally only one split ('all' or None for every split)."""
    path = Path(root) / "manifest.jsonl"
    if not path.is_file():
        raise InputError(f"{root}: no manifest.jsonl (run `moca3d prepare` first)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: line {number} is not valid JSON ({err.msg}); re-run `moca3d prepare` on it") from None
        if not isinstance(record, dict) or not {"id", "split", "num_components"} <= record.keys():
            raise InputError(f"{path}: line {number} is not a manifest record (needs id, split, num_components)")
        records.append(record)
    if split not in (None, "all"):
        if split not in SPLITS:
            raise InputError(f"unknown split '{split}' (train, val, test or all)")
        records = [r for r in records if r["split"] == split]
    return records


def load_samples(root: str | Path, asset_id: str) -> dict[str, np.ndarray]:
    """The surface and query arrays of ROOT/assets/<id>/samples.npz."""
    path = Path(root) / "assets" / asset_id / "samples.npz"
    if not path.is_file():
        raise InputError(f"missing samples for asset {asset_id}: {path}")
    try:
        with np.load(path) as npz:
            return {k: npz[k] for k in ("surface", "query_points", "query_sdf")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: unreadable samples ({one_line(err)}); prepare the asset again") from None


def _subsample(n_total: int, n_keep: int | None, rng: np.random.Generator) -> np.ndarray | slice:
    """Random indices without replacement (sorted), or everything when n_keep is None or too large."""
    if n_keep is None or n_keep >= n_total:
        return slice(None)
    return np.sort(rng.choice(n_total, size=n_keep, replace=False))


class _PreparedBase(Dataset):
    """Shared loading and subsampling for the two dataset views."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        num_surface: int | None = None,
        num_queries: int | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.records = read_manifest(root, split)
        self.num_surface, self.num_queries = num_surface, num_queries
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw new subsamples each epoch (deterministic given seed, epoch and index)."""
        self.epoch = epoch

    def _pick(self, arrays: dict[str, np.ndarray], index: int) -> dict[str, torch.Tensor]:
        """Subsample surface and query points (the same subset for every component of an asset)."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        s = _subsample(arrays["surface"].shape[-2], self.num_surface, rng)
        q = _subsample(arrays["query_points"].shape[-2], self.num_queries, rng)
        return {
            "surface": torch.from_numpy(np.ascontiguousarray(arrays["surface"][..., s, :])),  # (..., P, 6)
            "query_points": torch.from_numpy(np.ascontiguousarray(arrays["query_points"][..., q, :])),  # (..., Q, 3)
            "query_sdf": torch.from_numpy(np.ascontiguousarray(arrays["query_sdf"][..., q])),  # (..., Q)
        }


class AssetDataset(_PreparedBase):
    """One item per asset: all components' samples plus the conditioning image and instance mask."""

    def __init__(self, root: str | Path, split: str | None = "train", num_surface: int | None = None,
                 num_queries: int | None = None, seed: int = 0, load_images: bool = True) -> None:
        super().__init__(root, split, num_surface, num_queries, seed)
        self.load_images = load_images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        item = {"id": record["id"], "num_components": int(record["num_components"]), "names": record["names"],
                "kind": record["kind"], "category": record["category"]}
        item.update(self._pick(load_samples(self.root, record["id"]), index))  # surface (N, P, 6) ...
        if self.load_images:
            from PIL import Image

            folder = self.root / "assets" / record["id"]
            rgb = np.asarray(Image.open(folder / "render.png").convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
            item["image"] = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # (3, H, W)
            item["mask"] = torch.from_numpy(np.asarray(Image.open(folder / "mask.png"), dtype=np.int64))  # (H, W)
        return item


class ComponentDataset(_PreparedBase):
    """One item per component of every asset (for VAE training): its surface and query samples."""

    def __init__(self, root: str | Path, split: str | None = "train", num_surface: int | None = None,
                 num_queries: int | None = None, seed: int = 0) -> None:
        super().__init__(root, split, num_surface, num_queries, seed)
        self.index = [(a, c) for a, r in enumerate(self.records) for c in range(int(r["num_components"]))]
        self._cache: tuple[str, dict[str, np.ndarray]] | None = None  # the last asset read

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict:
        asset, component = self.index[index]
        asset_id = self.records[asset]["id"]
        if self._cache is None or self._cache[0] != asset_id:
            self._cache = (asset_id, load_samples(self.root, asset_id))
        arrays = {k: v[component] for k, v in self._cache[1].items()}
        item = self._pick(arrays, index)  # surface (P, 6), query_points (Q, 3), query_sdf (Q,)
        item.update(asset_id=asset_id, component=component, name=self.records[asset]["names"][component])
        return item


def pad_components(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-asset (N_b, ...) tensors -> (B, N_max, ...) zero-padded and the (B, N_max) real-component mask."""
    n_max = max(x.shape[0] for x in items)
    padded = items[0].new_zeros((len(items), n_max, *items[0].shape[1:]))
    mask = torch.zeros(len(items), n_max, dtype=torch.bool, device=items[0].device)
    for b, x in enumerate(items):
        padded[b, : x.shape[0]] = x
        mask[b, : x.shape[0]] = True
    return padded, mask


def load_cached_latents(path: str | Path) -> tuple[torch.Tensor, dict[str, Optional[str]]]:
    """An asset's cached latents (`moca3d encode-dataset`): (N, L, C) float32, and how they were made: "token_order"
    and "encoder" (the VAE encoder's id, `train_vae.encoder_id`; None in files written before it was recorded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            latents = f.get_tensor("latents").float()
            meta = f.metadata() or {}
            made = {"token_order": meta.get("token_order", "fps"),  # files written before token orders existed
                    "encoder": meta.get("encoder")}
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: unreadable cached latents ({err}); re-encode with `moca3d encode-dataset --overwrite`") from None
    if not torch.isfinite(latents).all():
        raise InputError(f"{path}: cached latents contain NaN or Inf; re-encode with `moca3d encode-dataset --overwrite`")
    return latents, made


def report_missing_latents(missing: list[str], root: str | Path, split: str) -> None:
    """Warn (one line) that assets of a split are left out for lack of cached latents."""
    if missing:
        warn_input(f"{root}: {len(missing)} '{split}' assets have no cached latents and are left out (first: {missing[0]}); "
                   "`moca3d encode-dataset` includes them")


PARTS_OPTION = ("max_components", "raise the recipe's max_components to train on them")  # report_too_many_parts' default


def report_too_many_parts(too_many: list[str], kept: int, root: str | Path, what: str, max_components: int,
                          option: tuple[str, str] = PARTS_OPTION) -> str:
    """Warn (one line) that assets (`what`: "'train' assets", "cached assets") with more than `max_components` parts are
    left out; the phrase to add to the error when none is kept ("" when none was left out). `option`: the setting that
    limits them and its remedy, the recipe's max_components unless a command's (("--max-parts", "raise --max-parts to
    cache them"))."""
    if not too_many:
        return ""
    option, remedy = option
    hint = f"{len(too_many)} {what} have more than {option} {max_components} parts (first: {too_many[0]}): {remedy}"
    if kept:
        warn_input(f"{root}: {hint}; they are left out")
    return f"; {hint}"


def check_latent_lengths(latents: list, root: str | Path) -> None:
    """One latent length L over a dataset's (N, L, C) latents (an interrupted re-encode at another --num-latents mixes two)."""
    lengths = sorted({z.shape[1] for z in latents})
    if len(lengths) > 1:
        raise InputError(f"{root}: cached latents of {' and '.join(map(str, lengths))} tokens are mixed (an interrupted re-encode?): "
                         "run `moca3d encode-dataset --overwrite` with the VAE and --num-latents the recipe trains on")


def common_token_order(orders: set[str], root: str | Path) -> str:
    """The one token order of a dataset's cached latents (an error if they were encoded in different orders)."""
    if len(orders) > 1:
        raise InputError(f"{root}: cached latents mix token orders {sorted(orders)}: run `moca3d encode-dataset --overwrite`")
    return next(iter(orders), "fps")


def common_encoder(encoders: set[Optional[str]], root: str | Path) -> Optional[str]:
    """The one VAE encoder id of a dataset's cached latents (None: not recorded); an error if they were encoded by
    different encoders (a re-encode with another VAE, cut short)."""
    known = sorted(e for e in encoders if e)
    if len(known) > 1:
        raise InputError(f"{root}: cached latents of {len(known)} different VAE encoders are mixed (an interrupted re-encode "
                         "with another VAE?): run `moca3d encode-dataset --overwrite` with the VAE the transformer trains on")
    return known[0] if known else None


def check_latent_encoder(encoder: Optional[str], vae_encoder: str, where: str, vae: str | Path) -> None:
    """A one-line error when the cached latents (encoder id `encoder`; None: not recorded, not checked) were encoded
    by another VAE encoder than the VAE (`vae_encoder`) a transformer is about to train with."""
    if encoder is not None and encoder != vae_encoder:
        again = (f"re-encode its dataset (`moca3d encode-dataset DATA --model {vae} --overwrite`) and write the cache again "
                 "(`moca3d cache-latents`)") if Path(where).is_file() else f"re-encode (`moca3d encode-dataset {where} --model {vae} --overwrite`)"
        raise ConfigError(f"{where}: its latents were encoded by another VAE encoder ({encoder}) than {vae}'s ({vae_encoder}): "
                          f"train with the VAE that encoded them, or {again}")


def require_token_order(needed: str, found: str, where: str) -> None:
    """A one-line error when a transformer with token positions ("canonical") meets latents in another order."""
    if needed == "canonical" and found != "canonical":  # a model without positions takes any order
        raise ConfigError(f"{where}: the transformer expects latent tokens in 'canonical' order, the cached latents are in"
                          f" {found!r} order: run `moca3d encode-dataset --token-order canonical --overwrite`")


def save_latent_cache(path: str | Path, kind: str, latents: list[torch.Tensor], ids: list[str], token_order: str,
                      encoder: Optional[str] = None, **tensors: torch.Tensor) -> Path:
    """Write a latent cache (`moca3d cache-latents`): latents (sum N, L, C), counts (A,), `tensors` as given
    (images (A, 3, S, S) uint8; a scene cache's masks (sum N, S, S) uint8), ids, token order and the VAE encoder's id
    (when known) as metadata."""
    from moca3d.training.checkpoints import atomic_save_tensors

    counts = torch.tensor([z.shape[0] for z in latents], dtype=torch.long)  # (A,)
    meta = {"ids": json.dumps(ids), "kind": kind, "token_order": token_order, **({"encoder": encoder} if encoder else {})}
    atomic_save_tensors({"latents": torch.cat(latents), "counts": counts, **tensors}, Path(path), metadata=meta)
    return Path(path)


def load_latent_cache(path: str | Path, kind: str, max_components: int = 32, image_size: int | None = None) -> dict:
    """A latent cache of `kind`, checked, per asset and without the assets of more than `max_components` parts:
    "ids", "token_order", "encoder" (None when not recorded), "latents" [(N, L, C) float32], "images" [(3, S, S) uint8] and each per-part tensor
    (a scene cache's "masks" [(N, S, S) uint8])."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            found = meta.get("kind")
            if found not in CACHE_HOLDS:
                raise InputError(f"{path}: not a moca3d latent cache (write one with `moca3d cache-latents`)")
            if found != kind:
                raise InputError(f"{path}: a latent cache of {CACHE_HOLDS[found]}s, the recipe trains on {CACHE_HOLDS[kind]}s"
                                 f' ("condition": "{CACHE_HOLDS[kind]}")')
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a readable latent cache ({one_line(err)}); write one with `moca3d cache-latents`") from None
    if not torch.isfinite(tensors["latents"]).all():
        raise InputError(f"{path}: the cached latents contain NaN or Inf; write the cache again (`moca3d cache-latents`)")
    if image_size is not None and tensors["images"].shape[-1] != image_size:
        raise ConfigError(f"{path}: cached images are {tensors['images'].shape[-1]} px, the encoder takes {image_size} "
                          f"(`moca3d cache-latents --image-size {image_size}` writes a cache for it)")
    counts = tensors.pop("counts").tolist()
    assets = {k: v if k in CACHE_PER_ASSET else torch.split(v, counts) for k, v in tensors.items()}
    keep = [i for i, n in enumerate(counts) if n <= max_components]
    ids = json.loads(meta["ids"])
    note = report_too_many_parts([ids[i] for i, n in enumerate(counts) if n > max_components], len(keep), path, "cached assets",
                                 max_components)
    if not keep:
        raise InputError(f"{path}: no assets with at most {max_components} parts{note}")
    kept = {k: [v[i] for i in keep] for k, v in assets.items()}
    kept["latents"] = [z.float() for z in kept["latents"]]  # only the kept assets' latents
    return {"ids": [ids[i] for i in keep], "token_order": meta.get("token_order", "fps"), "encoder": meta.get("encoder"), **kept}
