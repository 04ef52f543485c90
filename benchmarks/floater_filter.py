"""How the extraction's settings change a model's scores: one generation per object, several extractions.

Each held-out object is generated once (the `evaluate-model` protocol: its render, its GT part count,
the same steps, guidance and seed); each part's field grid is evaluated once
(`MoCAPipeline.latent_grids`), then meshed with every `min_component_fraction` asked (pieces with
fewer faces than that fraction of the part's largest piece are dropped; 0 keeps all), crossed with
every `rescue_vertices` asked (a part with no inside vertex is meshed at the level of its n-th largest
value instead, if above `--rescue-floor`; 0 leaves it empty), and scored against the GT parts. The
table gives the mean metrics per setting and the mean paired change against the first, with its
standard error. As in `evaluate-model` reports (benchmarks/variants_table.py): an object whose every
part came out empty scores F = 0 in the means (self-IoU: over the objects with two non-empty parts or more, paired
over those with it under both settings), and its infinite CD is left out of the
mean CD (and of the paired CD change) and counted under "empty objects"; "empty parts" counts parts.

    python benchmarks/floater_filter.py data/test58 --fractions 0.02 0 0.1 0.25 0.5 --seed 0 \
        --json benchmarks/results/floater_filter_test_seed0.json
    python benchmarks/floater_filter.py data/objects --max-parts 16 --fractions 0.02 --rescue 0 16 128 1024 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from benchkit import print_table, run_script, write_json
from moca3d.defaults import GUIDANCE, STEPS
from moca3d.evaluation import means, object_metrics, select_records, with_progress
from moca3d.geometry.extract import mesh_from_grid
from moca3d.geometry.mesh_io import load_components
from moca3d.metrics import MetricsConfig
from moca3d.pipeline import MoCAPipeline

SCORES = ("fscore@0.1", "fscore@0.05", "self_iou")  # means over the objects that have each (self-IoU: None under two parts)
COLUMNS = [("fraction", "min_component_fraction", "{:>8}"), ("rescue", "rescue_vertices", "{:>6}"),
           ("F@0.1", "fscore@0.1", "{:.3f}"), ("paired", "fscore@0.1_paired", "{:+.3f}"), ("SE", "fscore@0.1_paired_se", "{:.3f}"),
           ("F@0.05", "fscore@0.05", "{:.3f}"), ("CD", "chamfer", "{:.3f}"), ("CD paired", "chamfer_paired", "{:+.3f}"),
           ("self-IoU", "self_iou", "{:.3f}"), ("empty parts", "num_empty", "{}"), ("empty objects", "empty_objects", "{}")]


def setting_key(fraction: float, rescue: int) -> str:
    """Per-object result key of a setting ("0.02" without rescue, as in earlier reports)."""
    return str(fraction) if rescue == 0 else f"{fraction}+rescue{rescue}"


def _paired(entry: dict, name: str, diff: np.ndarray) -> None:
    """Add the mean paired change `name`_paired and its standard error to `entry` (with at least 2 pairs)."""
    if len(diff) > 1:
        entry[f"{name}_paired"] = float(diff.mean())
        entry[f"{name}_paired_se"] = float(diff.std(ddof=1) / np.sqrt(len(diff)))


def summarize(rows: list[dict], settings: list[tuple[float, int]]) -> list[dict]:
    """One table entry per (fraction, rescue) setting of the per-object `rows`, paired against the first setting.

    CD is the mean over objects with a surface (None if none has one), its paired change over objects with a
    surface under both settings; `empty_objects` counts the objects left out (infinite CD), `num_empty` empty parts.
    """
    ref = setting_key(*settings[0])
    ref_cd = np.array([row[ref]["chamfer"] for row in rows], dtype=float)
    table = []
    for f, r in settings:
        scores = [row[setting_key(f, r)] for row in rows]
        entry = {"min_component_fraction": f, "rescue_vertices": r}
        for k in SCORES:  # None (no self-IoU) -> NaN: left out of the mean, and of the pairs
            values = np.array([np.nan if s[k] is None else s[k] for s in scores], dtype=float)
            before = np.array([np.nan if row[ref][k] is None else row[ref][k] for row in rows], dtype=float)
            entry[k] = float(np.nanmean(values)) if np.isfinite(values).any() else None
            both = np.isfinite(values) & np.isfinite(before)
            _paired(entry, k, values[both] - before[both])
        mean = means(scores, ("chamfer",))  # evaluate-model's rule: the mean over finite CDs, all-empty objects counted
        entry["chamfer"], entry["empty_objects"] = mean["chamfer"], mean["all_empty"]
        cd = np.array([s["chamfer"] for s in scores], dtype=float)
        both = np.isfinite(cd) & np.isfinite(ref_cd)
        _paired(entry, "chamfer", cd[both] - ref_cd[both])
        entry["num_empty"] = int(sum(s["num_empty"] for s in scores))
        table.append(entry)
    return table


def print_summary(table: list[dict]) -> None:
    """Print `summarize`'s table (a missing value as "-"), and why CD leaves objects out when it does."""
    print_table(table, COLUMNS)
    if any(e["empty_objects"] for e in table):
        print("CD: mean over the objects with a surface; the empty objects (every part empty: infinite CD) are left "
              "out of it and of its paired change")


def main(argv=None) -> dict:
    """Run the sweep on the command line's (or `argv`'s) arguments; returns the report written as JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="prepared dataset folder (moca3d prepare)")
    ap.add_argument("--model", default=None, help="pipeline folder (default: the built-in model)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--count", type=int, default=None, help="first COUNT objects of the split (default: all)")
    ap.add_argument("--max-parts", type=int, default=32, help="skip objects with more parts (16: the README's 58 test objects)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.0, 0.1, 0.25, 0.5],
                    help="min_component_fraction values; the first is the reference of the paired changes")
    ap.add_argument("--rescue", type=int, nargs="+", default=[0],
                    help="rescue_vertices values for empty parts (0: left empty), crossed with --fractions")
    ap.add_argument("--rescue-floor", type=float, default=-0.5, help="no rescue of a part whose n-th largest value is below this")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--guidance", type=float, default=GUIDANCE)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metric-points", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the table and per-object scores here")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = MoCAPipeline.from_pretrained(args.model)
    config = pipe.extract_config(args.resolution)
    metrics = MetricsConfig(num_points=args.metric_points, seed=args.seed)
    records = select_records(args.data, args.split, args.count, 1, args.max_parts)
    settings = [(f, r) for f in args.fractions for r in args.rescue]  # the first is the paired reference

    rows = []  # one per object: {"id", fraction -> metrics}
    for rec in with_progress(records, f"{args.split} objects", not args.quiet):
        asset = Path(args.data) / "assets" / rec["id"]
        gt, _ = load_components(asset / "mesh.glb")
        t0 = time.time()
        with torch.no_grad():
            cond = pipe.encode_image(asset / "render.png")
            latents = pipe.generate_latents(cond, len(gt), args.steps, args.guidance, args.seed)[0]  # (N, L, C)
            grids = list(pipe.latent_grids(latents, args.resolution))  # each part's field, evaluated once
        row = {"id": rec["id"], "num_parts": len(gt), "seconds": time.time() - t0}
        for f, r in settings:
            setting = dataclasses.replace(config, min_component_fraction=f if f > 0 else None, rescue_vertices=r,
                                          rescue_floor=args.rescue_floor)
            meshes = [mesh_from_grid(g, setting) for g in grids]
            row[setting_key(f, r)] = object_metrics(meshes, gt, metrics)
        rows.append(row)

    table = summarize(rows, settings)
    print(f"{len(rows)} objects of {args.split!r}, seed {args.seed}, {args.steps} steps, {args.resolution}^3; "
          f"paired vs {setting_key(*settings[0])}")
    print_summary(table)
    report = {"model": args.model or "built-in", "split": args.split, "seed": args.seed, "steps": args.steps,
              "rescue_floor": args.rescue_floor,
              "guidance": args.guidance, "resolution": args.resolution, "metric_points": args.metric_points,
              "table": table, "objects": rows}
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    run_script(main)
