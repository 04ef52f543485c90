"""Table: instance F-score@0.1 by the instance's size in the image, from `moca3d evaluate-scenes --json` reports.

    python benchmarks/instance_sizes.py \\
        --eval moca=benchmarks/results/scene_moc_cont_s7m_layout_test_2-8_guidance2.json \\
        --eval moca=benchmarks/results/scene_moc_cont_s7m_layout_test_17-32_guidance2.json \\
        --eval vae=benchmarks/results/scene_vae_ceiling_instances_test_2-8.json \\
        --eval vae=benchmarks/results/scene_vae_ceiling_instances_test_17-32.json \\
        --json benchmarks/results/scene_instance_sizes_test.json

Several reports of one name are pooled instance by instance. The bins are the quantiles of the mask
share (the instance's pixels over the image's) of the first name's instances, so every name is binned
alike; an empty instance scores F = 0 and counts under "empty".
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

import numpy as np

from moca3d.errors import InputError

from benchkit import named_paths, positive_int, print_table, run_script, write_json  # benchmarks/benchkit.py


def pooled_instances(paths: List[str]) -> List[Dict]:
    """Every instance row of the reports (evaluate-scenes JSON with per-instance rows), in order."""
    rows = []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        if not isinstance(report, dict) or "scenes" not in report:
            raise InputError(f"{path}: not a `moca3d evaluate-scenes --json` report (no per-scene rows)")
        for scene in report["scenes"]:
            if "instances" not in scene:
                sys.exit(f"{path}: no per-instance rows (re-run `moca3d evaluate-scenes --json` with moca3d >= this version)")
            rows += scene["instances"]
    return rows


def size_table(instances: Dict[str, List[Dict]], bins: int = 4) -> List[Dict]:
    """One record per (name, size bin): the bin's mask-share range, instance count, mean F@0.1 and empty count."""
    first = next(iter(instances.values()))
    edges = np.quantile([i["mask_fraction"] for i in first], np.linspace(0, 1, bins + 1))
    records = []
    for name, rows in instances.items():
        share = np.array([i["mask_fraction"] for i in rows])
        index = np.clip(np.searchsorted(edges, share, side="right") - 1, 0, bins - 1)  # (M,) bin of each instance
        for b in range(bins):
            chosen = [r for r, k in zip(rows, index) if k == b]
            records.append({
                "name": name, "bin": b, "share_from_pct": 100 * edges[b], "share_to_pct": 100 * edges[b + 1], "count": len(chosen),
                "fscore@0.1": float(np.mean([r["fscore@0.1"] for r in chosen])) if chosen else None,
                "empty": sum(bool(r["empty"]) for r in chosen),
            })
    return records


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", action="append", required=True, help="NAME=REPORT.json (repeat; one name may take several)")
    parser.add_argument("--bins", type=positive_int, default=4, help="Size bins (quantiles of the first name's mask shares).")
    parser.add_argument("--json", help="Write the records here.")
    args = parser.parse_args(argv)
    instances = {name: pooled_instances(files) for name, files in named_paths(args.eval).items()}
    records = size_table(instances, args.bins)
    print_table(records, [("name", "name", "{}"), ("share from %", "share_from_pct", "{:.2f}"), ("to %", "share_to_pct", "{:.2f}"),
                          ("instances", "count", "{}"), ("F@0.1", "fscore@0.1", "{:.3f}"), ("empty", "empty", "{}")])
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    run_script(main)
