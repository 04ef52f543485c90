"""Where a scene-pre-trained image encoder puts each instance (`moca3d pretrain-encoder` with a scene recipe).

For each visible instance of a split's scenes, the grid head's prediction from the instance's
7-channel stack against the instance's own (dilated) surface grid in the scene frame: IoU of the
cells with p > 0.5, and the placement error — the distance between the centroid of the k most likely
cells (k = the instance's true cell count) and the true cells' centroid. Reference: the image-free
guess, every instance at the mean centroid of the run's grid cache (every instance of the training
split it was built from). Prints a table and writes JSON.

    python benchmarks/scene_encoder_eval.py data/scenes_test --run runs/scene_encoder \
        --json benchmarks/results/scene_encoder_grid_test.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from moca3d.data.dataset import read_manifest
from moca3d.data.scene import component_masks, scene_inputs, stack_conditions, visible_instances
from moca3d.training.pretrain_encoder import (
    dilate_grids, dilated_chunks, grid_centres, grid_iou, load_component_points, load_run, predict_grid, read_grid_cache,
    surface_grid,
)

from benchkit import run_script, write_json  # benchmarks/benchkit.py


def centroid(cells: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(R^3,) bool cells -> (3,) mean of their centres."""
    return centres[cells].mean(0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="prepared scenes (samples.npz, render.png and mask.png per scene)")
    p.add_argument("--run", type=Path, required=True, help="a scene pretrain-encoder run folder (pretrain_config.json, checkpoints/, grids)")
    p.add_argument("--split", default="test")
    p.add_argument("--count", type=int, default=0, help="at most this many scenes (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, model = load_run(args.run)
    if cfg.condition != "scene":
        raise SystemExit(f"error: {args.run} is not a scene pre-training run (condition {cfg.condition!r})")
    r, size = cfg.grid_resolution, model.image_encoder.image_size
    centres = grid_centres(r)
    packed, _, _ = read_grid_cache(args.run / f"grids{r}.safetensors")
    sums, count = torch.zeros(3), 0
    for grids in dilated_chunks(packed, r, cfg.dilate):  # the cached instances' mean centroid (tens of thousands)
        cells = grids.reshape(-1, r**3).float()  # (b, R^3)
        cells = cells[cells.sum(1) > 0]
        sums += (cells @ centres / cells.sum(1, keepdim=True)).sum(0)
        count += len(cells)
    mean_centre = sums / max(count, 1)  # (3,)

    rows = []
    records = [rec for rec in read_manifest(args.data, args.split) if rec.get("kind") == "scene"]
    for rec in records[: args.count or None]:
        asset = args.data / "assets" / rec["id"]
        masks = component_masks(asset / "mask.png", rec["num_components"])
        if not masks.any():
            continue
        scene, soft = scene_inputs(asset / "render.png", masks, size)
        visible = visible_instances(soft)  # as in pre-training: a pixel left in the cropped mask
        probs = predict_grid(model, stack_conditions(scene, soft[visible]), r).reshape(len(visible), -1)  # (V, R^3)
        points = load_component_points(asset)  # (N, P, 3)
        for j, prob in zip(visible.tolist(), probs):
            truth = dilate_grids(surface_grid(points[j], r)[None], cfg.dilate)[0].reshape(-1)
            top = torch.zeros_like(truth)
            top[prob.topk(int(truth.sum())).indices] = True
            true_centre = centroid(truth, centres)
            rows.append({
                "scene": rec["id"], "instance": j, "instances": rec["num_components"], "true_cells": int(truth.sum()),
                "iou": float(grid_iou((prob > 0.5)[None], truth[None])[0]),
                "placement_error": float((centroid(top, centres) - true_centre).norm()),
                "mean_centre_error": float((mean_centre - true_centre).norm()),
                "predicted_cells": int((prob > 0.5).sum()),
            })
    if not rows:
        raise SystemExit(f"error: {args.data}: no scene with a visible instance in the '{args.split}' split")
    keys = ("iou", "placement_error", "mean_centre_error", "predicted_cells", "true_cells")
    summary = {k: float(np.median([row[k] for row in rows])) for k in keys}
    print(f"{len(rows)} instances of {len(records[: args.count or None])} scenes (medians)")
    print("| grid IoU | placement error | image-free error | cells p > 0.5 | true cells |")
    print("|---|---|---|---|---|")
    print("| " + " | ".join(f"{summary[k]:.3f}" for k in keys) + " |")
    result = {"data": str(args.data), "run": str(args.run), "split": args.split, "count": args.count, "median": summary, "instances": rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    run_script(main)
