"""Triangle budgets (`--faces`) on real generations: time, topology and surface kept, budget by budget.

    python benchmarks/simplify.py --json benchmarks/results/simplify_cpu.json

Each object example (examples/*.png but the scenes) is generated once with the built-in model (8 parts, 50 steps,
128^3 per part, seed 0), then its parts are decimated to each budget (`geometry/simplify.py`, as `generate --faces`).
Per budget: the triangles kept, the decimation time (median over the examples), the parts whose surface is not closed
and manifold (edges not shared by exactly two triangles), and the fused decimated surface against the fused full one
(Chamfer, F@0.02 and F@0.01 on 20 000 points each; the frame is [-1, 1]^3). The "full" row scores the full surface
resampled with another seed against itself: the metrics' floor at this point count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from moca3d.defaults import check_resolution

from benchkit import positive_int, print_table, run_script, write_json  # benchmarks/benchkit.py

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (20000, 10000, 5000, 2000)
TAUS = (0.02, 0.01)


def fused_points(meshes, count: int, seed: int):
    """`count` points on the union of the non-empty meshes."""
    from moca3d.geometry.sampling import sample_points

    return sample_points([m for m in meshes if len(m.faces)], count, seed)


def measure(images: list[Path], parts: int, steps: int, resolution: int, budgets: tuple[int, ...], points: int) -> tuple[list, list]:
    """Generate each image, decimate it to each budget: per-image rows and per-budget medians."""
    from moca3d.geometry.simplify import edge_defects, simplify_components
    from moca3d.metrics import point_metrics
    from moca3d.pipeline import MoCAPipeline

    pipe = MoCAPipeline.from_pretrained(None, device="cpu")
    rows = []
    for image in images:
        full = pipe(image, num_parts=parts, steps=steps, resolution=resolution, show_progress=False).meshes
        if not any(len(m.faces) for m in full):
            print(f"{image.name}: every part decoded empty; skipped")
            continue
        reference = fused_points(full, points, seed=0)
        row = {"image": image.name, "triangles": sum(len(m.faces) for m in full),
               "defective_parts": sum(1 for m in full if edge_defects(m)), "parts": sum(1 for m in full if len(m.faces)),
               "floor": point_metrics(fused_points(full, points, seed=1), reference, TAUS)}  # the full surface resampled
        for budget in budgets:
            t = time.perf_counter()
            small = simplify_components(full, budget)
            seconds = time.perf_counter() - t
            scores = point_metrics(fused_points(small, points, seed=1), reference, TAUS)
            row[str(budget)] = {"triangles": sum(len(m.faces) for m in small), "seconds": seconds,
                                "defective_parts": sum(1 for m in small if edge_defects(m)), **scores}
        rows.append(row)
        print(f"{image.name}: {row['triangles']} triangles in {row['parts']} parts")
    summary = [{"budget": "full", "triangles": statistics.median(r["triangles"] for r in rows),
                "defective": sum(r["defective_parts"] for r in rows), "parts": sum(r["parts"] for r in rows),
                **{k: statistics.median(r["floor"][k] for r in rows) for k in ("chamfer", *(f"fscore@{t:g}" for t in TAUS))}}]
    for budget in budgets:
        runs = [r[str(budget)] for r in rows]
        summary.append({"budget": budget, "triangles": statistics.median(r["triangles"] for r in runs),
                        "seconds": statistics.median(r["seconds"] for r in runs),
                        "defective": sum(r["defective_parts"] for r in runs), "parts": summary[0]["parts"],
                        **{k: statistics.median(r[k] for r in runs) for k in ("chamfer", *(f"fscore@{t:g}" for t in TAUS))}})
    return rows, summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", type=Path, default=None, help="object images (default: examples/ but the scenes)")
    parser.add_argument("--parts", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=50)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--budgets", nargs="+", type=positive_int, default=list(BUDGETS), help="triangle budgets (--faces)")
    parser.add_argument("--points", type=positive_int, default=20000, help="points per fused surface for the metrics")
    parser.add_argument("--json", default=None, help="write the rows and the table here")
    args = parser.parse_args(argv)
    check_resolution(args.resolution)
    images = args.images or sorted(p for p in (ROOT / "examples").glob("*.png") if not p.stem.startswith("scene"))
    rows, summary = measure(images, args.parts, args.steps, args.resolution, tuple(args.budgets), args.points)
    print_table(summary, [("budget", "budget", "{}"), ("triangles (median)", "triangles", "{:.0f}"), ("time s", "seconds", "{:.3f}"),
                          ("parts not closed-manifold", "defective", "{}"), ("of", "parts", "{}"), ("CD", "chamfer", "{:.4f}"),
                          ("F@0.02", "fscore@0.02", "{:.3f}"), ("F@0.01", "fscore@0.01", "{:.3f}")])
    if args.json:
        write_json(args.json, {"env": f"torch {torch.__version__}, {torch.get_num_threads()} threads", "parts": args.parts,
                               "steps": args.steps, "resolution": args.resolution, "points": args.points,
                               "table": summary, "rows": rows})


if __name__ == "__main__":
    run_script(main)
