"""Time of one generation with the built-in models, stage by stage: load, encode, sample, extract, save.

    python benchmarks/generate_time.py --repeats 3 --json benchmarks/results/generate_time_cpu.json

The object case is the README's `moca3d generate examples/chair.png --parts 8` (built-in object model);
the scene case `moca3d generate-scene examples/scene4.png --masks examples/scene4_masks.png` (built-in
scene model); `--cases scene32` times the 32-instance example (examples/scene32.png). All at the CLI's
defaults (50 steps, 128^3 per component). Each repeat loads the model again, as the command does; the
table gives medians over the repeats (the machine is shared: read them as typical, not as bounds). Import time of torch
and moca3d is not counted in the stages; `--command` also times the whole command in a new process each repeat (its
wall time, Python start-up and imports included: what a user waits for), as the `command` column.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moca3d.defaults import check_resolution

from benchkit import positive_int, print_table, run_script, write_json  # benchmarks/benchkit.py

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("load", "encode", "sample", "extract", "save", "total")
SCENES = {"scene": "scene4", "scene32": "scene32"}  # case -> examples/<name>.png and <name>_masks.png


def time_case(kind: str, steps: int, resolution: int, out: Path) -> dict:
    """One generation of `kind` ("object", "scene" or "scene32"), each stage timed (seconds)."""
    from moca3d.defaults import GUIDANCE, SCENE_GUIDANCE
    from moca3d.pipeline import DEFAULT_MODEL_DIR, DEFAULT_SCENE_MODEL_DIR, MoCAOutput, MoCAPipeline

    times = {}
    t0 = time.perf_counter()
    pipe = MoCAPipeline.from_pretrained(DEFAULT_MODEL_DIR if kind == "object" else DEFAULT_SCENE_MODEL_DIR, device="cpu")
    times["load"] = time.perf_counter() - t0
    t = time.perf_counter()
    if kind == "object":
        cond, layout, num, guidance = pipe.encode_image(ROOT / "examples" / "chair.png"), None, 8, GUIDANCE
    else:
        name = SCENES[kind]
        cond, layout = pipe.scene_condition(ROOT / "examples" / f"{name}.png", ROOT / "examples" / f"{name}_masks.png")
        num, guidance = cond.shape[1], SCENE_GUIDANCE
    times["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    latents = pipe.generate_latents(cond, num, steps=steps, guidance=guidance, layout=layout)[0]
    times["sample"] = time.perf_counter() - t
    t = time.perf_counter()
    meshes = pipe.decode_latents(latents, resolution)
    times["extract"] = time.perf_counter() - t
    t = time.perf_counter()
    non_empty = sum(1 for m in meshes if len(m.faces))
    if non_empty:  # an all-empty generation writes nothing (tiny test settings)
        MoCAOutput(meshes, [f"component_{i:02d}" for i in range(num)], latents.cpu()).save(out)
    times["save"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    return {"components": num, "non_empty": non_empty, **times}


def time_command(kind: str, steps: int, resolution: int, out: Path) -> float:
    """Wall seconds of the CLI command of `kind` in a new Python process, start-up and imports included."""
    if kind == "object":
        args = ["generate", str(ROOT / "examples" / "chair.png"), "--parts", "8"]
    else:
        name = SCENES[kind]
        args = ["generate-scene", str(ROOT / "examples" / f"{name}.png"), "--masks", str(ROOT / "examples" / f"{name}_masks.png")]
    command = [sys.executable, "-m", "moca3d", *args, "--steps", str(steps), "--resolution", str(resolution),
               "--device", "cpu", "-o", str(out)]
    t = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=3, help="generations per case (medians reported)")
    parser.add_argument("--steps", type=positive_int, default=50, help="sampling steps (the CLI's default: 50)")
    parser.add_argument("--resolution", type=int, default=128, help="marching-cubes resolution per component (the CLI's default: 128)")
    parser.add_argument("--cases", nargs="+", default=["object", "scene"], choices=["object", *SCENES],
                        help="object: examples/chair.png, 8 parts; scene: examples/scene4.png; scene32: examples/scene32.png")
    parser.add_argument("--command", action="store_true", help="also time the whole CLI command in a new process (wall time)")
    parser.add_argument("--json", default=None, help="write the runs and medians here")
    args = parser.parse_args(argv)
    check_resolution(args.resolution)

    runs = {case: [] for case in args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so drifts of a shared machine hit both cases alike
            for case in args.cases:
                runs[case].append(time_case(case, args.steps, args.resolution, Path(tmp) / f"{case}.glb"))
                if args.command:
                    runs[case][-1]["command"] = time_command(case, args.steps, args.resolution, Path(tmp) / f"{case}_cli.glb")
    stages = STAGES + (("command",) if args.command else ())
    records = []
    for case, rows in runs.items():
        med = {s: statistics.median(r[s] for r in rows) for s in stages}
        records.append({"case": case, "components": rows[0]["components"], "non_empty": rows[0]["non_empty"], **med})
    print_table(records, [("case", "case", "{}"), ("N", "components", "{}"), ("non-empty", "non_empty", "{}")]
                + [(f"{s} s", s, "{:.2f}") for s in stages])
    if args.json:
        write_json(args.json, {
            "env": f"torch {torch.__version__}, {torch.get_num_threads()} threads", "steps": args.steps,
            "resolution": args.resolution, "repeats": args.repeats, "median": records, "runs": runs,
        })


if __name__ == "__main__":
    run_script(main)
