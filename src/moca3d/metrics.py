"""Evaluation metrics, after PartCrafter / MIDI (DESIGN section 6; where they differ: docs/RESULTS.md, "Metrics").

- Frame (`MetricsConfig.frame`): "each" (the default) centres the bounding box of each side's components and
  scales its largest side to 2, prediction and ground truth on their own: blind to a prediction's position and
  scale, so another method's outputs in any frame compare, but one fragment far from the rest shrinks the rest.
  "gt" applies the ground truth's normalisation to both sides (PartCrafter's: a prediction in the ground truth's
  frame, as moca3d's own are); "none" takes both as given.
- Chamfer distance: mean nearest-neighbour distance (not squared) from prediction to ground
  truth plus the same from ground truth to prediction, on points sampled uniformly by area on the
  fused surface of all components.
- F-score at tau: harmonic mean of precision (share of predicted points within tau of the ground
  truth) and recall (share of ground-truth points within tau of the prediction).
- Self-IoU: mean over component pairs of the IoU of their filled voxel volumes on a 64^3 grid over
  [-1, 1]^3 (pitch 2/64); overlap between generated parts, lower is better. A voxel a part's surface passes
  through is the part's: two parts in contact share that layer (two unit cubes face to face in the grid: 0.016).
  None (left out of means, as
  PartCrafter leaves it out) for a prediction with fewer than two non-empty parts: no pair to overlap.
- Scenes: the scene-level numbers above (points by area: a large instance outweighs a small one), the same with
  each instance weighted alike ("balanced_": num_points / N points on each predicted and each GT instance,
  concatenated, as MIDI samples a fixed count per instance), plus per-instance numbers where prediction i is compared
  with ground-truth instance i, each pair mapped by the normalisation of the ground-truth instance's own box:
  shape and placement at the instance's scale (an instance off by its own size scores low; no ICP or
  separate normalisation as MIDI's object scores have).
- Sampling: points by area, each side its own random stream of the seed (`PRED_STREAM`, `GT_STREAM`): the same
  seed on both sides gave identical samples wherever the two share triangles in the same order, so a copy of the
  ground truth scored CD 0 exactly, but the same parts in another order scored the noise floor; at 20 000 points (evaluate-model's and
  evaluate-scenes' default; `evaluate` and MetricsConfig take 100 000) the chamfer of a surface against itself
  re-triangulated (or itself) is about 0.025, at 100 000 about 0.011 (PartCrafter samples 204 800): compare
  chamfers at one point count.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import trimesh
from scipy import ndimage
from scipy.spatial import cKDTree

from moca3d.errors import ConfigError, InputError, warn_input
from moca3d.geometry.mesh_io import (
    CANONICAL_EXTENT,
    Normalization,
    as_components,
    bounds_of,
    fit_normalization,
    has_surface,
    normalize_meshes,
    transform_meshes,
)
from moca3d.geometry.sampling import sample_points

MIN_IOU_RESOLUTION = 8  # coarser grids cannot tell parts apart
MAX_IOU_RESOLUTION = 256  # self-IoU holds a float32 R^3 grid per component: 64 MiB each at 256
MAX_METRIC_POINTS = 10_000_000  # points per surface: about 3.5 GB of samples and KD-trees; more is killed for memory
FRAME_RATIO = 5.0  # scene sizes differing more than this: prediction and ground truth are in different units
# --frame gt: boxes overlapping less than this (`box_iou`) are warned of: the prediction is likely in another frame
# (a source mesh's coordinates against a prepared asset's normalised mesh.glb overlapped 0.35)
GT_FRAME_OVERLAP = 0.4
# self-IoU's grid covers [-1, 1]^3; components reaching beyond this multiple of it (a generation reaches 1.05, the
# extraction grid's bound) are measured normalised to their own box instead, those within it clipped to the border
SELF_IOU_REACH = 1.25
FRAMES = ("each", "gt", "none")  # `MetricsConfig.frame`: each side normalised alone, both by the GT's, as given


def check_metric_settings(num_points: int, iou_resolution: int, taus: tuple[float, ...] = (),
                          points_name: str = "num_points", resolution_name: str = "iou_resolution",
                          frame: str = "each", frame_name: str = "frame") -> None:
    """ConfigError (one line, naming the setting as `*_name`) for a sample count, voxel grid, threshold or frame out
    of range."""
    if frame not in FRAMES:
        raise ConfigError(f"{frame_name} must be one of {', '.join(FRAMES)}, got {frame!r}")
    if not isinstance(num_points, numbers.Integral) or isinstance(num_points, bool) or num_points < 1:
        raise ConfigError(f"{points_name} must be a whole number >= 1 (points sampled per surface), got {num_points!r}")
    if num_points > MAX_METRIC_POINTS:
        raise ConfigError(f"{points_name} must be at most {MAX_METRIC_POINTS} (points sampled per surface), got {num_points}")
    if not MIN_IOU_RESOLUTION <= iou_resolution <= MAX_IOU_RESOLUTION:
        raise ConfigError(f"{resolution_name} must be between {MIN_IOU_RESOLUTION} and {MAX_IOU_RESOLUTION} "
                          f"voxels per side, got {iou_resolution}")
    if not all(math.isfinite(t) and t > 0 for t in taus):
        raise ConfigError(f"F-score thresholds (taus) must be finite and > 0, got {tuple(taus)}")


@dataclass
class MetricsConfig:
    """Sampling density, thresholds and voxel grid of the evaluation protocol."""

    num_points: int = 100_000  # points sampled on each fused surface
    taus: tuple[float, ...] = (0.1, 0.05)  # F-score thresholds in the normalised frame
    iou_resolution: int = 64  # voxels per side of [-1, 1]^3 for self-IoU (pitch 2/64)
    frame: str = "each"  # each side normalised on its own, "gt": both by the ground truth's, "none": as given
    seed: int = 0
    workers: int = -1  # cKDTree query threads (-1: all cores; the distances are exact either way)

    def __post_init__(self) -> None:
        if isinstance(self.taus, numbers.Real):  # one threshold given as a number
            self.taus = (float(self.taus),)
        check_metric_settings(self.num_points, self.iou_resolution, self.taus, frame=self.frame)


FRAME_WORDS = {
    "each": "each side's components centred on their bounding box, largest side scaled to 2, alone",
    "gt": "both sides by the ground truth's normalisation (its box centred, largest side 2)",
    "none": "as given",
}


def protocol(config: MetricsConfig, scene: bool = False) -> dict:
    """How the numbers beside it were measured, in words and settings: what another table must match to compare."""
    out = {
        "chamfer": "Euclidean (not squared) nearest-neighbour distance, mean prediction->GT plus mean GT->prediction",
        "fscore": "harmonic mean of precision and recall, the shares of points closer than tau (strict) each way",
        "frame": f"{config.frame}: {FRAME_WORDS[config.frame]}",
        "sampling": "uniform by area on the fused surface of the non-empty components, each side its own stream of the seed",
        "num_points": config.num_points, "seed": config.seed, "taus": list(config.taus),
        "self_iou": f"mean over pairs of non-empty components of the IoU of their filled voxels, {config.iou_resolution}^3 "
                    "over [-1, 1]^3 of the frame; None under two components",
    }
    if scene:
        out["balanced"] = "the scene chamfer / F-scores with num_points / N points on each instance (MIDI-like weighting)"
        out["instances"] = ("prediction i vs GT instance i (the masks' order; a prediction naming the same instances in "
                            "another order is paired by name), both in the GT instance's box (largest side 2)")
    return out


def _as_points(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """(n, >=3) array or tensor -> (n, 3) float64 numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, (trimesh.Trimesh, trimesh.Scene)):
        raise InputError("point metrics take (n, 3) point arrays: for meshes, object_metrics or surface_metrics sample their surfaces")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2 and x.shape[0] in (3, 6) and x.shape[1] > 6:  # 3 "points" of n coordinates
        raise InputError(f"expected a non-empty (n, >=3) point array, got shape {x.shape}: channel-first? pass its transpose")
    if x.ndim != 2 or x.shape[1] < 3 or len(x) == 0:
        raise InputError(f"expected a non-empty (n, >=3) point array, got shape {x.shape}")
    return x[:, :3]


def nn_distances(a: np.ndarray, b: np.ndarray, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour distances a->b (len(a),) and b->a (len(b),) via KD-trees."""
    d_ab, _ = cKDTree(b).query(a, k=1, workers=workers)
    d_ba, _ = cKDTree(a).query(b, k=1, workers=workers)
    return d_ab, d_ba


def _fscore_from(d_pred_gt: np.ndarray, d_gt_pred: np.ndarray, tau: float) -> float:
    """F-score from the two directed distance arrays (a point counts when its distance is below `tau`, which must be > 0)."""
    if not (math.isfinite(tau) and tau > 0):
        raise ConfigError(f"an F-score threshold must be finite and > 0, got {tau}")
    precision = float((d_pred_gt < tau).mean())
    recall = float((d_gt_pred < tau).mean())
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def chamfer(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, workers: int = 1) -> float:
    """Chamfer distance between point sets: mean NN distance pred->gt plus gt->pred (not squared)."""
    d_pg, d_gp = nn_distances(_as_points(pred), _as_points(gt), workers)
    return float(d_pg.mean() + d_gp.mean())


def fscore(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, tau: float = 0.1, workers: int = 1) -> float:
    """F-score at threshold `tau` between point sets."""
    d_pg, d_gp = nn_distances(_as_points(pred), _as_points(gt), workers)
    return _fscore_from(d_pg, d_gp, tau)


def point_metrics(
    pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, taus: tuple[float, ...] = (0.1, 0.05), workers: int = 1
) -> dict[str, float]:
    """Chamfer and F-scores at each tau from one pair of KD-tree queries."""
    d_pg, d_gp = nn_distances(_as_points(pred), _as_points(gt), workers)
    out = {"chamfer": float(d_pg.mean() + d_gp.mean())}
    for tau in taus:
        out[f"fscore@{tau:g}"] = _fscore_from(d_pg, d_gp, tau)
    return out


def _prepare(meshes: list[trimesh.Trimesh], normalize: bool) -> list[trimesh.Trimesh]:
    """Check the component list and normalise it when asked."""
    meshes = as_components(meshes)
    if not meshes:
        raise InputError("metrics: a prediction or ground truth has no components")
    for m in meshes:
        if not np.isfinite(np.asarray(m.vertices)).all() or not has_surface(m):
            raise InputError("metrics: a component is empty or has non-finite vertices (object_metrics and evaluate_scene "
                             "score a prediction with empty parts)")
    return normalize_meshes(meshes)[0] if normalize else meshes


def in_frame(pred: list[trimesh.Trimesh], gt: list[trimesh.Trimesh], frame: str) -> tuple[list, list]:
    """Both component lists checked and mapped into the metric frame (`MetricsConfig.frame`)."""
    pred, gt = _prepare(pred, False), _prepare(gt, False)
    if frame == "each":
        return normalize_meshes(pred)[0], normalize_meshes(gt)[0]
    if frame == "gt":
        norm = fit_normalization(gt)
        return transform_meshes(pred, norm), transform_meshes(gt, norm)
    return pred, gt


PRED_STREAM, GT_STREAM = 0, 1  # the sub-seeds of a metric's samples on the prediction's side and on the ground truth's


def surface_metrics(
    pred: list[trimesh.Trimesh], gt: list[trimesh.Trimesh], config: MetricsConfig | None = None
) -> dict[str, float]:
    """Chamfer and F-scores between the fused surfaces of two component lists."""
    config = config or MetricsConfig()
    return _fused_surface_metrics(*in_frame(pred, gt, config.frame), config)


def _fused_surface_metrics(pred: list[trimesh.Trimesh], gt: list[trimesh.Trimesh], config: MetricsConfig) -> dict[str, float]:
    """`surface_metrics` of two lists already in the metric frame."""
    p = sample_points(pred, config.num_points, [config.seed, PRED_STREAM])  # (num_points, 3)
    g = sample_points(gt, config.num_points, [config.seed, GT_STREAM])  # (num_points, 3)
    return point_metrics(p, g, config.taus, config.workers)


def surface_lattice(verts: np.ndarray, faces: np.ndarray, spacing: float, chunk: int = 1 << 22) -> np.ndarray:
    """(P, 3) points on every triangle: a barycentric lattice whose neighbours are at most `spacing` apart.

    A triangle whose longest edge is e gets ceil(e / spacing) steps per edge, (n + 1)(n + 2) / 2 points with its
    corners and edges among them, so neighbouring lattice points (and those of two triangles along their shared
    edge) are never further apart than `spacing`. Triangles of one step count are done at once, `chunk` points at a time.
    """
    tri = verts[faces]  # (F, 3, 3)
    longest = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max(axis=1, initial=0.0)  # (F,)
    steps = np.maximum(np.ceil(longest / spacing), 1).astype(np.int64)  # (F,)
    points = [verts]
    for n in np.unique(steps):
        i, j = np.triu_indices(n + 1)  # i <= j: barycentric (1 - j/n, (j - i)/n, i/n), every point of the lattice once
        weights = np.stack([n - j, j - i, i], axis=1) / n  # (Pn, 3)
        group = tri[steps == n]  # (Fn, 3, 3)
        per = max(1, chunk // len(weights))
        for start in range(0, len(group), per):
            points.append(np.einsum("pk,fkd->fpd", weights, group[start:start + per]).reshape(-1, 3))  # (Fn' * Pn, 3)
    return np.concatenate(points)


def voxelize_filled(mesh: trimesh.Trimesh, resolution: int = 64, extent: float = CANONICAL_EXTENT) -> np.ndarray:
    """Filled occupancy (R, R, R) bool of a mesh on the grid of [-extent/2, extent/2]^3.

    Points on the surface no more than half a voxel apart (`surface_lattice`) mark a shell that is
    26-connected, so it seals the 6-connected background; the enclosed cavities are then filled.
    A surface with holes wider than a voxel keeps only its shell.
    """
    if resolution < 1:
        raise ConfigError(f"voxel resolution must be >= 1, got {resolution}")
    pitch = extent / resolution
    verts, faces = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    points = surface_lattice(verts, faces, pitch / 2.0)  # (P, 3)
    # Points on the far faces of the cube (and any slightly outside it) go to the border voxels.
    ijk = np.floor((points + extent / 2.0) / pitch).astype(np.int64).clip(0, resolution - 1)  # (P, 3)
    grid = np.zeros((resolution,) * 3, dtype=bool)
    grid[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = True
    return ndimage.binary_fill_holes(grid)


def self_iou(
    meshes: list[trimesh.Trimesh], resolution: int = 64, normalize: bool = True
) -> float | None:
    """Mean pairwise IoU of the components' filled voxel volumes on the grid of [-1, 1]^3 (None for a single component:
    no pair; without `normalize`, components reaching far outside the grid (SELF_IOU_REACH) are normalised to their own
    box first, with a warning; those just outside are clipped to its border)."""
    meshes = _prepare(meshes, normalize)
    if len(meshes) < 2:
        return None
    reach = max(float(np.abs(m.vertices).max()) for m in meshes)
    if reach > (CANONICAL_EXTENT / 2) * SELF_IOU_REACH:  # far out: the grid would clip them (and a surface far bigger
        # than the grid would need a lattice of millions of points): their own frame instead
        warn_input("self-IoU: components reach outside the voxel grid of [-1, 1]^3: measured with them normalised to "
                   "their own box instead")
        meshes = normalize_meshes(meshes)[0]
    occ = np.stack([voxelize_filled(m, resolution).ravel() for m in meshes]).astype(np.float32)  # (N, R^3)
    occ_t = torch.from_numpy(occ)
    inter = occ_t @ occ_t.T  # (N, N) shared voxels
    sizes = occ_t.sum(dim=1)  # (N,)
    union = sizes[:, None] + sizes[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    i, j = torch.triu_indices(len(meshes), len(meshes), offset=1)
    return float(iou[i, j].mean())


def evaluate_object(
    pred: list[trimesh.Trimesh], gt: list[trimesh.Trimesh], config: MetricsConfig | None = None
) -> dict[str, float]:
    """Object-level metrics: chamfer, fscore@tau on the fused surfaces, self_iou of the prediction."""
    config = config or MetricsConfig()
    pred, gt = in_frame(pred, gt, config.frame)
    out = _fused_surface_metrics(pred, gt, config)
    out["self_iou"] = self_iou(pred, config.iou_resolution, normalize=False)  # on the grid of the metric frame
    out["num_pred"], out["num_gt"] = len(pred), len(gt)
    return out


def instance_metrics(
    pred: list[trimesh.Trimesh], gt: list[trimesh.Trimesh], config: MetricsConfig | None = None
) -> list[dict[str, float]]:
    """Per-instance chamfer/F-scores, prediction i vs ground truth i, in the GT instance's own frame."""
    config = config or MetricsConfig()
    if len(pred) != len(gt):
        raise InputError(f"instance metrics need matching counts: {len(pred)} predicted vs {len(gt)} ground-truth components")
    pred, gt = _prepare(pred, False), _prepare(gt, False)
    results = []
    for k, (p, g) in enumerate(zip(pred, gt)):
        norm: Normalization = fit_normalization([g])
        (p_n,), (g_n,) = transform_meshes([p], norm), transform_meshes([g], norm)
        results.append(point_metrics(
            sample_points([p_n], config.num_points, [config.seed, k, PRED_STREAM]),
            sample_points([g_n], config.num_points, [config.seed, k, GT_STREAM]),
            config.taus, config.workers,
        ))
    return results


def balanced_scene_metrics(pred: list[trimesh.Trimesh], gt: list[trimesh.Trimesh], kept: list[int],
                           config: MetricsConfig) -> dict[str, float]:
    """Scene chamfer / F-scores with each instance weighted alike: num_points / N points sampled on each predicted
    instance (`pred`, those of the GT instances `kept`) and on each of the N GT instances, concatenated, in the scene
    frame (`config.frame`). An empty instance adds no points (its GT points find only the others); none: F 0, chamfer inf."""
    if not pred:
        return {"chamfer": float("inf"), **{f"fscore@{t:g}": 0.0 for t in config.taus}}
    pred, gt = in_frame(pred, gt, config.frame)
    per = max(1, -(-config.num_points // len(gt)))  # ceil: at least num_points on the GT side
    p = np.concatenate([sample_points([m], per, [config.seed, k, PRED_STREAM]) for k, m in zip(kept, pred)])  # (len(pred) * per, 3)
    g = np.concatenate([sample_points([m], per, [config.seed, k, GT_STREAM]) for k, m in enumerate(gt)])  # (N * per, 3)
    return point_metrics(p, g, config.taus, config.workers)


def check_same_frame(pred: list[trimesh.Trimesh], gt: list[trimesh.Trimesh], max_ratio: float = FRAME_RATIO) -> None:
    """Refuse (InputError) a prediction and ground truth whose scenes differ in size by over `max_ratio`.

    Per-instance metrics compare each component where it is placed, so the two files must share one
    frame and unit; the fused-surface metrics in their default frame ("each") need no such check.
    """
    sizes = [float(np.linalg.norm(np.subtract(*bounds_of(meshes)[::-1]))) for meshes in (pred, gt)]  # box diagonals
    ratio = max(sizes) / max(min(sizes), 1e-12)
    if ratio > max_ratio:
        tiny = " (or most of the prediction came out empty: score it without --scene)" if sizes[0] < sizes[1] else ""
        raise InputError(f"per-instance metrics: the prediction's scene is {sizes[0]:.3g} across and the ground truth's "
                         f"{sizes[1]:.3g} ({ratio:.0f}x); export both in one frame and unit{tiny}")


def box_iou(pred: list[trimesh.Trimesh], gt: list[trimesh.Trimesh], pad: float = 0.01) -> float:
    """IoU of the two sides' joint axis-aligned boxes, each grown by `pad` of the larger box's diagonal on every side
    (a flat part's box has no volume): near 1 for a prediction in the ground truth's frame."""
    (a0, a1), (b0, b1) = bounds_of(pred), bounds_of(gt)
    grow = pad * max(np.linalg.norm(a1 - a0), np.linalg.norm(b1 - b0))
    a0, a1, b0, b1 = a0 - grow, a1 + grow, b0 - grow, b1 + grow
    inter = np.prod(np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0.0, None))
    union = np.prod(a1 - a0) + np.prod(b1 - b0) - inter
    return float(inter / union) if union > 0 else 0.0


def frame_overlap(pred: list[trimesh.Trimesh], gt: list[trimesh.Trimesh]) -> float | None:
    """`box_iou` of a prediction's non-empty components and the ground truth (None when every one is empty): under
    GT_FRAME_OVERLAP, the prediction is likely in another frame than the ground truth's."""
    surfaces = [m for m in pred if len(m.faces)]
    return box_iou(surfaces, gt) if surfaces else None


def object_metrics(pred: list[trimesh.Trimesh], gt: list[trimesh.Trimesh], config: MetricsConfig | None = None) -> dict:
    """`evaluate_object` over the predicted parts with a surface (num_pred of them, num_empty the others: no faces, a
    zero-area placeholder, or non-finite vertices, as `read_prediction` reads them); an all-empty prediction scores
    F = 0, chamfer inf and no self-IoU."""
    config = config or MetricsConfig()
    pred, gt = as_components(pred), as_components(gt)  # a Scene's empty nodes are not among its meshes
    parts = [m for m in pred if has_surface(m)]
    if not parts:
        return {"chamfer": float("inf"), **{f"fscore@{t:g}": 0.0 for t in config.taus}, "self_iou": None, "num_pred": 0,
                "num_gt": len(gt), "num_empty": len(pred)}
    return {**evaluate_object(parts, gt, config), "num_empty": len(pred) - len(parts)}


def evaluate_scene(
    pred: list[trimesh.Trimesh], gt: list[trimesh.Trimesh], config: MetricsConfig | None = None
) -> dict:
    """Scene metrics (fused surfaces, self-IoU), instance means and each instance's scores, prediction i vs GT instance i.

    The instance scores compare each pair where it is placed: prediction and ground truth must share one frame and unit
    (`check_same_frame` refuses scenes of very different sizes; a generation is in its prepared scene's frame).

    A predicted instance without faces (a generation's empty component, kept in its place) scores F = 0 in the
    instance F-score means and is left out of the instance chamfer mean (counted in num_empty; its own chamfer is
    None); an all-empty scene (or none at all: a missing prediction) scores F = 0 and chamfer inf. With another
    count than the GT's there are no instance numbers (instance i has no partner).
    """
    config = config or MetricsConfig()
    if isinstance(pred, trimesh.Scene) or isinstance(gt, trimesh.Scene):  # trimesh lists a GLB's nodes in reverse
        raise InputError("evaluate_scene pairs instance i with GT instance i: a trimesh.Scene keeps neither its nodes' order "
                         "nor its empty ones; pass the file's path (read in its order) or a list of meshes")
    pred, gt = as_components(pred), as_components(gt)
    kept = [i for i, m in enumerate(pred) if has_surface(m)]
    fscores = [f"fscore@{t:g}" for t in config.taus]
    out = {**object_metrics(pred, gt, config), "num_pred": len(pred)}  # here num_pred counts the empty instances too
    if pred and len(pred) != len(gt):
        return out
    out.update({f"balanced_{k}": v for k, v in balanced_scene_metrics([pred[i] for i in kept], gt, kept, config).items()})
    instances = [{"empty": True, "chamfer": None, **{f: 0.0 for f in fscores}} for _ in gt]
    per = instance_metrics([pred[i] for i in kept], [gt[i] for i in kept], config) if kept else []
    for i, r in zip(kept, per):
        instances[i] = {"empty": False, "chamfer": r["chamfer"], **{f: r[f] for f in fscores}}
    out["instance_chamfer"] = float(np.mean([r["chamfer"] for r in per])) if per else float("inf")
    out.update({f"instance_{f}": float(sum(r[f] for r in per) / len(gt)) for f in fscores})
    out["instances"] = instances
    return out
