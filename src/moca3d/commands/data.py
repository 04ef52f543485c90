"""`moca3d prepare` (meshes or procedural assets -> dataset) and `moca3d evaluate` (metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moca3d.commands.common import COMPONENTS_HELP, FRAME_HELP, check_output_path, check_run_folder, write_json
from moca3d.errors import warn_input
from moca3d.progress import cli_progress

SPLIT_HELP = ("Share of assets in the {} split, approximate: each asset's split is drawn from a hash of its id (stable "
              "across resumes), so a small dataset may get more, fewer or none.")
# `evaluate`'s printed names of its counts (the JSON keeps metrics.py's keys): in object mode num_pred counts the
# non-empty predicted parts (those scored), with --scene every predicted instance, the empty ones too
COUNT_LABELS = {False: {"num_pred": "non-empty predicted parts", "num_gt": "ground-truth parts", "num_empty": "empty predicted parts"},
                True: {"num_pred": "predicted instances (all)", "num_gt": "ground-truth instances",
                       "num_empty": "empty predicted instances"}}


def prepare_command(
    input: Optional[Path] = typer.Argument(None, help="Folder of meshes: each file (components = scene nodes) or sub-folder (one file per component, or a PartNet annotation folder: result.json + objs/) is an asset; or one mesh file, one asset."),
    out: Path = typer.Option(..., "--output", "--out", "-o", help="Dataset root to create or resume."),
    procedural: Optional[str] = typer.Option(None, help="Generate 'objects' or 'scenes' instead of reading INPUT."),
    count: int = typer.Option(100, help="Number of procedural assets."),
    seed: int = typer.Option(0, help="Seed of the procedural stream and of all sampling."),
    start: int = typer.Option(0, help="Index of the first procedural asset."),
    workers: int = typer.Option(1, help="Worker processes."),
    num_surface: int = typer.Option(8192, help="Surface points per component (P)."),
    sharp_fraction: float = typer.Option(0.25, help="Share of surface points on sharp edges."),
    num_queries: int = typer.Option(8192, help="Supervision queries per component (Q), half near the surface."),
    image_size: int = typer.Option(256, help="Render size in pixels (square)."),
    max_components: int = typer.Option(32, help="Assets with more components are skipped."),
    scene_objects: tuple[int, int] = typer.Option((2, 16), help="Procedural scenes: min and max objects per scene (up to 32)."),
    connected: bool = typer.Option(False, "--connected", help="Split file assets into connected components."),
    partnet_level: int = typer.Option(1, "--partnet-level", help="PartNet folders (e.g. PartNet/data_v0): a part is a node this deep in result.json's hierarchy (1: the root's children, such as a chair's back, seat, base and arms; 0: the whole object)."),
    partnet_hierarchy: str = typer.Option("original", "--partnet-hierarchy", help="PartNet folders: 'original' (result.json, the annotators' parts) or 'merged' (result_after_merging.json, merged into PartNet's per-category labels, as its segmentation benchmark)."),
    kind: str = typer.Option("object", help="For file assets: 'object' (random view) or 'scene' (isometric, floor)."),
    up_axis: str = typer.Option("y", "--up-axis", help="For file assets: the axis that points up in them, turned to moca3d's Y up (glTF's): y, z (CAD, STL, 3ds Max, Z-up exports), -z, x or -y. Renders and generations stand on it."),
    category: str = typer.Option("mesh", "--category", help="For file assets: their category, which evaluate-model groups its scores by (PartNet folders read theirs from meta.json); prepare a folder per category into the same --output to label a mixed dataset."),
    val_fraction: float = typer.Option(0.05, help=SPLIT_HELP.format("val")),
    test_fraction: float = typer.Option(0.05, help=SPLIT_HELP.format("test")),
    splits_file: Optional[Path] = typer.Option(None, "--splits", help="A split list instead of the fractions (a benchmark's): a JSON object {\"train\": [...], \"val\": [...], \"test\": [...]} or lines `NAME SPLIT`, NAME an asset id or its source file's (folder's) name or stem; unlisted assets are train. It re-splits the assets prepared before too; a dataset split by a list keeps taking one."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry assets listed in report.jsonl."),
) -> None:
    """Turn meshes (or procedural assets) into a dataset: samples, SDF queries, renders, masks, manifest."""
    from moca3d.data.prepare import PrepareConfig, folder_jobs, prepare, procedural_jobs, read_split_list
    from moca3d.errors import ConfigError, InputError
    from moca3d.geometry.inside import QueryConfig
    from moca3d.geometry.render import RenderConfig
    from moca3d.geometry.sampling import SurfaceSamplingConfig

    if (input is None) == (procedural is None):
        raise ConfigError("give either an INPUT folder or --procedural objects|scenes")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (processes preparing assets), got {workers}")
    check_run_folder(out)
    config = PrepareConfig(
        surface=SurfaceSamplingConfig(num_points=num_surface, sharp_fraction=sharp_fraction),
        queries=QueryConfig(num_queries=num_queries),
        render=RenderConfig(size=image_size),
        max_components=max_components, connected=connected, partnet_level=partnet_level,
        partnet_hierarchy=partnet_hierarchy, kind=kind, up_axis=up_axis, scene_objects=tuple(scene_objects),
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        splits=read_split_list(splits_file) if splits_file is not None else None,
    )
    jobs = procedural_jobs(procedural, count, seed, start) if procedural else folder_jobs(input, category)
    try:
        summary = prepare(jobs, out, config, workers=workers, retry_failed=retry_failed, progress=cli_progress())
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the assets prepared in {out} are kept (manifest written); the same command resumes", err=True)
        raise typer.Exit(130) from None
    typer.echo(
        f"{out}: {summary.processed} prepared, {summary.already_done} already done or reported, "
        f"{summary.skipped} skipped (see {out / 'report.jsonl'})"
    )
    if summary.dropped_assets:
        typer.echo(f"{summary.dropped_assets} prepared without components that had no surface (listed above, and as "
                   "dropped_components in each asset's meta.json)")
    if summary.small_assets:
        typer.echo(f"{summary.small_assets} prepared without components too small for the query sampling (listed above, "
                   "and as small_components in each asset's meta.json)")
    if summary.duplicates:
        typer.echo(f"{summary.duplicates} left out as copies of assets (listed above): delete an asset's folder under "
                   f"{out / 'assets'} to prepare its file again, e.g. under another --category")
    if summary.renamed:
        typer.echo(f"{summary.renamed} given an id with a _k suffix: their file's name was taken by an asset of another "
                   "source (listed above)")
    if summary.open_assets:
        typer.echo(f"{summary.open_assets} prepared with open components (listed above, and as open_components in each "
                   "asset's meta.json): close them for exact inside/outside labels")
    if summary.processed == 0 and summary.already_done == 0 and summary.duplicates == 0:
        raise InputError(f"no asset could be prepared: all {summary.skipped} skipped (reasons in {out / 'report.jsonl'})")
    from collections import Counter

    from moca3d.data.dataset import read_manifest

    counts = Counter(record["split"] for record in read_manifest(out))
    if not counts:  # everything was reported skipped by an earlier run: say so instead of a silent empty dataset
        raise InputError(f"{out}: no asset prepared; every one is listed as skipped in {out / 'report.jsonl'} "
                         "(rerun with --retry-failed to try them again)")
    if summary.split_list is not None:  # from the list: what it did not name, and what it named that is not here
        unlisted, unmatched = summary.split_list["unlisted"], summary.split_list["unmatched"]
        hint = f" ({len(unlisted)} not in {splits_file.name}: train, e.g. {unlisted[0]})" if unlisted else ""
        if unmatched:
            warn_input(f"{splits_file.name}: {len(unmatched)} listed name(s) match no asset here (by id, source name or "
                       f"stem): {', '.join(unmatched[:5])}{', ...' if len(unmatched) > 5 else ''}")
    else:
        fractions = {"val": val_fraction, "test": test_fraction}
        empty = [name for name in ("val", "test") if not counts[name] and fractions[name] > 0]  # not one asked to be empty (0)
        raise_hint = " and ".join(f"--{name}-fraction" for name in empty)
        hint = (f" ({' and '.join(empty)} empty: prepare into a new --output with a larger {raise_hint} for a held-out split; a "
                "dataset keeps its split fractions)") if empty else ""
    typer.echo(f"splits: {counts['train']} train, {counts['val']} val, {counts['test']} test{hint}")


def evaluate_command(
    pred: Path = typer.Argument(..., help=f"Predicted components: {COMPONENTS_HELP}."),
    gt: Path = typer.Argument(..., help="Ground-truth components, read as PRED is (the same layout gives the same components); none may be empty."),
    num_points: int = typer.Option(100_000, help="Points sampled on each fused surface."),
    seed: int = typer.Option(0, help="Sampling seed."),
    iou_resolution: int = typer.Option(64, help="Voxels per side for self-IoU."),
    scene: bool = typer.Option(False, "--scene", help="Also report per-instance metrics: component i vs i (paired by name instead when both files name the same components in another order), each where it is placed, so both files must share one frame and unit (the fused-surface metrics follow --frame)."),
    frame: str = typer.Option("each", "--frame", help=FRAME_HELP),
    gt_up_axis: str = typer.Option("y", "--gt-up-axis", help="The axis that points up in GT (as prepare's --up-axis: y, z, -z, x or -y): a source mesh exported Z-up is turned to Y up, the frame generations come in, before scoring (a prepared asset's mesh.glb is Y up already)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this JSON file ('-': print them alone)."),
) -> None:
    """Chamfer distance, F-score@0.1/0.05 and self-IoU of PRED against GT (after PartCrafter/MIDI; --frame: how the two are aligned)."""
    from moca3d.evaluation import object_metrics, pair_by_name, read_ground_truth, read_prediction
    from moca3d.metrics import (GT_FRAME_OVERLAP, MetricsConfig, check_metric_settings, check_same_frame, evaluate_scene,
                                frame_overlap, protocol)

    check_metric_settings(num_points, iou_resolution, points_name="--num-points", resolution_name="--iou-resolution",
                          frame=frame, frame_name="--frame")
    check_output_path(json_out, "--json")
    config = MetricsConfig(num_points=num_points, seed=seed, iou_resolution=iou_resolution, frame=frame)
    from moca3d.geometry.mesh_io import check_up_axis, stand_up

    check_up_axis(gt_up_axis, "--gt-up-axis")  # before any file is read
    gt_meshes, gt_names = read_ground_truth(gt)  # both sides read alike: the same layout gives the same components
    gt_meshes = stand_up(gt_meshes, gt_up_axis)
    # a generation's empty components (kept as empty nodes / objects) are read in place: instance i is still i
    pred_meshes, pred_names = read_prediction(pred)
    surfaces = [m for m in pred_meshes if len(m.faces)]
    overlap = frame_overlap(surfaces, gt_meshes) if frame == "gt" else None
    if overlap is not None and overlap < GT_FRAME_OVERLAP:  # likely another frame
        warn_input(f"--frame gt: the prediction's box overlaps the ground truth's by {overlap:.2f} (IoU): "
                   f"is {pred.name} in {gt.name}'s frame? (a prepared asset's mesh.glb is normalised: its normalization.json "
                   "maps the source's coordinates to it)")
    if scene:
        if surfaces:
            check_same_frame(surfaces, gt_meshes)
        pred_meshes, paired = pair_by_name(pred_meshes, pred_names, gt_names)
        if paired:
            typer.echo("(components paired by name: the two files list them in different orders)", err=True)
        result = {**evaluate_scene(pred_meshes, gt_meshes, config), "paired_by_name": paired}
    else:  # the fused surface of the non-empty parts (num_empty counts the others; none at all scores F = 0)
        result = object_metrics(pred_meshes, gt_meshes, config)
    if write_json(json_out, {**result, "frame": frame, "num_points": num_points, "gt_up_axis": gt_up_axis,
                             "protocol": protocol(config, scene)}):
        return
    labels = {key: COUNT_LABELS[scene].get(key, key) for key in result if key not in ("instances", "paired_by_name")}  # (said above)
    width = max([22, *map(len, labels.values())])
    for key, label in labels.items():
        value = result[key]
        text = f"{value:.6g}" if isinstance(value, float) else "n/a (under two non-empty components)" if value is None else value
        typer.echo(f"{label:>{width}}: {text}")
    if scene and "instances" not in result:
        typer.echo(f"(per-instance metrics need equal component counts: {len(pred_meshes)} predicted, {len(gt_meshes)} in the ground truth)")
    for name, row in zip(gt_names, result.get("instances", [])):
        scores = "empty" if row["empty"] else "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "empty")
        typer.echo(f"{'instance ' + name:>{width}}: {scores}")


def register(app: typer.Typer) -> None:
    """Add the data verbs to the CLI."""
    app.command("prepare")(prepare_command)
    app.command("evaluate")(evaluate_command)
