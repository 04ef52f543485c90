"""How much 3D layout a pre-trained image encoder reads from a render (`moca3d pretrain-encoder`'s grid head).

For each asset of a split: the head's predicted surface cells (p > 0.5) against the asset's own
(dilated) surface grid — IoU — and the cell centres against its surface samples — F-score@0.1 in the
data's [-1, 1] frame (not the generation metric's normalised frame). References: the GT cells
themselves (the grid's quantisation ceiling) and the image-free guess (the training grids' mean > 0.5).
Prints a table and writes JSON.

    python benchmarks/encoder_grid_eval.py data/test58 --run runs/encoder_pretrain \
        --train-grids runs/encoder_pretrain/grids32.safetensors --json benchmarks/results/encoder_pretrain_grid_test58.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from moca3d.data.dataset import read_manifest
from moca3d.data.images import preprocess_image
from moca3d.metrics import point_metrics
from moca3d.training.pretrain_encoder import (
    dilate_grids, grid_centres, grid_iou, load_grid_cache, load_run, load_surface_points, predict_grid, surface_grid,
)

from benchkit import run_script, write_json  # benchmarks/benchkit.py

KEYS = ("iou", "mean_grid_iou", "f01", "f01_gt_cells", "f01_mean_grid")


def fscore_of_cells(cells: torch.Tensor, centres: np.ndarray, surface: np.ndarray) -> float:
    """F@0.1 between the centres of the occupied cells and surface samples (0 when no cell is occupied)."""
    if not cells.any():
        return 0.0
    return point_metrics(centres[cells.reshape(-1).numpy()], surface)["fscore@0.1"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="prepared dataset (samples.npz and render.png per asset)")
    p.add_argument("--run", type=Path, required=True, help="a pretrain-encoder run folder (pretrain_config.json or --config, checkpoints/)")
    p.add_argument("--config", type=Path, default=None, help="its recipe (default: RUN/pretrain_config.json)")
    p.add_argument("--train-grids", type=Path, required=True, help="the run's training grids (for the image-free reference)")
    p.add_argument("--split", default="test")
    p.add_argument("--points", type=int, default=8192, help="surface samples per asset for the F-score")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, model = load_run(args.run, args.config)
    r, size = cfg.grid_resolution, cfg.image_encoder.get("image_size", 128)
    centres = grid_centres(r).numpy()
    train_grids, _, train_r = load_grid_cache(args.train_grids)
    if train_r != r:
        raise SystemExit(f"error: {args.train_grids} holds {train_r}^3 grids, the run predicts {r}^3")
    mean = dilate_grids(train_grids, cfg.dilate).float().mean(0) > 0.5  # (R, R, R)
    rows = []
    for rec in read_manifest(args.data, args.split):
        asset = args.data / "assets" / rec["id"]
        points = load_surface_points(asset)
        cells = surface_grid(points, r)
        target = dilate_grids(cells[None], cfg.dilate)[0]
        pred = predict_grid(model, preprocess_image(asset / "render.png", size)[None], r)[0] > 0.5
        pick = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[: args.points]
        surface = points[pick].numpy()
        rows.append({
            "id": rec["id"], "category": rec.get("category"),
            "iou": float(grid_iou(pred[None], target[None])), "mean_grid_iou": float(grid_iou(mean[None], target[None])),
            "f01": fscore_of_cells(pred, centres, surface), "f01_gt_cells": fscore_of_cells(cells, centres, surface),
            "f01_mean_grid": fscore_of_cells(mean, centres, surface),
        })
    if not rows:
        raise SystemExit(f"error: {args.data}: no assets in the '{args.split}' split")
    summary = {k: float(np.mean([row[k] for row in rows])) for k in KEYS}
    print(f"{len(rows)} assets of '{args.split}', {r}^3 grid")
    print("                       | grid IoU | F@0.1 (data frame)")
    print(f"encoder's prediction   |   {summary['iou']:.3f}  |   {summary['f01']:.3f}")
    print(f"image-free mean grid   |   {summary['mean_grid_iou']:.3f}  |   {summary['f01_mean_grid']:.3f}")
    print(f"GT cells (ceiling)     |   1.000  |   {summary['f01_gt_cells']:.3f}")
    if args.json:
        write_json(args.json, {"data": str(args.data), "run": str(args.run), "config": str(args.config or args.run / "pretrain_config.json"),
                               "train_grids": str(args.train_grids), "split": args.split, "points": args.points, "resolution": r,
                               "count": len(rows), "mean": summary, "assets": rows})
    return summary


if __name__ == "__main__":
    run_script(main)
