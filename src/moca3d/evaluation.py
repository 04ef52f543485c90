"""Evaluate a generation pipeline on a prepared split: generate from each render, compare to the GT parts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moca3d.data.dataset import read_manifest
from moca3d.defaults import GUIDANCE, SCENE_GUIDANCE, STEPS
from moca3d.errors import ConfigError, InputError, warn_input
from moca3d.geometry.mesh_io import load_components
from moca3d.metrics import GT_FRAME_OVERLAP, MetricsConfig, evaluate_scene, frame_overlap, object_metrics, protocol  # object_metrics: re-exported
from moca3d.progress import Show, progress_bar


def select_records(root, split: str, count: Optional[int], low: int, high: int, kind: Optional[str] = None) -> list[dict]:
    """The first `count` (>= 1) manifest records of `split` with low..high components (and of `kind`, if given)."""
    what = "scenes" if kind == "scene" else "assets"
    if count is not None and count < 1:
        raise ConfigError(f"--count must be >= 1 (the number of {what} to evaluate), got {count}")
    records = [r for r in read_manifest(root, split) if low <= r["num_components"] <= high and kind in (None, r.get("kind"))]
    if not records:
        raise InputError(f"{root}: no {what} in the '{split}' split with {low}-{high} components")
    return records[:count] if count is not None else records


def check_model_fits(pipe, records: list[dict], root, flag: str) -> None:
    """ConfigError, before any generation, when a selected record has more components than the pipeline's transformer
    has IDs (it failed at that record, the finished ones lost); `flag` is the option that lowers the range."""
    if pipe is None:
        return
    limit = pipe.transformer.max_components
    over = [r for r in records if r["num_components"] > limit]
    if over:
        most = max(over, key=lambda r: r["num_components"])
        raise ConfigError(f"{root}: {len(over)} of the {len(records)} selected records have more components than the model's "
                          f"limit of {limit} (the most: {most['id']}, {most['num_components']}): lower {flag} to {limit}")


def with_progress(items: list, desc: str, show: Show, unit: str = "it"):
    """`items`, wrapped in a bar or progress lines (`show`: moca3d.progress)."""
    return progress_bar(items, show=show, desc=desc, unit=unit) if show else items


def category_of(name: str) -> str:
    """A component's category from its name: procedural names end in their index ('chair_10' -> 'chair')."""
    stem, _, tail = name.rpartition("_")
    return stem if stem and tail.isdigit() else name


def finite_mean(rows: list[dict], key: str) -> Optional[float]:
    """Mean of `key` over the rows where it is finite, None if none is: an all-empty prediction's chamfer (inf) is
    left out of the mean CD (the rows' `all_empty` count says how many), its F-scores (0) stay in theirs."""
    values = finite_values(rows, key)
    return float(np.mean(values)) if values else None


def finite_values(rows: list[dict], key: str) -> list[float]:
    """The rows' finite values of `key`: what `finite_mean` and `standard_errors` average over."""
    return [r[key] for r in rows if r[key] is not None and np.isfinite(r[key])]


def standard_errors(rows: list[dict], keys: tuple[str, ...]) -> dict[str, Optional[float]]:
    """The standard error of each key's `finite_mean` (sample standard deviation / sqrt(n) over the values it averages;
    None under two): how far the mean would move with another draw of as many assets, for reading a difference."""
    out = {}
    for key in keys:
        values = finite_values(rows, key)
        out[key] = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return out


def means(rows: list[dict], keys: tuple[str, ...]) -> dict[str, Optional[float]]:
    """`finite_mean` of each key, and `all_empty`: the rows whose chamfer is infinite (nothing predicted at all)."""
    out = {k: finite_mean(rows, k) for k in keys}
    if "chamfer" in keys:
        out["all_empty"] = sum(1 for r in rows if r["chamfer"] is not None and not np.isfinite(r["chamfer"]))
    return out


def by_category(rows: list[dict], keys: tuple[str, ...]) -> dict[str, dict[str, Optional[float]]]:
    """Per category (each row's "category"): the row count and the `means` of the keys, categories in name order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["category"], []).append(row)
    return {cat: {"count": len(g), **means(g, keys)} for cat, g in sorted(groups.items())}


def round_trip(pipe, asset: Path, resolution: int, points: int = 512) -> list:
    """The GT components of a prepared asset encoded by the pipeline's VAE and decoded as a generation would be.

    Scoring these instead of generations gives the ceiling of any transformer on this VAE.
    """
    import torch

    from moca3d.data.dataset import load_samples
    from moca3d.training.train_vae import encode_latents

    surface = torch.from_numpy(load_samples(asset.parent.parent, asset.name)["surface"]).float()  # (N, P, 6)
    latents = encode_latents(pipe.vae, surface.to(pipe.device), points, token_order=pipe.transformer.token_order)  # (N, L, C)
    return pipe.decode_latents(pipe.vae.normalize_latents(latents), resolution)


def prediction_path(folder: Path, asset_id: str) -> Optional[Path]:
    """An asset's prediction in `folder`: <id>.glb, .obj or another mesh format (any case of the suffix), else an <id>/
    folder; None when there is none."""
    from moca3d.geometry.mesh_io import MESH_EXTENSIONS

    for suffix in MESH_EXTENSIONS:  # the usual names first: no listing of the folder
        if (folder / f"{asset_id}{suffix}").is_file():
            return folder / f"{asset_id}{suffix}"
    found = sorted((p for p in folder.iterdir() if p.is_file() and p.stem == asset_id and p.suffix.lower() in MESH_EXTENSIONS),
                   key=lambda p: MESH_EXTENSIONS.index(p.suffix.lower()))  # e.g. <id>.GLB
    if found:
        return found[0]
    return folder / asset_id if (folder / asset_id).is_dir() else None


def read_prediction(path: Path) -> tuple[list, list[str]]:
    """The components of one prediction and their names, in its order (`read_components`: a file, or a folder of part
    files). A part with no surface (a GLB's empty node, an OBJ's `o` object without faces, no faces, zero area,
    non-finite vertices) is kept as an empty mesh where it is: instance i stays instance i, and it scores as empty
    instead of stopping the evaluation; one with non-finite vertices (a broken export, not a generation's empty part)
    is warned of, by name."""
    import trimesh

    from moca3d.geometry.mesh_io import has_surface, read_components

    meshes, names = read_components(path)
    finite = [bool(np.isfinite(np.asarray(mesh.vertices)).all()) for mesh in meshes]
    broken = [name for name, ok in zip(names, finite) if not ok]
    if broken:
        warn_input(f"{Path(path).name}: {len(broken)} component(s) with NaN or infinite vertices scored as empty: "
                   f"{', '.join(broken[:5])}{', ...' if len(broken) > 5 else ''}")
    usable = [ok and has_surface(mesh) for mesh, ok in zip(meshes, finite)]
    return [mesh if ok else trimesh.Trimesh() for mesh, ok in zip(meshes, usable)], names


def read_ground_truth(path: Path) -> tuple[list, list[str]]:
    """The GT components `evaluate` scores a prediction against, read as `read_prediction` reads that (`read_components`:
    the same layouts give the same components), each a valid surface (`validate_components`: InputError naming the
    first that is not, an empty one included)."""
    from moca3d.geometry.mesh_io import read_components, validate_components

    meshes, names = read_components(path)
    validate_components(meshes, names, label=Path(path).name)
    return meshes, names


def load_prediction(folder: Path, asset_id: str, missing: list[str], unusable: Optional[list[dict]] = None
                    ) -> tuple[list, list[str]]:
    """An asset's predicted components and their names from a folder of predictions (`prediction_path`: <id>.glb,
    <id>.obj, or an <id>/ folder of part files, e.g. another method's outputs; `read_prediction`); none (scored as
    empty) and its id added to `missing` when the folder has no prediction of it. A prediction that cannot be read (an
    empty or corrupt file, no triangle mesh) scores as empty too, with a warning naming its path, and {"id", "path",
    "reason"} added to `unusable` (to `missing` when that is not given)."""
    path = prediction_path(Path(folder), asset_id)
    if path is None:
        missing.append(asset_id)
        return [], []
    try:
        return read_prediction(path)
    except (InputError, OSError) as err:
        reason = str(err) if isinstance(err, InputError) else f"cannot read it ({err.strerror or err})"
        warn_input(f"{path}: unusable prediction of {asset_id} ({reason}): scored as all-empty")
        if unusable is None:
            missing.append(asset_id)
        else:
            unusable.append({"id": asset_id, "path": str(path), "reason": reason})
        return [], []


def pair_by_name(meshes: list, names: list[str], gt_names: list[str]) -> tuple[list, bool]:
    """Predicted instances in the ground truth's order when both name the same instances listed otherwise (True then),
    else as given: instance i is scored against GT instance i (`evaluate --scene` and `evaluate-scenes` alike)."""
    if names == list(gt_names) or sorted(names) != sorted(gt_names) or len(set(names)) != len(names):
        return meshes, False
    index = {name: i for i, name in enumerate(names)}
    return [meshes[index[name]] for name in gt_names], True


def evaluate_pipeline(
    pipe, root: str | Path, split: str = "test", count: Optional[int] = None, steps: int = STEPS, guidance: float = GUIDANCE,
    resolution: int = 128, seed: int = 0, min_parts: int = 1, max_parts: int = 32, metric_points: int = 20000,
    progress: Show = True, reconstruct: bool = False, shift: Optional[float] = None, predictions: Optional[Path] = None,
    frame: str = "each", save: Optional[Path] = None,
) -> dict[str, Any]:
    """Mean and per-asset metrics of `pipe` on up to `count` assets of `split` (the GT part count is used).

    With `reconstruct`, each asset's GT parts go through the VAE instead (`round_trip`): the ceiling. With
    `predictions` (a folder, `load_prediction`), those meshes are scored instead and `pipe` is not used; an asset
    without one scores as an all-empty prediction and is listed under "missing", one whose file cannot be read
    likewise, under "unusable" (with the reason). `frame`: `MetricsConfig.frame`. `save`: a folder where each
    generation (or round trip) is written as <asset id>.glb, which `predictions` reads back.
    """
    records = select_records(root, split, count, min_parts, max_parts)
    check_model_fits(None if reconstruct or predictions is not None else pipe, records, root, "--max-parts (max_parts)")
    config = MetricsConfig(num_points=metric_points, seed=seed, frame=frame)
    per_asset, missing, unusable, elsewhere = [], [], [], []
    for rec in with_progress(records, f"evaluate {split}", progress, "asset"):
        asset = Path(root) / "assets" / rec["id"]
        gt, _ = load_components(asset / "mesh.glb")
        t0, settings = time.time(), {}
        if predictions is not None:
            meshes = load_prediction(Path(predictions), rec["id"], missing, unusable)[0]
        elif reconstruct:
            meshes = round_trip(pipe, asset, resolution)
        else:
            out = pipe(asset / "render.png", num_parts=len(gt), steps=steps, guidance=guidance, seed=seed, shift=shift, resolution=resolution, show_progress=False)
            meshes, settings = out.meshes, out.settings
        seconds = time.time() - t0
        if predictions is None:
            save_prediction(save, rec["id"], meshes, "part", settings)
        row = {"id": rec["id"], "category": rec.get("category", "unknown"), "num_parts": len(gt), "seconds": seconds}
        overlap = frame_overlap(meshes, gt) if predictions is not None and frame == "gt" else None
        if overlap is not None and overlap < GT_FRAME_OVERLAP:
            elsewhere.append(rec["id"])
        per_asset.append({**row, **object_metrics(meshes, gt, config)})
    if elsewhere:  # in the GT's frame, placement counts: predictions in another frame score low for nothing
        warn_input(f"--frame gt: {len(elsewhere)} of {len(records)} predictions barely overlap their ground truth's box "
                   f"(IoU under {GT_FRAME_OVERLAP}; first: {elsewhere[0]}): are they in the prepared assets' frame (each "
                   "asset's normalization.json maps source coordinates to it)? --frame each compares them in any frame")
    keys = ("chamfer", "fscore@0.1", "fscore@0.05", "self_iou", "seconds")
    mean = means(per_asset, keys) if per_asset else {}
    result = {"split": split, "count": len(per_asset), "steps": steps, "guidance": guidance, "shift": shift, "reconstruct": reconstruct,
              "resolution": resolution, "seed": seed, "metric_points": metric_points, "frame": frame,
              "protocol": protocol(config), "mean": mean, "standard_error": standard_errors(per_asset, keys[:-1]),
              "by_category": by_category(per_asset, keys[:-1]), "assets": per_asset}
    return with_predictions(result, predictions, missing, "assets", unusable)


def save_prediction(folder: Optional[Path], asset_id: str, meshes: list, kind: str, settings: Optional[dict] = None) -> None:
    """Write one evaluated generation as `folder`/<asset id>.glb (`{kind}_XX` nodes, empty ones kept in place), as
    `load_prediction` reads it back, with how it was made (`settings`: the pipeline output's, as `moca3d info` shows);
    nothing when `folder` is None or every component is empty (scored as missing)."""
    from moca3d.geometry.mesh_io import component_names, save_components

    if folder is not None and any(len(m.faces) for m in meshes):
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_components(Path(folder) / f"{asset_id}.glb", meshes, component_names(kind, len(meshes)),
                        metadata={**(settings or {}), "saved_by": "evaluation", "id": asset_id})  # its empty nodes read back in place


def with_predictions(result: dict[str, Any], predictions: Optional[Path], missing: list[str], what: str,
                     unusable: Optional[list[dict]] = None) -> dict[str, Any]:
    """An evaluation's report; of read predictions, without the sampling settings (not generated here), with the
    folder, the ids that had none and the predictions that could not be read (`load_prediction`; InputError when
    none had a usable one: the folder is not one of their predictions)."""
    if predictions is None:
        return result
    unusable = unusable or []
    if len(missing) == result["count"]:
        raise InputError(f"{predictions}: no prediction for any of the {len(missing)} {what} (expected <id>.glb, <id>.obj or"
                         f" <id>/, e.g. {missing[0]}.glb)")
    if unusable and len(missing) + len(unusable) == result["count"]:
        raise InputError(f"{predictions}: no usable prediction for any of the {result['count']} {what} ({len(unusable)}"
                         f" unreadable, e.g. {unusable[0]['path']}: {unusable[0]['reason']})")
    result = {k: v for k, v in result.items() if k not in ("steps", "guidance", "shift", "reconstruct", "resolution")}
    return {**result, "predictions": str(predictions), "missing": missing, "unusable": unusable}


# -- scenes (issue 7): scene-level and per-instance metrics over a prepared split ---------------------

SCENE_KEYS = ("chamfer", "fscore@0.1", "fscore@0.05", "balanced_chamfer", "balanced_fscore@0.1", "balanced_fscore@0.05",
              "instance_chamfer", "instance_fscore@0.1", "instance_fscore@0.05", "self_iou", "seconds")
INSTANCE_KEYS = ("fscore@0.1", "fscore@0.05", "empty")  # per category: mean F-scores (empty = 0) and the share left empty


def evaluate_scenes(
    pipe, root: str | Path, split: str = "test", count: Optional[int] = None, steps: int = STEPS, guidance: float = SCENE_GUIDANCE,
    resolution: int = 128, seed: int = 0, min_instances: int = 2, max_instances: int = 32, metric_points: int = 20000,
    progress: Show = True, reconstruct: bool = False, shift: Optional[float] = None, predictions: Optional[Path] = None,
    frame: str = "each", save: Optional[Path] = None,
) -> dict[str, Any]:
    """Generate each prepared scene of `split` from render.png + mask.png and compare with its instances (`frame` and
    `save` as in `evaluate_pipeline`: the scene-level metrics' frame, a folder for the generations).

    With `reconstruct`, the GT instances go through the VAE instead (`round_trip`): the ceiling. With `predictions`
    (a folder, `load_prediction`), those meshes are scored instead, instance i against GT instance i in the GT's
    frame; a scene without one scores as empty and is listed under "missing" (one whose file cannot be read, under "unusable").

    A scene with an instance hidden in the render (no pixel in mask.png) cannot be conditioned and
    is skipped (listed under "skipped"). On CUDA the peak memory of each generation is reported.
    """
    import torch

    from moca3d.data.scene import component_masks, tiny_masks_quiet

    records = select_records(root, split, count, min_instances, max_instances, kind="scene")
    check_model_fits(None if reconstruct or predictions is not None else pipe, records, root, "--max-instances (max_instances)")
    config = MetricsConfig(num_points=metric_points, seed=seed, frame=frame)
    cuda = pipe is not None and pipe.device.type == "cuda"
    per_scene, skipped, missing, unusable = [], [], [], []
    for rec in with_progress(records, f"evaluate scenes {split}", progress, "scene"):
        asset = Path(root) / "assets" / rec["id"]
        gt, names = load_components(asset / "mesh.glb")
        masks = component_masks(asset / "mask.png", len(gt))  # (N, H, W)
        hidden = np.flatnonzero(~masks.any(axis=(1, 2)))
        if len(hidden):
            skipped.append({"id": rec["id"], "reason": f"{len(hidden)} instance(s) hidden in the render"})
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats(pipe.device)
        t0, settings = time.time(), {}
        if predictions is not None:
            meshes, pred_names = load_prediction(Path(predictions), rec["id"], missing, unusable)
            if meshes and len(meshes) != len(gt):
                raise InputError(f"{predictions}: the prediction of {rec['id']} has {len(meshes)} instances, its masks {len(gt)}")
            meshes, paired = pair_by_name(meshes, pred_names, names)
        elif reconstruct:
            meshes = round_trip(pipe, asset, resolution)
        else:
            with tiny_masks_quiet():  # a test scene's small visible instances are what they are
                out = pipe.generate_scene(asset / "render.png", masks, steps=steps, guidance=guidance, seed=seed, shift=shift,
                                          resolution=resolution, show_progress=False)
            meshes, settings = out.meshes, out.settings
        row = {"id": rec["id"], "num_instances": len(gt), "seconds": time.time() - t0}
        if predictions is None:
            save_prediction(save, rec["id"], meshes, "instance", settings)
        else:
            row["paired_by_name"] = paired
        if cuda:
            row["peak_memory_mb"] = torch.cuda.max_memory_allocated(pipe.device) / 2**20
        row.update(evaluate_scene(meshes, gt, config))
        shares = masks.sum(axis=(1, 2)) / masks[0].size  # (N,) each instance's share of the image
        for inst, name, share in zip(row["instances"], names, shares):
            inst.update(name=name, category=category_of(name), mask_fraction=float(share))
        per_scene.append(row)
    if not per_scene:
        raise InputError(f"{root}: none of the {len(records)} selected '{split}' scenes could be evaluated "
                         f"(every one has an instance hidden in its render)")
    mean = means(per_scene, SCENE_KEYS)
    result = {
        "split": split, "count": len(per_scene), "min_instances": min_instances, "max_instances": max_instances,
        "steps": steps, "guidance": guidance, "shift": shift, "reconstruct": reconstruct, "resolution": resolution, "seed": seed,
        "metric_points": metric_points, "frame": frame, "protocol": protocol(config, scene=True), "mean": mean,
        "standard_error": standard_errors(per_scene, tuple(k for k in SCENE_KEYS if k != "seconds")),
        "by_category": by_category([i for s in per_scene for i in s["instances"]], INSTANCE_KEYS),
        "scenes": per_scene, "skipped": skipped,
    }
    return with_predictions(result, predictions, missing, "scenes", unusable)
