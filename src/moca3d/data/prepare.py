"""`moca3d prepare`: meshes (or the procedural generator) -> a training dataset on disk.

Layout of ROOT (the contract read by the VAE and DiT training):
  manifest.jsonl                one line per finished asset: id, split, kind, category, num_components, names
  report.jsonl                  one line per skipped asset: source, reason
  assets/<id>/mesh.glb          normalised components, one named node each
  assets/<id>/samples.npz       surface (N, P, 6), query_points (N, Q, 3), query_sdf (N, Q) positive inside
  assets/<id>/render.png, mask.png, camera.json, normalization.json, meta.json (its manifest line)

Each asset is built in a hidden temporary folder and renamed into place, so a folder under
assets/ is always complete; a restart skips finished and reported assets (a finished one by its
source: the same path, or the same content moved; another file of the same name gets its own id),
and the manifest is rebuilt from the meta.json files, so an interruption at any moment loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import trimesh

from moca3d.data.partnet import HIERARCHIES, MAX_LEVEL, is_partnet, load_partnet
from moca3d.data.partnet import category as partnet_category
from moca3d.data.procedural import check_scene_objects
from moca3d.defaults import EXPORT_HINT, OTHER_3D_FORMATS
from moca3d.errors import ConfigError, InputError, InputWarning, one_line, warn_input
from moca3d.geometry.inside import QueryConfig, sample_queries
from moca3d.geometry.mesh_io import (
    MESH_EXTENSIONS,
    TooManyComponentsError,
    bounds_of,
    check_up_axis,
    load_asset,
    main_color,
    normalize_meshes,
    open_components,
    palette,
    part_files,
    save_glb,
    stand_up,
    unread_models,
    validate_components,
)
from moca3d.geometry.render import RenderConfig, floor_plane, object_camera, render, save_render, scene_camera
from moca3d.geometry.sampling import SurfaceSamplingConfig, sample_surface
from moca3d.progress import Show, progress_bar

MANIFEST, REPORT, ASSETS, META, SETTINGS = "manifest.jsonl", "report.jsonl", "assets", "meta.json", "prepare.json"
# the settings every asset of a dataset shares (`PrepareConfig.shared`); the others may change between runs into one
# folder: the procedural stream and its scene sizes (seed, --start, --scene-objects) and --max-components
PER_RUN_SETTINGS = ("seed", "scene_objects", "max_components", "up_axis", "splits")
TMP_PREFIX = ".tmp-"
MIN_IMAGE_SIZE = 16  # smallest render side (pixels) that still shows every component
MAX_IMAGE_SIZE = 4096  # largest render side: the supersampled ray grid of a bigger one does not fit in memory
# a closed component none of whose query points falls inside, and whose largest side is under this share of the asset's,
# is a speck too small for the query sampling: left out (named), as a part without surface is; a bigger one is refused
SPECK_FRACTION = 0.01
FLAT_FRACTION = 1e-9  # a closed component's volume over its largest side cubed, at or below which it is flat
DUPLICATE_QUANTUM = 1e-6  # canonical-frame grid on which two components' vertices must agree to be duplicates
DIGEST_CHUNK = 1 << 20  # bytes read at a time when fingerprinting a source


@dataclass
class PrepareConfig:
    """Everything that decides the content of a prepared asset."""

    surface: SurfaceSamplingConfig = field(default_factory=SurfaceSamplingConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    max_components: int = 32
    scene_objects: tuple[int, int] = (2, 16)  # procedural scenes: min and max objects per scene
    connected: bool = False  # split file assets into connected components
    partnet_level: int = 1  # PartNet folders: the parts are the hierarchy's nodes this deep (moca3d.data.partnet)
    partnet_hierarchy: str = "original"  # PartNet folders: result.json ("original") or result_after_merging.json ("merged")
    kind: str = "object"  # for file assets: "object" (random view) or "scene" (isometric, floor)
    up_axis: str = "y"  # for file assets: their up axis (UP_ROTATIONS), turned to moca3d's Y up
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 0
    split_list: bool = False  # the splits come from a list (`splits`, `read_split_list`), not from the fractions
    splits: dict | None = None  # asset id / source name / source stem -> "train" | "val" | "test" (this run's list)

    def __post_init__(self) -> None:
        """One-line ConfigError (named as the `prepare` option) for a setting out of range, before any asset is built."""
        counts = {"--num-surface": self.surface.num_points, "--num-queries": self.queries.num_queries,
                  "--max-components": self.max_components, "render supersample": self.render.supersample}
        for name, value in counts.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.render.size < MIN_IMAGE_SIZE:
            raise ConfigError(f"--image-size must be at least {MIN_IMAGE_SIZE} pixels, got {self.render.size}")
        if self.render.size > MAX_IMAGE_SIZE:  # else every asset fails for memory, and is listed as skipped
            raise ConfigError(f"--image-size must be at most {MAX_IMAGE_SIZE} pixels, got {self.render.size}")
        fractions = {"--sharp-fraction": self.surface.sharp_fraction, "--val-fraction": self.val_fraction,
                     "--test-fraction": self.test_fraction}
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {value}")
        if self.val_fraction + self.test_fraction > 1.0:
            raise ConfigError(f"--val-fraction + --test-fraction must be at most 1, got {self.val_fraction} + {self.test_fraction}")
        if self.kind not in ("object", "scene"):
            raise ConfigError(f"--kind must be 'object' or 'scene', got '{self.kind}'")
        check_up_axis(self.up_axis)
        check_scene_objects(*self.scene_objects)
        if not 0 <= self.partnet_level <= MAX_LEVEL:
            raise ConfigError(f"--partnet-level must be between 0 and {MAX_LEVEL}, got {self.partnet_level}")
        if self.partnet_hierarchy not in HIERARCHIES:
            raise ConfigError(f"--partnet-hierarchy must be one of {', '.join(HIERARCHIES)}, got '{self.partnet_hierarchy}'")

    def shared(self) -> dict:
        """The settings every asset of one dataset folder must share (samples, queries, renders, splits), flat."""
        flat = {}
        for key, value in asdict(self).items():
            if key in PER_RUN_SETTINGS:
                continue
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return json.loads(json.dumps(flat, default=str))  # JSON-ready (tuples as lists), as read back

    def digest(self) -> str:
        """A short fingerprint of the settings, stored with each skipped asset in report.jsonl (the split list is not
        one: an asset's split does not change how it is built; and skip records of earlier versions keep matching)."""
        text = json.dumps({k: v for k, v in asdict(self).items() if k not in ("splits", "split_list")}, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass
class Job:
    """One asset to prepare: a mesh file/folder, or a procedural (kind, seed, index)."""

    id: str
    source: str  # a path, or "procedural:<kind>:<seed>:<index>"
    category: str = "mesh"  # of a file asset (PartNet's and procedural ones carry their own)
    digest: str | None = None  # `source_digest`, when `resume_jobs` computed it (not read again)


@dataclass
class PrepareSummary:
    """What a run did."""

    processed: int = 0
    skipped: int = 0
    already_done: int = 0
    total: int = 0
    reasons: list[str] = field(default_factory=list)
    open_assets: int = 0  # prepared with a component that is not watertight (see build_asset)
    dropped_assets: int = 0  # prepared without a component that had no surface (`load_asset`)
    small_assets: int = 0  # prepared without a component too small for the query sampling (`SPECK_FRACTION`)
    renamed: int = 0  # given a `_k` id: their id was taken by an asset of another source (`resume_jobs`)
    duplicates: int = 0  # not prepared: the same content as an asset (or an earlier job), which could land in another split
    split_list: dict | None = None  # with a split list: `apply_split_list`'s unlisted assets and unmatched names


# ----------------------------------------------------------------------------- jobs


def _safe_id(name: str) -> str:
    """A folder-safe asset id (letters of any script, digits, '_', '.', '-')."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "asset"


def folder_jobs(folder: str | Path, category: str = "mesh") -> list[Job]:
    """One job per mesh file and per sub-folder (one file per component) of `folder`, of `category` (a label the
    evaluation groups its scores by); a mesh file given itself is one job."""
    if not category.strip() or any(not c.isprintable() for c in category):
        raise ConfigError(f"--category must be a printable, non-empty label, got {category!r}")
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such file or folder")
    if folder.is_file() and folder.suffix.lower() in MESH_EXTENSIONS:  # one asset
        base = _safe_id(folder.stem)
        return [Job(base if category == "mesh" else _safe_id(f"{category}_{base}"), str(folder), category)]
    if not folder.is_dir():
        hint = f" ({folder.suffix} is not read: {EXPORT_HINT.replace('them', 'it')})" if folder.suffix.lower() in OTHER_3D_FORMATS else ""
        raise InputError(f"{folder}: neither a mesh file ({', '.join(MESH_EXTENSIONS)}) nor a folder of meshes{hint}")
    if is_partnet(folder):  # one PartNet annotation folder given itself, not its parent (data_v0)
        return [Job(_safe_id(folder.name), str(folder), category)]
    jobs, seen, by_stem = [], set(), {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() not in MESH_EXTENSIONS:
            continue
        by_stem.setdefault(entry.stem if entry.is_file() else entry.name, []).append(len(jobs))
        base = _safe_id(entry.stem if entry.is_file() else entry.name)
        base = base if category == "mesh" else _safe_id(f"{category}_{base}")  # chairs/a.glb and tables/a.glb: two assets
        asset_id = base if base not in seen else _safe_id(entry.name)
        k = 1
        while asset_id in seen:  # every source gets its own asset, whatever its name
            k += 1
            asset_id = f"{base}_{k}"
        seen.add(asset_id)
        jobs.append(Job(asset_id, str(entry), category))
    unread = unread_models(folder, keep_own=True)  # models left out without a word looked prepared
    if not jobs:
        found = f"; it holds {len(unread)} 3D file(s) in formats prepare does not read (first: {unread[0]}): {EXPORT_HINT}" if unread else ""
        raise InputError(f"{folder}: no mesh files ({', '.join(MESH_EXTENSIONS)}) and no asset sub-folders in it{found}")
    if unread:
        warn_input(f"{folder}: {len(unread)} 3D file(s) in formats prepare does not read are left out (first: {unread[0]}): "
                   f"{EXPORT_HINT}")
    for stem, indices in by_stem.items():  # thing.glb and thing.obj: one asset in two formats, trained on (or held out) twice?
        if len(indices) > 1:
            named = ", ".join(f"{Path(jobs[i].source).name} (id '{jobs[i].id}')" for i in indices)
            warn_input(f"{folder}: {named} share the name '{stem}' and become {len(indices)} assets; if they are one "
                       "asset in several formats, keep one file")
    return jobs


def source_digest(source: str | Path) -> str:
    """A fingerprint (sha1) of a source's content: a file's bytes, or a folder's files (their relative paths and bytes,
    hidden ones left out), whatever its path; resume tells a moved source from another file of the same name by it."""
    source, digest = Path(source), hashlib.sha1()
    if source.is_dir():
        files = []
        for parent, dirs, names in os.walk(source):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [Path(parent) / name for name in names if not name.startswith(".")]
        files = sorted(files, key=lambda f: f.relative_to(source).as_posix())
    else:
        files = [source]
    for path in files:
        if source.is_dir():
            digest.update(path.relative_to(source).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(DIGEST_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def procedural_jobs(kind: str, count: int, seed: int = 0, start: int = 0) -> list[Job]:
    """Jobs for procedural assets start..start+count-1 of the stream `seed`."""
    if kind not in ("objects", "scenes"):
        raise ConfigError(f"--procedural must be 'objects' or 'scenes', got '{kind}'")
    if count < 1:
        raise ConfigError("--count must be at least 1")
    prefix = "object" if kind == "objects" else "scene"
    return [Job(f"{prefix}_s{seed}_{i:06d}", f"procedural:{kind}:{seed}:{i}") for i in range(start, start + count)]


SPLITS = ("train", "val", "test")


def read_split_list(path: str | Path) -> dict[str, str]:
    """A split list: a JSON object of name lists ({"train": [...], "val": [...], "test": [...]}, as benchmarks publish
    them) or text lines `NAME SPLIT`, the split last (`NAME,SPLIT`, tab-separated or CSV too; NAME may hold spaces or
    be quoted; `#` comments, a UTF-8 BOM and a header naming a `split` column, e.g. id,category,split, allowed; the
    name is then its first other column). A name is an asset id, or its source file's (folder's) name or stem.
    InputError naming the problem: unreadable, an unknown split, a name given two splits."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # (a spreadsheet's CSV starts with a BOM)
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: unreadable split list ({getattr(err, 'strerror', None) or err})") from None
    pairs = []
    if text.lstrip().startswith("{"):
        try:
            lists = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        for split, names in lists.items():
            if not isinstance(names, list):
                raise InputError(f"{path}: '{split}' must list names, got {type(names).__name__}")
            pairs += [(str(name), split) for name in names]
    else:
        columns = None  # a CSV header's (name, split) columns: id,category,split
        for number, line in enumerate(text.splitlines(), 1):
            line = re.split(r"(?:^|\s)#", line)[0].strip()  # a comment: `#` first or after a space (chair#2 is a name)
            if not line:
                continue
            sep = "\t" if "\t" in line else "," if "," in line else " "  # (a tab first: a name may hold a comma)
            cells = [c.strip().strip("\"'").strip() for c in line.split(None if sep == " " else sep)]
            lower = [c.lower() for c in cells]
            if not pairs and columns is None and "split" in lower:  # a header, the first line of content
                split_at = lower.index("split")
                columns = (0 if split_at else 1, split_at)  # the name: the first other column
                continue
            if columns is not None and sep != " " and len(cells) > max(columns):
                name, split = cells[columns[0]], cells[columns[1]]
            else:
                name, _, split = line.rpartition(sep)
                name, split = name.strip().strip("\"'").strip(), split.strip().strip("\"'")
            if not name:
                raise InputError(f"{path}: line {number} is not `NAME SPLIT`: {line!r} (or give a JSON object of name lists)")
            pairs.append((name, split))
    splits: dict[str, str] = {}
    for name, split in pairs:
        if split not in SPLITS:
            raise InputError(f"{path}: unknown split '{split}' (of {name}): expected {', '.join(SPLITS)}")
        if splits.setdefault(name, split) != split:
            raise InputError(f"{path}: {name} is listed in two splits, {splits[name]} and {split}")
    if not splits:
        raise InputError(f"{path}: the split list names no asset")
    return splits


def list_names(asset_id: str, source: str) -> tuple[str, str, str]:
    """The names a split list may give an asset by: its id, its source file's (or folder's) name, that name's stem."""
    name = Path(str(source)).name
    return asset_id, name, Path(name).stem


def apply_split_list(root: Path, splits: dict[str, str]) -> dict:
    """Give every finished asset of `root` its split from a split list (meta.json rewritten atomically where it
    changes; an unlisted asset is train); what it did: {"unlisted": asset ids, "unmatched": listed names no asset has}."""
    matched, unlisted, updates = set(), [], {}
    for asset_id in sorted(finished_ids(root)):  # every asset's split first: a conflict writes nothing
        path = root / ASSETS / asset_id / META
        meta = json.loads(path.read_text())
        named = list(dict.fromkeys(key for key in list_names(asset_id, meta.get("source", "")) if key in splits))
        matched.update(named)
        if asset_id in splits:  # its exact id decides (a namesake's stem may be another asset's id: model, model_1)
            named = [asset_id]
        elif len({splits[key] for key in named}) > 1:  # its file name in test, its stem in val
            given = ", ".join(f"{key} {splits[key]}" for key in named)
            raise InputError(f"the split list gives asset {asset_id} two splits by its names ({given}): list it once, "
                             "or by its id")
        if not named:
            unlisted.append(asset_id)
        split = splits[named[0]] if named else "train"
        if meta.get("split") != split:
            updates[path] = {**meta, "split": split}
    for path, meta in updates.items():
        _write_json(path, meta)
    return {"unlisted": unlisted, "unmatched": sorted(set(splits) - matched)}


def split_of(asset_id: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a hash of the id (stable under resumes and re-orderings)."""
    u = int(hashlib.sha1(asset_id.encode()).hexdigest()[:8], 16) / 2**32
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def _asset_seed(asset_id: str, seed: int) -> list[int]:
    """Seed material for the asset's random draws, independent of the worker that runs it."""
    return [seed, int(hashlib.sha1(asset_id.encode()).hexdigest()[:8], 16)]


# ----------------------------------------------------------------------------- one asset


def _load_job(job: Job, config: PrepareConfig) -> tuple[list[trimesh.Trimesh], list[str], np.ndarray, str, str, list[str]]:
    """Components, names, colours (N, 4), kind and category of a job, and the names of a file's components left out for
    having no surface (`load_asset`)."""
    if job.source.startswith("procedural:"):
        from moca3d.data.procedural import generate

        _, kind, seed, index = job.source.split(":")
        extra = {"min_objects": config.scene_objects[0], "max_objects": config.scene_objects[1]} if kind.startswith("scene") else {}
        asset = generate(kind, int(seed), int(index), **extra)
        validate_components(asset.meshes, asset.names, config.max_components, label=job.id)
        return asset.meshes, asset.names, asset.colors, asset.kind, asset.category, []
    dropped = []
    if is_partnet(job.source):  # a PartNet annotation folder: its hierarchy's parts, its category
        meshes, names = load_partnet(job.source, config.partnet_level, config.connected, config.max_components,
                                     config.partnet_hierarchy)
        label = partnet_category(job.source) or job.category
    else:
        meshes, names, dropped = load_asset(job.source, config.connected, config.max_components, drop_degenerate=True)
        label = job.category
    if config.up_axis != "y":  # stood up in moca3d's frame (Y up), before renders and samples
        meshes = stand_up(meshes, config.up_axis)
    fallback = palette(len(meshes))
    colors = np.stack([c if (c := main_color(m)) is not None else fallback[i] for i, m in enumerate(meshes)])
    return meshes, names, colors, config.kind, label, dropped


def _input_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The texts of the InputWarnings among `caught` (recorded while loading an asset: the asset keeps them in its
    meta.json, prepare prints them, from any worker); any other warning is shown as it would have been."""
    texts = []
    for w in caught:
        if issubclass(w.category, InputWarning):
            texts.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return texts


def _samples(meshes: list[trimesh.Trimesh], config: PrepareConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Surface samples (N, P, 6), query points (N, Q, 3) and their signed distances (N, Q) of normalised components."""
    surface, query_points, query_sdf = [], [], []
    for mesh in meshes:
        surface.append(sample_surface(mesh, config.surface, rng))  # (P, 6)
        points, sdf = sample_queries(mesh, config.queries, rng)  # (Q, 3), (Q,)
        query_points.append(points)
        query_sdf.append(sdf)
    return {
        "surface": np.stack(surface),  # (N, P, 6)
        "query_points": np.stack(query_points),  # (N, Q, 3)
        "query_sdf": np.stack(query_sdf),  # (N, Q)
    }


def _specks(label: str, meshes: list[trimesh.Trimesh], names: list[str], query_sdf: np.ndarray) -> list[int]:
    """Indices of the normalised components none of whose queries falls inside that are closed specks (under
    SPECK_FRACTION of the asset's size): too small for the query sampling, to be left out. Any other such component
    is an InputError: open or flat (it encloses no volume), or closed but too thin."""
    asset_size = float(np.ptp(bounds_of(meshes), axis=0).max())
    specks = []
    for i, (mesh, name, sdf) in enumerate(zip(meshes, names, query_sdf)):
        if (sdf > 0).any():
            continue
        size = float(np.ptp(mesh.bounds, axis=0).max())
        if not (mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > FLAT_FRACTION * size**3):
            raise InputError(f"{label}: component '{name}' encloses no volume (open or flat: none of its {len(sdf)} "
                             "query points is inside); close it or leave it out")
        if size >= SPECK_FRACTION * asset_size:
            raise InputError(f"{label}: component '{name}' is closed but too thin for the query sampling (none of its "
                             f"{len(sdf)} query points is inside); thicken it or leave it out")
        specks.append(i)
    return specks


def duplicate_components(meshes: list[trimesh.Trimesh], names: list[str]) -> list[list[str]]:
    """[first, copy] name pairs of components with the same surface in the same place (the same triangles, in any order,
    on a DUPLICATE_QUANTUM grid of the canonical frame): a stray copy, or one part exported twice."""
    first: dict[bytes, str] = {}
    pairs = []
    for mesh, name in zip(meshes, names):
        grid = np.round(np.asarray(mesh.vertices, dtype=np.float64) / DUPLICATE_QUANTUM).astype(np.int64)  # (V, 3)
        points, index = np.unique(grid, axis=0, return_inverse=True)  # sorted: one id per position, in any file's order
        faces = np.unique(np.sort(index.reshape(-1)[np.asarray(mesh.faces)], axis=1), axis=0)  # (F, 3), any order
        key = hashlib.sha1(points.tobytes() + b"|" + faces.astype(np.int64).tobytes()).digest()
        if key in first:
            pairs.append([first[key], name])
        else:
            first[key] = name
    return pairs


def build_asset(job: Job, out_dir: Path, config: PrepareConfig) -> dict:
    """Write every file of one asset into `out_dir`; returns its manifest record. A closed component too small for the
    query sampling (`_specks`) is left out, and the others normalised and sampled again without it."""
    with warnings.catch_warnings(record=True) as caught:  # a loader's warnings: kept with the asset, printed by prepare
        warnings.simplefilter("always", InputWarning)
        meshes, names, colors, kind, category, dropped = _load_job(job, config)
    notes = _input_warnings(caught)
    small = []
    while True:
        normalized, norm = normalize_meshes(meshes)
        rng = np.random.default_rng(_asset_seed(job.id, config.seed))
        arrays = _samples(normalized, config, rng)
        for key, value in arrays.items():
            if not np.isfinite(value).all():
                raise InputError(f"{job.id}: non-finite values in {key}")
        specks = _specks(job.id, normalized, names, arrays["query_sdf"])
        if not specks:
            break
        if len(specks) == len(meshes):
            raise InputError(f"{job.id}: every component is too small for the query sampling (none has a query point "
                             "inside)")
        small += [names[i] for i in specks]
        kept = [i for i in range(len(meshes)) if i not in specks]
        meshes, names, colors = [meshes[i] for i in kept], [names[i] for i in kept], colors[kept]
    # kept, but said: an open part's inside/outside comes from its generalized winding number, a guess where it is open
    open_names = open_components(meshes, names)
    meshes = normalized  # the kept components in the canonical frame, as sampled
    duplicates = [] if job.source.startswith("procedural:") else duplicate_components(meshes, names)
    notes += [f"{Path(job.source).name}: component '{copy}' duplicates '{orig}' (the same surface in the same place): "
              "a stray copy, or a part exported twice?" for orig, copy in duplicates]

    if kind == "scene":
        camera = scene_camera(meshes, config.render)
        backdrop = [(floor_plane(meshes), config.render.floor_color)]
    else:
        camera, backdrop = object_camera(meshes, rng, config.render), None
    rgb, mask = render(meshes, camera, colors, backdrop, config.render)
    if mask.max() == 0:
        raise InputError(f"{job.id}: the render shows no component")

    save_glb(out_dir / "mesh.glb", meshes, names, colors)
    np.savez(out_dir / "samples.npz", **arrays)
    save_render(out_dir, rgb, mask, camera)
    (out_dir / "normalization.json").write_text(json.dumps(norm.to_dict()))
    record = {
        "id": job.id,
        "split": split_of(job.id, config.val_fraction, config.test_fraction),  # a split list's: set after (`prepare`)
        "kind": kind,
        "category": category,
        "num_components": len(meshes),
        "names": list(names),
        "source": job.source,
        "open_components": open_names,
        "dropped_components": dropped + small,
        "small_components": small,
        "duplicate_components": duplicates,
        "warnings": notes,
        # a file's: how it was stood up, and its content's fingerprint (a rerun tells it from a namesake by it)
        **({"up_axis": config.up_axis, "source_sha1": job.digest or source_digest(job.source)}
           if not job.source.startswith("procedural:") else {}),
    }
    (out_dir / META).write_text(json.dumps(record))
    return record


def run_job(job: Job, root: Path, config: PrepareConfig) -> tuple[str, dict]:
    """Build one asset atomically; ('ok', record) or ('skip', {source, reason}). Never raises on bad input."""
    final = root / ASSETS / job.id
    tmp = root / ASSETS / f"{TMP_PREFIX}{job.id}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        record = build_asset(job, tmp, config)
    except Exception as err:  # report any per-asset failure and carry on with the others
        shutil.rmtree(tmp, ignore_errors=True)
        raise_it = f": --max-components {err.count} prepares it" if isinstance(err, TooManyComponentsError) else ""
        return "skip", {"id": job.id, "source": job.source, "reason": one_line(err) + raise_it}
    if final.exists():  # a previous run finished it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return "ok", record


def _worker_init() -> None:
    """One torch thread per worker process: the processes are the parallelism; Ctrl+C is the parent's (a worker the
    pool starts again later, outside `_workers_ignore_sigint`, ignores it too)."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _run_job_star(args: tuple) -> tuple[str, dict]:
    """Pool adapter for run_job."""
    return run_job(*args)


# ----------------------------------------------------------------------------- dataset


def check_settings(root: Path, config: PrepareConfig, vary: tuple[str, ...] = ()) -> None:
    """Record the dataset's shared settings (prepare.json) on its first run; a later run into the same folder with
    other ones (but those in `vary`) is a ConfigError: its assets would mix sample counts, renders or split fractions."""
    path, shared = root / SETTINGS, config.shared()
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError:
            recorded = None  # cut by a kill: written again below
        if isinstance(recorded, dict):
            defaults = PrepareConfig().shared()  # a setting added after the dataset was made: recorded at its default
            changed = [k for k in sorted(set(recorded) | set(shared))
                       if recorded.get(k, defaults.get(k)) != shared.get(k) and k not in vary]
            if changed:
                diff = ", ".join(f"{k} {recorded.get(k)} -> {shared.get(k)}" for k in changed[:3])
                listed = " and its split list (--splits)" if "split_list" in changed else ""
                raise ConfigError(f"{root} was prepared with other settings ({diff}): its assets would mix them; "
                                  f"prepare into a new folder, or with its settings (prepare.json){listed}")
            return
    _write_json(path, shared, indent=1)


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    """Write `obj` as JSON to `path` atomically (a temporary file beside it, then renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)


def _warn_outdated(kept: list[dict], config: PrepareConfig) -> None:
    """One InputWarning naming the assets a rerun keeps as they were although their source file changed since they
    were prepared, or this run stands its files up otherwise (--up-axis): they were kept silently."""
    changed = [a["id"] for a in kept if _changed(a)]
    turned = [a["id"] for a in kept if a.get("up_axis") not in (None, config.up_axis)]
    for ids, why in ((changed, "their source changed since"), (turned, f"prepared with another --up-axis than {config.up_axis}")):
        if ids:
            warn_input(f"{len(ids)} asset(s) kept as prepared before, though {why}: {', '.join(ids[:5])}"
                       f"{', ...' if len(ids) > 5 else ''}; delete their folders under assets/ and run again to prepare them anew")


def _record_setting(root: Path, key: str, value) -> None:
    """Set one shared setting in root's prepare.json."""
    recorded = json.loads((root / SETTINGS).read_text())
    if recorded.get(key) != value:
        _write_json(root / SETTINGS, {**recorded, key: value}, indent=1)


def finished_ids(root: Path) -> set[str]:
    """Ids of complete assets (folders renamed into place, holding meta.json)."""
    assets = root / ASSETS
    if not assets.is_dir():
        return set()
    return {d.name for d in assets.iterdir() if not d.name.startswith(".") and (d / META).is_file()}


def _finished_sources(root: Path) -> list[dict]:
    """Each finished asset's id, source, category, source fingerprint (`source_digest`; None before it was recorded),
    up axis and when it was prepared (its meta.json's mtime), from its meta.json (None where unreadable)."""
    out = []
    keys = ("source", "category", "source_sha1", "up_axis")
    for asset_id in finished_ids(root):
        path = root / ASSETS / asset_id / META
        try:
            meta = json.loads(path.read_text())
            row = {key: meta.get(key) for key in keys} | {"prepared": path.stat().st_mtime}
        except (OSError, ValueError, AttributeError):
            row = dict.fromkeys((*keys, "prepared"))
        out.append({"id": asset_id, **row})
    return out


def _modified(source: str) -> float:
    """When a source last changed: a file's mtime, a folder asset's newest part file's (0 when it cannot be read)."""
    try:
        path = Path(source)
        if path.is_dir():
            return max((p.stat().st_mtime for p in part_files(path)), default=0.0)
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _changed(asset: dict) -> bool:
    """Whether a kept asset's source changed since it was prepared: touched later (`_modified`) and, where its content's
    fingerprint was recorded, other content (a copy of the same bytes, a checkout, is no change)."""
    if not asset["prepared"] or _modified(asset["source"]) <= asset["prepared"]:
        return False
    if not asset.get("source_sha1"):
        return True
    try:
        return source_digest(asset["source"]) != asset["source_sha1"]
    except OSError:
        return False


def _same_content(source: str, asset: dict, digest: Callable[[str], str | None]) -> bool:
    """Whether `asset` (`_finished_sources`: a namesake of `source` at another path) holds `source` moved or copied:
    the same content (`digest`: a cached `source_digest`). An asset without a recorded fingerprint (an earlier
    version's) is compared with its source file where that still exists, and taken for `source` where it does not (a
    moved folder), as one whose meta.json names no source."""
    recorded = asset["source"]
    if not recorded:
        return True
    if asset["source_sha1"]:
        return digest(source) == asset["source_sha1"]
    if not Path(recorded).exists():
        return True
    return digest(recorded) is not None and digest(recorded) == digest(source)


def resume_jobs(jobs: list[Job], root: Path, notes: dict[str, str] | None = None,
                duplicates: dict[str, str] | None = None, progress: Show = False, kept: list[dict] | None = None) -> list[Job]:
    """The jobs still to prepare into `root`: a job is done when an asset holds its source, whatever the id it then got:
    one prepared from the same path, or a namesake (by file name) with the same content (`_same_content`: moved); and of
    the same category, for a job given one (chairs/a.glb is not tables/a.glb). A new source whose id an asset of another
    source holds (a.obj added beside a.ply, another folder's chair.glb) gets the next free `_k` id, said in `notes` (by
    source). A source with the content of an asset or of an earlier job (the same file under another --category, a copy
    under another name, chairs/a.glb and tables/a.glb alike) is left out, said in `duplicates` (by source): two copies
    could land in train and test. Each new file source is read once for that (its digest travels with its job), under a
    bar (`progress`) when there are many. `kept` collects the assets a job found done by its path (to check them)."""
    finished = _finished_sources(root)
    namesakes: dict[str, list[dict]] = {}  # source file name -> the assets prepared from a file of that name
    at_path: dict[str, list[dict]] = {}  # a recorded source's real path -> the assets prepared from it
    for asset in finished:
        namesakes.setdefault(Path(str(asset["source"])).name if asset["source"] else asset["id"], []).append(asset)
        if asset["source"]:
            at_path.setdefault(os.path.realpath(asset["source"]), []).append(asset)
    holders = {asset["id"]: asset for asset in finished}
    by_content = {asset["source_sha1"]: asset for asset in finished if asset["source_sha1"]}
    taken = set(holders) | {j.id for j in jobs}
    digests: dict[str, str | None] = {}

    def digest(path: str) -> str | None:
        if path not in digests:  # each file read once
            try:
                digests[path] = source_digest(path)
            except OSError:
                digests[path] = None
        return digests[path]

    todo = []
    many = progress if len(jobs) >= 100 else False  # a large folder is read once before its first asset is prepared
    for job in progress_bar(jobs, show=many, desc="checking sources", unit="source", leave=False):
        def fits(asset: dict) -> bool:
            return job.category == "mesh" or str(asset["category"]) == job.category

        same_path = [a for a in at_path.get(os.path.realpath(job.source), []) if fits(a)]
        if same_path or any(fits(a) and _same_content(job.source, a, digest) for a in namesakes.get(Path(job.source).name, [])):
            if kept is not None:
                kept += same_path
            continue
        content = None if job.source.startswith("procedural:") else digest(job.source)
        twin = by_content.get(content) if content else None
        if twin is not None:
            if duplicates is not None:
                same = twin["source"] and os.path.realpath(twin["source"]) == os.path.realpath(job.source)
                what = (f"already prepared as asset '{twin['id']}' (category '{twin['category']}')" if same else
                        f"the same content as {twin['source']} (prepared in this run as '{twin['id']}')" if twin.get("now") else
                        f"the same content as asset '{twin['id']}' (from {twin['source']})")
                duplicates[job.source] = f"left out {job.source}: {what}; one asset per file keeps a copy out of another split"
            continue
        if job.id in holders:  # the id of an asset made from another source
            k = 1
            while f"{job.id}_{k}" in taken:
                k += 1
            if notes is not None:
                notes[job.source] = (f"{job.source} gets the id '{job.id}_{k}': asset '{job.id}' holds another "
                                     f"source ({holders[job.id]['source']})")
            job = Job(f"{job.id}_{k}", job.source, job.category)
            taken.add(job.id)
        if content:
            by_content[content] = {"id": job.id, "source": job.source, "category": job.category, "now": True}
        todo.append(Job(job.id, job.source, job.category, content))
    return todo


def reported_sources(root: Path, settings: str | None = None) -> set[str]:
    """Sources already skipped with a reason in report.jsonl (with `settings`, only those skipped under these
    settings, `PrepareConfig.digest`: an asset refused for, say, --max-components is retried once that changes)."""
    path = root / REPORT
    if not path.is_file():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            if settings is None or entry.get("settings", settings) == settings:  # lines of older versions: no settings
                out.add(entry["source"])
        except (json.JSONDecodeError, KeyError, AttributeError):
            continue  # a line cut by an interruption
    return out


def write_manifest(root: Path) -> int:
    """Rebuild manifest.jsonl (sorted by id) from the meta.json files, atomically; returns its length."""
    records = []
    for asset_id in sorted(finished_ids(root)):
        record = json.loads((root / ASSETS / asset_id / META).read_text())
        records.append({k: record[k] for k in ("id", "split", "kind", "category", "num_components", "names")})
    tmp = root / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, root / MANIFEST)
    return len(records)


def _clean_stale(root: Path) -> None:
    """Remove temporary folders left by an interrupted run."""
    for d in (root / ASSETS).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)


def prepare(
    jobs: list[Job],
    root: str | Path,
    config: PrepareConfig | None = None,
    workers: int = 1,
    retry_failed: bool = False,
    progress: Show = True,
    vary: tuple[str, ...] = (),
) -> PrepareSummary:
    """Prepare every job not finished (or reported) yet into `root`, over `workers` processes; `vary`: shared settings
    (`PrepareConfig.shared` names) this run may set otherwise than the dataset's first (`check_settings`)."""
    config = config or PrepareConfig()
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output {root} is a file, not a dataset folder: give a folder path")
    try:
        (root / ASSETS).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the dataset folder {root}: {err.strerror or err}") from None
    _clean_stale(root)
    listed = config.splits is not None
    check_settings(root, config, vary + (("split_list",) if listed else ()))  # a list may re-split any dataset
    if retry_failed and (root / REPORT).exists():
        (root / REPORT).unlink()
    settings = config.digest()
    reported = reported_sources(root, settings)
    renames: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    kept: list[dict] = []
    todo = resume_jobs([j for j in jobs if j.source not in reported], root, renames, duplicates,  # reported: never twins
                       progress=progress, kept=kept)
    _warn_outdated(kept, config)
    renames = {job.source: renames[job.source] for job in todo if job.source in renames}
    summary = PrepareSummary(already_done=len(jobs) - len(todo) - len(duplicates), total=len(jobs), renamed=len(renames),
                             duplicates=len(duplicates))

    bar = progress_bar(show=progress, total=len(todo), desc="prepare", unit="asset", dynamic_ncols=True)
    for note in [*duplicates.values(), *renames.values()]:
        bar.write(note)
    try:
        with open(root / REPORT, "a") as report:
            # (the split list is applied to every asset at the end, not sent to each worker with every job)
            for status, record in _results(todo, root, replace(config, splits=None), workers):
                if status == "ok":
                    summary.processed += 1
                    for note in record.get("warnings", []):
                        bar.write(f"warning: {note}")
                    small, dropped = record.get("small_components", []), record.get("dropped_components", [])
                    if no_surface := dropped[: len(dropped) - len(small)]:  # (the small ones are listed last)
                        summary.dropped_assets += 1
                        bar.write(f"left out of {record['source']} (no surface: no faces, or collapsed to a point or "
                                  f"line): {', '.join(no_surface)}")
                    if small:
                        summary.small_assets += 1
                        bar.write(f"left out of {record['source']} (closed, but under {SPECK_FRACTION:.0%} of the asset's "
                                  f"size: too small for the query sampling, none of its query points inside): "
                                  f"{', '.join(small)}")
                    if record["open_components"]:
                        summary.open_assets += 1
                        bar.write(f"open (not watertight) in {record['source']}: {', '.join(record['open_components'])}; "
                                  "inside/outside there follows the winding number")
                else:
                    summary.skipped += 1
                    summary.reasons.append(f"{record['source']}: {record['reason']}")
                    report.write(json.dumps({"source": record["source"], "reason": record["reason"], "settings": settings}) + "\n")
                    report.flush()
                    bar.write(f"skipped {record['source']}: {record['reason']}")
                bar.update(1)
    finally:
        bar.close()
        try:
            if listed:  # every asset, prepared now or before, gets its listed split
                summary.split_list = apply_split_list(root, config.splits)
                _record_setting(root, "split_list", True)  # from now on: a run without a list would add hashed splits
        finally:  # (a list giving an asset two splits is refused: the manifest still lists what was prepared)
            write_manifest(root)
    return summary


def _results(todo: list[Job], root: Path, config: PrepareConfig, workers: int):
    """Yield run_job results, in-process for one worker, else from a process pool as they finish."""
    if workers <= 1:
        for job in todo:
            yield run_job(job, root, config)
        return
    import multiprocessing as mp

    with _workers_ignore_sigint():  # Ctrl+C reaches the whole process group: the parent alone answers it
        pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init)
    with pool:
        yield from pool.imap_unordered(_run_job_star, [(job, root, config) for job in todo], chunksize=1)


@contextmanager
def _workers_ignore_sigint():
    """SIGINT ignored while worker processes start, so they inherit that (an ignored signal stays ignored across
    exec): a Ctrl+C then ends the parent, which terminates them, instead of a traceback from every worker."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
