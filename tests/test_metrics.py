"""Metrics on cases with known answers: identical, shifted, disjoint and nested shapes."""

import numpy as np
import pytest
import torch
import trimesh

from moca3d.errors import ConfigError, InputError, InputWarning
from moca3d.metrics import (
    MetricsConfig,
    chamfer,
    evaluate_object,
    evaluate_scene,
    fscore,
    instance_metrics,
    point_metrics,
    self_iou,
    voxelize_filled,
)

FAST = MetricsConfig(num_points=5000)


def _square(size: float = 2.0) -> trimesh.Trimesh:
    """A flat square in the z = 0 plane, side `size`, centred at the origin."""
    h = size / 2
    v = np.array([[-h, -h, 0], [h, -h, 0], [h, h, 0], [-h, h, 0]], dtype=float)
    return trimesh.Trimesh(v, [[0, 1, 2], [0, 2, 3]], process=False)


def test_identical_meshes_score_the_sampling_floor_in_any_part_order():
    """Each side samples its own points: a copy of the ground truth scored CD 0 exactly (the same seed on both sides,
    the same triangles: the same points) but the same parts listed in another order 0.038, the sampling floor; now
    both score the floor (5000 points: CD 0.038, abs 0.003 apart), F@0.1 1."""
    parts = [trimesh.creation.box(extents=[1, 2, 1]), trimesh.creation.icosphere(2).apply_translation([2, 0, 0])]
    out = evaluate_object(parts, [p.copy() for p in parts], FAST)
    reordered = evaluate_object(parts, [p.copy() for p in parts[::-1]], FAST)
    assert 0.01 < out["chamfer"] < 0.06 and out["chamfer"] == pytest.approx(reordered["chamfer"], abs=0.003)
    assert out["fscore@0.1"] == reordered["fscore@0.1"] == 1.0 and out["fscore@0.05"] > 0.99


def test_shift_along_normal_gives_twice_the_shift():
    gt = [_square()]
    for d in (1.0, 0.03):
        pred = [_square().apply_translation([0, 0, d])]
        out = evaluate_object(pred, gt, MetricsConfig(num_points=4000, frame="none"))
        # every nearest neighbour is at least d away (the planes' distance), and a sample spacing (0.03) more at most
        assert 2 * d <= out["chamfer"] <= 2 * d + 0.015
        assert out["fscore@0.1"] == (1.0 if d < 0.05 else 0.0)


def test_frames_each_side_alone_or_both_by_the_ground_truth():
    """"each" is blind to a prediction's scale and place (a far-off fragment shrinks the rest); "gt" (PartCrafter's)
    applies the GT's normalisation to both, so the same prediction moved off scores low and the fragment costs little."""
    box = trimesh.creation.box(extents=[1, 1, 1])
    half = box.copy().apply_scale(0.5)
    fragment = trimesh.creation.icosphere(0, radius=0.01).apply_translation([2.0, 0.5, 0.5])
    each, gt = MetricsConfig(num_points=20_000), MetricsConfig(num_points=20_000, frame="gt")
    assert evaluate_object([half], [box], each)["fscore@0.1"] == 1.0  # the same shape at another scale
    assert evaluate_object([half], [box], gt)["fscore@0.1"] < 0.2
    assert evaluate_object([box, fragment], [box], each)["fscore@0.1"] < 0.3  # the box shrunk to a third of the frame
    with pytest.warns(InputWarning, match="outside the voxel grid"):  # self-IoU clips the far fragment to the grid's border
        assert evaluate_object([box, fragment], [box], gt)["fscore@0.1"] > 0.99
    shifted = box.copy().apply_translation([0.025, 0, 0])  # 0.05 in the GT's frame (its side scaled to 2)
    copy = evaluate_object([box.copy()], [box], each)["chamfer"]
    assert evaluate_object([shifted], [box], each)["chamfer"] == pytest.approx(copy, rel=1e-6)  # the copy's score
    # in the GT's frame a third of each surface (the faces normal to x) lies 0.05 from the other: about 2 * 0.05 / 3
    assert 0.02 < evaluate_object([shifted], [box], gt)["chamfer"] < 0.06
    with pytest.raises(ConfigError, match="frame must be one of each, gt, none"):
        MetricsConfig(frame="partcrafter")
    with pytest.raises(ConfigError, match="threshold must be finite and > 0, got 0"):
        fscore(np.zeros((1, 3)), np.zeros((1, 3)), tau=0)  # it scored 0 (nothing is closer than 0)


def test_point_metrics_known_values_and_symmetry():
    rng = np.random.default_rng(0)
    a = rng.random((3000, 3))
    b = rng.random((2000, 3)) + np.array([0.5, 0, 0])
    assert chamfer(a, b) == pytest.approx(chamfer(b, a))
    assert fscore(a, b, 0.1) == pytest.approx(fscore(b, a, 0.1))
    # Two single points one unit apart: CD counts the unit once in each direction.
    assert chamfer(np.zeros((1, 3)), np.array([[1.0, 0, 0]])) == pytest.approx(2.0)
    # Tensors are accepted too, and the combined call agrees with the single ones.
    out = point_metrics(torch.from_numpy(a), torch.from_numpy(b), taus=(0.1,))
    assert out["chamfer"] == pytest.approx(chamfer(a, b))
    assert out["fscore@0.1"] == pytest.approx(fscore(a, b, 0.1))
    # (n, 6) surface samples use their xyz; channel-first (3, n) was read as 3 points of n coordinates (CD 0.97 for 0.32)
    assert chamfer(np.hstack([a, rng.random((3000, 3))]), b) == pytest.approx(chamfer(a, b))
    with pytest.raises(InputError, match=r"\(n, >=3\) point array, got shape \(3, 3000\): channel-first\? pass its transpose"):
        chamfer(a.T, b)
    with pytest.raises(InputError, match="for meshes, object_metrics or surface_metrics"):
        chamfer(trimesh.creation.box(), trimesh.creation.icosphere())


def test_fscore_is_the_harmonic_mean_of_precision_and_recall():
    # GT = half of the prediction's points: recall 1, precision about 0.55, where the arithmetic mean would differ.
    rng = np.random.default_rng(1)
    pred = rng.random((3000, 3))
    gt = pred[pred[:, 0] < 0.5]
    d = np.linalg.norm(pred[:, None] - gt[None], axis=-1)  # (P, G), brute force
    precision, recall = float((d.min(1) < 0.1).mean()), float((d.min(0) < 0.1).mean())
    assert recall == 1.0 and 0.5 < precision < 0.7
    assert fscore(pred, gt, 0.1) == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-12)
    assert chamfer(pred, gt) == pytest.approx(float(d.min(1).mean() + d.min(0).mean()), abs=1e-12)


def test_metrics_are_deterministic_by_seed_and_symmetric_on_meshes():
    a = [trimesh.creation.box(extents=[1, 1, 1])]
    b = [trimesh.creation.cylinder(radius=0.5, height=1.2, sections=32)]
    ab1, ab2 = evaluate_object(a, b, FAST), evaluate_object(a, b, FAST)
    assert ab1 == ab2
    ba = evaluate_object(b, a, FAST)
    assert ab1["chamfer"] == pytest.approx(ba["chamfer"], rel=0.02)  # each side its own samples: equal to the noise
    assert 0 < ab1["chamfer"] < 0.5


def test_normalisation_makes_metrics_scale_invariant():
    a = [trimesh.creation.box(extents=[1, 1, 1])]
    b = [trimesh.creation.cylinder(radius=0.5, height=1.2, sections=32)]
    big = [m.copy().apply_scale(10.0).apply_translation([5, 5, 5]) for m in b]
    assert evaluate_object(a, big, FAST)["chamfer"] == pytest.approx(evaluate_object(a, b, FAST)["chamfer"], rel=1e-6)


def test_self_iou_disjoint_nested_and_half_overlap():
    unit = trimesh.creation.box(extents=[1, 1, 1])
    far = trimesh.creation.box(extents=[1, 1, 1]).apply_translation([3, 0, 0])
    assert self_iou([unit, far]) == 0.0
    inner = trimesh.creation.box(extents=[0.5, 0.5, 0.5])
    # Volume ratio 1/8; voxels on the boundary shell make it slightly larger at pitch 2/64.
    assert self_iou([unit, inner], normalize=False) == pytest.approx(0.125, abs=0.02)
    shifted = trimesh.creation.box(extents=[1, 1, 1]).apply_translation([0.5, 0, 0])
    assert self_iou([unit, shifted], normalize=False) == pytest.approx(1 / 3, abs=0.03)
    assert self_iou([unit]) is None  # no pair: undefined, left out of means (not a perfect 0)


def test_voxelize_fills_the_volume():
    occ = voxelize_filled(trimesh.creation.icosphere(3, radius=0.8), resolution=64)
    expected = 4 / 3 * np.pi * 0.8**3 / (2 / 64) ** 3
    assert occ.sum() == pytest.approx(expected, rel=0.1)
    assert occ[32, 32, 32]  # the centre is filled, not only the shell


def test_surface_lattice_covers_each_triangle_at_the_spacing():
    """Every point lies on its triangle; every point of a triangle is within spacing / sqrt(3) of a lattice point
    (the lattice's cells are triangles of side <= spacing), corners included; one point per lattice node."""
    from scipy.spatial import cKDTree

    from moca3d.metrics import surface_lattice

    rng = np.random.default_rng(0)
    verts = rng.uniform(-1, 1, (3, 3))
    faces = np.array([[0, 1, 2]])
    spacing = 0.05
    points = surface_lattice(verts, faces, spacing)
    n = int(np.ceil(max(np.linalg.norm(verts[i] - verts[(i + 1) % 3]) for i in range(3)) / spacing))
    assert len(points) == 3 + (n + 1) * (n + 2) // 2  # the vertices, then the triangle's lattice
    normal = np.cross(verts[1] - verts[0], verts[2] - verts[0])
    assert np.abs((points - verts[0]) @ normal).max() < 1e-9 * np.linalg.norm(normal)  # in the triangle's plane
    w = rng.dirichlet([1, 1, 1], 20000)  # random points of the triangle
    dist, _ = cKDTree(points).query(w @ verts)
    assert dist.max() <= spacing / np.sqrt(3) + 1e-9
    assert surface_lattice(verts, np.zeros((0, 3), dtype=np.int64), spacing).shape == (3, 3)  # no faces: the vertices


def test_scene_has_instance_metrics():
    gt = [trimesh.creation.box(extents=[1, 1, 1]), trimesh.creation.box(extents=[1, 1, 1]).apply_translation([3, 0, 0])]
    pred = [gt[0].copy(), gt[1].copy().apply_translation([0, 0.2, 0])]
    out = evaluate_scene(pred, gt, FAST)
    assert len(out["instances"]) == 2
    assert out["instances"][0]["chamfer"] < 0.1  # the sampling floor of a 2-wide box at 5000 points
    assert out["instances"][1]["chamfer"] > 0.2  # 0.2 in a 1-wide box is 0.4 in its own frame (on two of six faces)
    assert out["instance_chamfer"] == pytest.approx((out["instances"][0]["chamfer"] + out["instances"][1]["chamfer"]) / 2)


def test_instance_metrics_are_measured_in_each_gt_instance_frame():
    """A square shifted by d along its normal: every nearest neighbour is at least d away, and at most a sample spacing
    more; in the GT instance's frame (largest side -> 2) the chamfer is 2 d (2 / side) plus under 0.015."""
    gt = [_square(1.0), _square(4.0).apply_translation([10, 0, 0])]
    pred = [gt[0].copy().apply_translation([0, 0, 0.02]), gt[1].copy().apply_translation([0, 0, 0.3])]
    per = instance_metrics(pred, gt, FAST)
    assert 0.08 <= per[0]["chamfer"] <= 0.08 + 0.015  # 0.04 per side: inside tau 0.05 for most points
    assert 0.3 <= per[1]["chamfer"] <= 0.3 + 0.015  # 0.15 per side: outside tau 0.1
    assert per[0]["fscore@0.1"] == 1.0 and per[0]["fscore@0.05"] > 0.9
    assert per[1]["fscore@0.1"] == per[1]["fscore@0.05"] == 0.0
    out = evaluate_scene(pred, gt, FAST)
    assert out["instance_chamfer"] == pytest.approx((per[0]["chamfer"] + per[1]["chamfer"]) / 2, rel=1e-9)
    assert out["instance_fscore@0.1"] == pytest.approx(0.5)


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError):
        chamfer(np.zeros((0, 3)), np.zeros((5, 3)))
    with pytest.raises(InputError):
        evaluate_object([], [trimesh.creation.box()], FAST)


def test_metric_settings_out_of_range_are_one_line_config_errors(tmp_path):
    from typer.testing import CliRunner

    from moca3d.cli import app
    from moca3d.errors import ConfigError

    for kwargs, message in [(dict(num_points=0), "num_points must be a whole number >= 1"), (dict(num_points=-5), "num_points must be a whole number >= 1"),
                            (dict(iou_resolution=0), "iou_resolution must be between 8 and 256"),
                            (dict(iou_resolution=-1), "iou_resolution must be between 8 and 256"),
                            (dict(iou_resolution=100_000), "iou_resolution must be between 8 and 256"),
                            (dict(taus=(0.1, 0.0)), "thresholds"), (dict(taus=(float("nan"),)), "thresholds")]:
        with pytest.raises(ConfigError, match=message):
            MetricsConfig(**kwargs)
    with pytest.raises(ConfigError, match="resolution must be >= 1"):
        voxelize_filled(trimesh.creation.box(), resolution=0)
    glb = tmp_path / "box.glb"
    trimesh.creation.box().export(glb)
    for option, value, message in [("--num-points", "0", "--num-points must be a whole number >= 1"), ("--num-points", "-5", "--num-points must be a whole number >= 1"),
                                   ("--iou-resolution", "0", "--iou-resolution must be between 8 and 256")]:
        result = CliRunner().invoke(app, ["evaluate", str(glb), str(glb), option, value])
        assert isinstance(result.exception, ConfigError) and message in str(result.exception), result.output


def test_scene_metrics_pair_prediction_i_with_instance_i_and_count_empty_ones():

    boxes = [trimesh.creation.box(extents=[0.4, 0.4, 0.4]).apply_translation([x, 0, 0]) for x in (-1.0, 0.0, 1.0)]
    config = MetricsConfig(num_points=20_000)
    out = evaluate_scene([boxes[0], trimesh.Trimesh(), boxes[2]], boxes, config)
    assert out["num_empty"] == 1 and out["num_pred"] == out["num_gt"] == 3
    assert out["instance_fscore@0.1"] == pytest.approx(2 / 3, abs=0.01)  # the empty one scores 0, counted in the mean
    assert out["instance_chamfer"] < 0.05  # the empty one is left out of the CD mean (the others: the sampling floor)
    swapped = evaluate_scene([boxes[2], trimesh.Trimesh(), boxes[0]], boxes, config)  # right shapes, wrong places
    assert swapped["instance_fscore@0.1"] == 0.0 and swapped["fscore@0.1"] == pytest.approx(out["fscore@0.1"], abs=0.01)
    nothing = evaluate_scene([trimesh.Trimesh()] * 3, boxes, config)
    assert nothing["fscore@0.1"] == 0.0 and nothing["chamfer"] == float("inf") and nothing["num_empty"] == 3
    # each instance's own scores, in instance order
    assert [i["empty"] for i in out["instances"]] == [False, True, False]
    assert [i["fscore@0.1"] for i in out["instances"]] == pytest.approx([1.0, 0.0, 1.0], abs=0.01)
    assert out["instances"][1]["chamfer"] is None and all(i["empty"] for i in nothing["instances"])


def test_categories_of_names_and_their_means():
    from moca3d.evaluation import by_category, category_of

    assert [category_of(n) for n in ("chair_10", "lamp_0", "my_part", "seat", "_3")] == ["chair", "lamp", "my_part", "seat", "_3"]
    rows = [dict(category="b", f=1.0), dict(category="a", f=0.0), dict(category="b", f=0.5)]
    assert by_category(rows, ("f",)) == {"a": {"count": 1, "f": 0.0}, "b": {"count": 2, "f": 0.75}}
    assert list(by_category(rows, ("f",))) == ["a", "b"]


def test_report_means_leave_all_empty_predictions_out_of_the_chamfer_and_count_them(capsys):
    from moca3d.commands.common import echo_means
    from moca3d.evaluation import by_category, means

    rows = [{"category": "chair", "chamfer": 0.2, "fscore@0.1": 0.8},
            {"category": "chair", "chamfer": float("inf"), "fscore@0.1": 0.0},  # every part empty
            {"category": "lamp", "chamfer": 0.4, "fscore@0.1": 0.6}]
    mean = means(rows, ("chamfer", "fscore@0.1"))
    assert mean == {"chamfer": pytest.approx(0.3), "fscore@0.1": pytest.approx(1.4 / 3), "all_empty": 1}
    cats = by_category(rows, ("chamfer", "fscore@0.1"))
    assert cats["chair"] == {"count": 2, "chamfer": pytest.approx(0.2), "fscore@0.1": pytest.approx(0.4), "all_empty": 1}
    assert means(rows[1:2], ("chamfer",)) == {"chamfer": None, "all_empty": 1}
    echo_means(means(rows[1:2], ("chamfer", "fscore@0.1")), 10)
    out = capsys.readouterr().out
    assert "   chamfer: -" in out and "fscore@0.1: 0.0000" in out and "1 with every component empty" in out
    assert "inf" not in out and "nan" not in out


def test_balanced_scene_scores_weigh_each_instance_alike():
    """A large table and a small box moved off its place: by area the scene still scores F@0.1 near 1 (the box's
    points are a sliver of the samples), balanced (num_points / N on each instance) P = R = 1/2, so F = 1/2 (abs 0.02)."""
    table = trimesh.creation.box(extents=[1.6, 0.1, 1.6])
    small = trimesh.creation.box(extents=[0.1, 0.1, 0.1]).apply_translation([0.5, 0.5, 0.5])
    moved = small.copy().apply_translation([-1.0, 0.0, -1.0])
    out = evaluate_scene([table.copy(), moved], [table, small], MetricsConfig(num_points=4000, frame="gt"))
    assert out["fscore@0.1"] > 0.95
    assert out["balanced_fscore@0.1"] == pytest.approx(0.5, abs=0.02)
    assert out["balanced_chamfer"] > 5 * out["chamfer"]
    same = evaluate_scene([table.copy(), small.copy()], [table, small], MetricsConfig(num_points=4000))
    assert same["balanced_chamfer"] < 0.05 and same["balanced_fscore@0.05"] > 0.9  # the sampling floor
    # an empty instance adds no points: its GT points find only the table's (recall 1/2, precision 1)
    half = evaluate_scene([table.copy(), trimesh.Trimesh()], [table, small], MetricsConfig(num_points=4000, frame="gt"))
    assert half["balanced_fscore@0.1"] == pytest.approx(2 * 0.5 / 1.5, abs=0.02)
    nothing = evaluate_scene([trimesh.Trimesh()] * 2, [table, small], FAST)
    assert nothing["balanced_fscore@0.1"] == 0.0 and nothing["balanced_chamfer"] == float("inf")


def test_a_zero_area_placeholder_is_an_empty_part_and_self_iou_needs_two():
    """PartCrafter's dummy part (one degenerate triangle) made evaluate_scene raise 'cannot sample a surface with zero
    area' and counted as a part; a prediction with under two non-empty parts scored self-IoU 0.0, the best value, for a
    failure: now None, left out of the report means."""
    from moca3d.evaluation import means
    from moca3d.metrics import object_metrics

    boxes = [trimesh.creation.box(extents=[0.4] * 3).apply_translation([x, 0, 0]) for x in (-1.0, 1.0)]
    dummy = trimesh.Trimesh([[0, 0, 0]], [[0, 0, 0]], process=False)
    scene = evaluate_scene([boxes[0], dummy], boxes, FAST)
    assert scene["num_empty"] == 1 and scene["instances"][1]["empty"] and scene["self_iou"] is None
    one = object_metrics([boxes[0], dummy], boxes, FAST)
    assert (one["num_pred"], one["num_empty"], one["self_iou"]) == (1, 1, None)
    assert object_metrics([dummy], boxes, FAST)["self_iou"] is None
    two = object_metrics(boxes, boxes, FAST)
    assert two["self_iou"] == 0.0
    assert means([one, two], ("self_iou",))["self_iou"] == 0.0  # the mean of the one defined value


def test_evaluate_json_names_its_protocol(tmp_path):
    """Numbers without their convention cannot be compared with a paper's: the JSON says how they were measured."""
    import json

    from typer.testing import CliRunner

    from moca3d.cli import app

    glb = tmp_path / "box.glb"
    trimesh.creation.box().export(glb)
    result = CliRunner().invoke(app, ["evaluate", str(glb), str(glb), "--num-points", "500", "--seed", "3", "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    proto = report["protocol"]
    assert (proto["num_points"], proto["seed"], proto["taus"]) == (500, 3, [0.1, 0.05])
    assert "not squared" in proto["chamfer"] and proto["frame"].startswith("each:") and "64^3" in proto["self_iou"]
    assert report["self_iou"] is None  # one component
    text = CliRunner().invoke(app, ["evaluate", str(glb), str(glb), "--num-points", "500"])
    assert "self_iou: n/a" in text.output


def test_a_loaded_scene_file_is_scored_in_its_own_order_and_a_trimesh_scene_refused(tmp_path):
    """evaluate_scene(trimesh.load('scene.glb'), meshes) paired instance i with the wrong GT instance (trimesh lists a
    GLB's nodes in reverse) and dropped its empty nodes: instance F 0 for a file scored against its own meshes. A path is
    read in the file's order with its empty parts in place; a trimesh.Scene is refused in one line."""
    from moca3d.geometry.mesh_io import save_components
    from moca3d.metrics import MetricsConfig, object_metrics

    boxes = [trimesh.creation.box(extents=[0.5] * 3).apply_translation([2.0 * i, 0, 0]) for i in range(4)]
    made = [boxes[0], boxes[1], trimesh.Trimesh(), boxes[3]]
    path = tmp_path / "scene.glb"
    save_components(path, made, [f"instance_{i:02d}" for i in range(4)], metadata={"saved_by": "test"})  # as a generation
    config = MetricsConfig(num_points=20_000)
    out = evaluate_scene(path, boxes, config)
    assert [i["empty"] for i in out["instances"]] == [False, False, True, False]
    assert out["instance_fscore@0.1"] == pytest.approx(0.75, abs=0.01)
    assert object_metrics(str(path), boxes, config)["num_empty"] == 1
    with pytest.raises(InputError, match="pass the file's path"):
        evaluate_scene(trimesh.load(path), boxes, config)
    with pytest.raises(InputError, match="got a list holding a ndarray"):
        object_metrics([np.zeros((4, 3))], boxes, config)


def test_metrics_config_takes_one_threshold_and_refuses_fractional_points():
    assert MetricsConfig(taus=0.1, num_points=100).taus == (0.1,)
    with pytest.raises(ConfigError, match="whole number"):
        MetricsConfig(num_points=1000.5)


def test_evaluate_in_the_ground_truths_frame_warns_of_a_prediction_in_other_coordinates(tmp_path):
    """--frame gt with a prediction still in the source's coordinates (a prepared asset's mesh.glb is normalised)
    scored F 0.15 for a perfect match without a word: the boxes' overlap (IoU 0.34 here) is named in one warning."""
    import warnings

    from typer.testing import CliRunner

    from moca3d.cli import app
    from moca3d.geometry.mesh_io import save_components
    from moca3d.metrics import box_iou

    part = [trimesh.creation.box(extents=[2, 2, 2])]
    source = [part[0].copy().apply_scale(1 / 0.8).apply_translation([0.75, 0, 0])]  # normalised = (source - c) * 0.8
    assert box_iou(part, part) == pytest.approx(1.0) and box_iou(source, part, pad=0) == pytest.approx(6 / (8 + 2.5**3 - 6))
    flat = [trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]])]
    assert box_iou(flat, flat) == pytest.approx(1.0)  # a flat box has no volume: it was 0, a false alarm
    save_components(tmp_path / "gt.glb", part, ["box"])
    save_components(tmp_path / "source.glb", source, ["box"])
    args = ["--frame", "gt", "--num-points", "2000", "--iou-resolution", "16"]
    with pytest.warns(InputWarning, match=r"--frame gt: the prediction's box overlaps the ground truth's by 0.35 \(IoU\): "
                                          r"is source.glb in gt.glb's frame\?"):
        assert CliRunner().invoke(app, ["evaluate", str(tmp_path / "source.glb"), str(tmp_path / "gt.glb"), *args]).exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # its own frame: no warning (nor in the default frame)
        for pred in ("gt.glb", "source.glb"):
            extra = args if pred == "gt.glb" else args[2:]
            assert CliRunner().invoke(app, ["evaluate", str(tmp_path / pred), str(tmp_path / "gt.glb"), *extra]).exit_code == 0


def test_standard_errors_of_report_means_and_their_printed_form(capsys):
    """Reports gave means alone: whether 0.548 vs 0.510 is a difference could not be read from them. The standard
    error is the sample SD / sqrt(n) over the values the mean averages (inf chamfers left out as there); under two: None."""
    from moca3d.commands.common import echo_means
    from moca3d.evaluation import means, standard_errors

    rows = [{"chamfer": 0.2, "fscore@0.1": 0.8}, {"chamfer": float("inf"), "fscore@0.1": 0.0}, {"chamfer": 0.4, "fscore@0.1": 0.6}]
    se = standard_errors(rows, ("chamfer", "fscore@0.1"))
    assert se["chamfer"] == pytest.approx(np.std([0.2, 0.4], ddof=1) / np.sqrt(2))
    assert se["fscore@0.1"] == pytest.approx(np.std([0.8, 0.0, 0.6], ddof=1) / np.sqrt(3))
    assert standard_errors(rows[:1], ("chamfer",)) == {"chamfer": None}
    echo_means(means(rows, ("chamfer", "fscore@0.1")), 10, "asset", se)
    out = capsys.readouterr().out
    assert f"fscore@0.1: {np.mean([0.8, 0.0, 0.6]):.4f} ± {se['fscore@0.1']:.4f}" in out
    assert "standard error of the mean over the assets" in out


def test_evaluate_stands_a_z_up_ground_truth_up_before_scoring(tmp_path):
    """A source mesh exported Z-up scored 0.46 against a perfect Y-up prediction (the shapes lay at right angles):
    --gt-up-axis z turns it as prepare --up-axis z does, and the same pair scores as the prediction against itself."""
    import json

    from typer.testing import CliRunner

    from moca3d.cli import app
    from moca3d.errors import ConfigError
    from moca3d.geometry.mesh_io import UP_ROTATIONS, save_components

    parts = [trimesh.creation.box(extents=[0.4, 2.0, 0.4]), trimesh.creation.box(extents=[1.0, 0.2, 1.0]).apply_translation([0, 1.1, 0])]
    turn = np.eye(4)
    turn[:3, :3] = UP_ROTATIONS["z"].T  # Y up -> Z up: how a CAD tool would have exported the ground truth
    save_components(tmp_path / "pred.glb", parts, ["post", "top"])
    save_components(tmp_path / "gt_zup.glb", [p.copy().apply_transform(turn) for p in parts], ["post", "top"])
    base = ["evaluate", str(tmp_path / "pred.glb"), str(tmp_path / "gt_zup.glb"), "--num-points", "5000", "--iou-resolution", "16",
            "--json", "-"]
    lying = json.loads(CliRunner().invoke(app, base).stdout)
    standing = json.loads(CliRunner().invoke(app, [*base, "--gt-up-axis", "z"]).stdout)
    assert lying["fscore@0.1"] < 0.6 and standing["fscore@0.1"] == 1.0 and standing["gt_up_axis"] == "z"
    bad = CliRunner().invoke(app, [*base, "--gt-up-axis", "w"])
    assert isinstance(bad.exception, ConfigError) and "--gt-up-axis must be one of y, z, -z, x, -y, got 'w'" in str(bad.exception)
