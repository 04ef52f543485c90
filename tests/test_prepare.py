"""`moca3d prepare`: format, bad-input reporting, resume after interruption, parallel = serial."""

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import trimesh
from typer.testing import CliRunner

import moca3d.data.prepare as prep
from conftest import TINY_PREPARE
from moca3d.cli import app
from moca3d.data.dataset import AssetDataset, ComponentDataset
from moca3d.errors import ConfigError, InputError
from moca3d.geometry.inside import QueryConfig
from moca3d.geometry.mesh_io import load_components, save_glb, save_separate
from moca3d.geometry.render import RenderConfig
from moca3d.geometry.sampling import SurfaceSamplingConfig

TINY = TINY_PREPARE


def _manifest(root):
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def _report(root):
    return [json.loads(line) for line in (root / "report.jsonl").read_text().splitlines()]


def _mesh_folder(tmp_path):
    """A folder with two good assets and five bad ones."""
    src = tmp_path / "src"
    src.mkdir()
    box, ball = trimesh.creation.box(), trimesh.creation.icosphere(1).apply_translation([2, 0, 0])
    save_glb(src / "good.glb", [box, ball], ["box", "ball"])
    save_separate(src / "folder_asset", [box, ball.copy().apply_translation([0, 2, 0])], ["a", "b"])
    (src / "junk.glb").write_bytes(b"\x00garbage")
    (src / "empty.obj").write_text("# nothing here\n")
    nan = trimesh.creation.box()
    nan.vertices[3] = [np.nan, np.nan, np.nan]
    save_glb(src / "nan.glb", [nan, box], ["nan", "box"])
    flat = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [[0, 1, 2]], process=False)
    save_glb(src / "zero_area.glb", [box, flat], ["box", "flat"])
    save_glb(src / "too_many.glb", [box.copy().apply_translation([3 * i, 0, 0]) for i in range(4)], list("abcd"))
    (src / "notes.txt").write_text("not a mesh")
    return src


def test_prepare_folder_writes_the_format_and_reports_bad_assets(tmp_path):
    root = tmp_path / "ds"
    summary = prep.prepare(prep.folder_jobs(_mesh_folder(tmp_path)), root, TINY, progress=False)
    assert (summary.processed, summary.skipped) == (3, 4)
    assert [r["id"] for r in _manifest(root)] == ["folder_asset", "good", "zero_area"]  # its flat part left out, said
    assert json.loads((root / "assets" / "zero_area" / "meta.json").read_text())["dropped_components"] == ["flat"]
    reasons = {r["source"].split("/")[-1]: r["reason"] for r in _report(root)}
    assert set(reasons) == {"junk.glb", "empty.obj", "nan.glb", "too_many.glb"}
    assert "non-finite" in reasons["nan.glb"]  # a corrupt file is refused, not trimmed
    assert "exceed" in reasons["too_many.glb"]
    assert all("\n" not in r for r in reasons.values())

    folder = root / "assets" / "good"
    with np.load(folder / "samples.npz") as s:
        assert s["surface"].shape == (2, 128, 6) and s["surface"].dtype == np.float32
        assert s["query_points"].shape == (2, 96, 3) and s["query_sdf"].shape == (2, 96)
        assert np.abs(s["surface"][..., :3]).max() <= 1.0 + 1e-5  # normalised frame
    meshes, names = load_components(folder / "mesh.glb")
    assert names == ["box", "ball"]
    with np.load(folder / "samples.npz") as s:  # each part's supervision belongs to that part (normalised frame)
        for i, own in enumerate(meshes):
            points, normals = s["surface"][i, :, :3].astype(np.float64), s["surface"][i, :, 3:].astype(np.float64)
            _, on_own, _ = trimesh.proximity.closest_point(own, points)
            _, on_other, _ = trimesh.proximity.closest_point(meshes[1 - i], points)
            assert on_own.max() < 1e-5 and on_other.min() > 0.05, i  # float32 storage: 1e-5
            assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-4)
            assert np.all(np.einsum("pc,pc->p", normals, points - own.centroid) > 0), i  # convex parts: outward
            exact = trimesh.proximity.signed_distance(own, s["query_points"][i].astype(np.float64))  # positive inside
            np.testing.assert_allclose(s["query_sdf"][i], exact, atol=1e-5)
            assert (s["query_sdf"][i] > 0).any() and (s["query_sdf"][i] < 0).any()
    verts = np.concatenate([m.vertices for m in meshes])
    assert np.isclose(np.ptp(verts, axis=0).max(), 2.0, atol=1e-5)
    norm = json.loads((folder / "normalization.json").read_text())
    assert np.isclose(norm["scale"], 2.0 / 3.5)  # the source spans 3.5 units in x
    assert json.loads((folder / "camera.json").read_text())["width"] == 48

    again = prep.prepare(prep.folder_jobs(tmp_path / "src"), root, TINY, progress=False)
    assert (again.processed, again.skipped, again.already_done) == (0, 0, 7)


def test_prepare_resumes_after_an_interruption(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    jobs = prep.procedural_jobs("objects", 4, seed=5)
    real_build, calls = prep.build_asset, []

    def interrupted(job, out_dir, config):
        calls.append(job.id)
        if len(calls) == 3:
            (out_dir / "samples.npz").write_bytes(b"half-written")
            raise KeyboardInterrupt  # a Ctrl-C in the middle of the third asset
        return real_build(job, out_dir, config)

    monkeypatch.setattr(prep, "build_asset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(jobs, root, TINY.__class__(**{**TINY.__dict__, "max_components": 32}), progress=False)
    assert [r["id"] for r in _manifest(root)] == [j.id for j in jobs[:2]]
    stamps = {j.id: (root / "assets" / j.id / "samples.npz").stat().st_mtime_ns for j in jobs[:2]}

    monkeypatch.setattr(prep, "build_asset", real_build)
    config = TINY.__class__(**{**TINY.__dict__, "max_components": 32})
    summary = prep.prepare(jobs, root, config, progress=False)
    assert (summary.processed, summary.already_done) == (2, 2)
    assert [r["id"] for r in _manifest(root)] == [j.id for j in jobs]
    assert all((root / "assets" / i / "samples.npz").stat().st_mtime_ns == t for i, t in stamps.items())
    assert not list((root / "assets").glob(".tmp-*"))  # the half-written folder was cleaned up


def test_parallel_prepare_matches_serial_and_datasets_read_it(tmp_path):
    config = TINY.__class__(**{**TINY.__dict__, "max_components": 32})
    jobs = prep.procedural_jobs("scenes", 2, seed=0) + prep.procedural_jobs("objects", 1, seed=0)
    prep.prepare(jobs, tmp_path / "serial", config, workers=1, progress=False)
    prep.prepare(jobs, tmp_path / "parallel", config, workers=2, progress=False)
    assert _manifest(tmp_path / "serial") == _manifest(tmp_path / "parallel")
    for job in jobs:
        a = np.load(tmp_path / "serial" / "assets" / job.id / "samples.npz")
        b = np.load(tmp_path / "parallel" / "assets" / job.id / "samples.npz")
        assert all(np.array_equal(a[k], b[k]) for k in ("surface", "query_points", "query_sdf"))

    records = _manifest(tmp_path / "serial")
    assets = AssetDataset(tmp_path / "serial", split="train", num_surface=64, num_queries=32)
    assert len(assets) == 3
    item = assets[0]
    n = item["num_components"]
    assert item["surface"].shape == (n, 64, 6) and item["query_points"].shape == (n, 32, 3)
    assert item["query_sdf"].shape == (n, 32) and item["image"].shape == (3, 48, 48)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert int(item["mask"].max()) <= n and int(item["mask"].max()) > 0
    parts = ComponentDataset(tmp_path / "serial", split="all")
    assert len(parts) == sum(r["num_components"] for r in records)
    one = parts[1]
    assert one["surface"].shape == (128, 6) and one["query_sdf"].shape == (96,)
    assert one["name"] == records[0]["names"][1]
    with pytest.raises(InputError, match="no manifest.jsonl"):
        AssetDataset(tmp_path / "missing")


def test_split_is_a_stable_hash_of_the_id_with_the_configured_shares():
    ids = [f"object_{i:06d}" for i in range(20000)]
    splits = [prep.split_of(i, 0.1, 0.05) for i in ids]
    assert splits == [prep.split_of(i, 0.1, 0.05) for i in reversed(ids)][::-1]  # by id alone, in any order
    n = len(ids)
    for name, p in (("val", 0.1), ("test", 0.05), ("train", 0.85)):
        share = splits.count(name) / n
        assert abs(share - p) < 5 * (p * (1 - p) / n) ** 0.5, (name, share)
    # growing the test share keeps every test asset in test (a held-out asset never leaks into training)
    wider = [prep.split_of(i, 0.1, 0.1) for i in ids]
    assert all(w == "test" for s, w in zip(splits, wider) if s == "test")


def test_cli_prepare_and_evaluate(tmp_path):
    runner = CliRunner()
    root = tmp_path / "ds"
    result = runner.invoke(app, ["prepare", "--procedural", "objects", "--count", "1", "--out", str(root),
                                 "--num-surface", "64", "--num-queries", "64", "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert "splits: 1 train, 0 val, 0 test (val and test empty: prepare into a new --output with a larger --val-fraction and --test-fraction for a held-out split; a dataset keeps its split fractions)" in result.output
    (asset,) = _manifest(root)
    glb = root / "assets" / asset["id"] / "mesh.glb"
    result = runner.invoke(app, ["evaluate", str(glb), str(glb), "--json", "-", "--num-points", "2000"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["chamfer"] < 0.1 and metrics["fscore@0.1"] > 0.98  # itself: the sampling floor at 2000 points
    assert metrics["num_pred"] == asset["num_components"]
    result = runner.invoke(app, ["evaluate", str(glb), str(glb), "--json", str(tmp_path / "m" / "metrics.json"), "--num-points", "2000"])
    assert result.exit_code == 0, result.output
    assert "fscore@0.1" in result.output and json.loads((tmp_path / "m" / "metrics.json").read_text()) == metrics
    result = runner.invoke(app, ["evaluate", str(glb), str(glb), "--json", str(glb / "metrics.json"), "--num-points", "2000"])
    assert isinstance(result.exception, ConfigError) and str(result.exception) == f"--json {glb / 'metrics.json'}: {glb} is a file, not a folder"


def test_prepare_asks_to_raise_only_the_fractions_that_were_not_set_to_zero(tmp_path):
    """--val-fraction 0 asks for no val split: the hint for an empty held-out split no longer says to raise it."""
    result = CliRunner().invoke(app, ["prepare", "--procedural", "objects", "--count", "1", "--out", str(tmp_path / "ds"),
                                      "--num-surface", "64", "--num-queries", "64", "--image-size", "32", "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert "splits: 1 train, 0 val, 0 test (test empty: prepare into a new --output with a larger --test-fraction for a held-out split; a dataset keeps its split fractions)" in result.output
    assert "--val-fraction" not in result.output


def test_every_source_gets_its_own_asset_and_open_parts_are_reported(tmp_path):
    """Names that clean to the same id (other scripts, spaces) stay separate assets; a part without volume is skipped."""
    src = tmp_path / "src"
    src.mkdir()
    box = trimesh.creation.box()
    names = ["椅子", "桌子", "ランプ", "a b", "a_b"]
    for i, name in enumerate(names):  # each its own shape: a copy of another file is left out (`resume_jobs`)
        box.copy().apply_scale(1 + 0.1 * i).export(src / f"{name}.obj")
    plane = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]], process=False)
    save_glb(src / "open.glb", [box, plane.apply_translation([2, 0, 0])], ["box", "plane"])
    jobs = prep.folder_jobs(src)
    assert len({job.id for job in jobs}) == len(jobs) == 6
    root = tmp_path / "ds"
    summary = prep.prepare(jobs, root, TINY, progress=False)
    assert (summary.processed, summary.skipped) == (5, 1)
    assert sorted(record["id"] for record in _manifest(root)) == sorted(job.id for job in jobs if job.source.endswith(".obj"))
    (report,) = _report(root)
    assert report["source"].endswith("open.glb") and "component 'plane' encloses no volume" in report["reason"]
    with pytest.raises(InputError, match="no such file or folder"):
        prep.folder_jobs(tmp_path / "missing")


def test_cli_evaluate_scene_pairs_by_name_and_refuses_mixed_units(tmp_path):
    box, ball = trimesh.creation.box(), trimesh.creation.icosphere(2).apply_translation([3, 0, 0])
    save_glb(tmp_path / "gt.glb", [box, ball], ["box", "ball"])
    save_glb(tmp_path / "swapped.glb", [ball, box], ["ball", "box"])
    save_glb(tmp_path / "centimetres.glb", [box.copy().apply_scale(100), ball.copy().apply_scale(100)], ["box", "ball"])
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(tmp_path / "swapped.glb"), str(tmp_path / "gt.glb"), "--scene", "--json", "-",
                                 "--num-points", "20000"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["instance_fscore@0.1"] == pytest.approx(1.0, abs=0.01)  # to the sampling floor
    assert json.loads(result.stdout)["paired_by_name"] is True
    assert (json.loads(result.stdout)["frame"], json.loads(result.stdout)["num_points"]) == ("each", 20000)  # how it was scored
    result = runner.invoke(app, ["evaluate", str(tmp_path / "centimetres.glb"), str(tmp_path / "gt.glb"), "--scene", "--num-points", "2000"])
    assert isinstance(result.exception, InputError) and "(100x); export both in one frame and unit" in str(result.exception)
    assert "came out empty" not in str(result.exception)  # the prediction is the bigger one: units, not emptiness
    crumb = trimesh.creation.icosphere(1, radius=0.02)  # a generation whose instances came out as two crumbs
    save_glb(tmp_path / "crumbs.glb", [crumb, crumb.copy().apply_translation([0.05, 0, 0])], ["box", "ball"])
    result = runner.invoke(app, ["evaluate", str(tmp_path / "crumbs.glb"), str(tmp_path / "gt.glb"), "--scene", "--num-points", "2000"])
    assert isinstance(result.exception, InputError) and "or most of the prediction came out empty" in str(result.exception)



def test_cli_evaluate_scene_keeps_an_empty_generated_instance_in_its_place(tmp_path):
    """A generation saves an empty component as an empty named node: instance i stays i, scored F = 0."""
    boxes = [trimesh.creation.box(extents=[0.4] * 3).apply_translation([x, 0, 0]) for x in (-1.0, 0.0, 1.0)]
    names = ["part_0", "part_1", "part_2"]
    save_glb(tmp_path / "gt.glb", boxes, names)
    save_glb(tmp_path / "pred.glb", [boxes[0], trimesh.Trimesh(), boxes[2]], names, metadata={"verb": "generate-scene"})
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pred.glb"), str(tmp_path / "gt.glb"), "--scene", "--json", "-",
                                      "--num-points", "20000"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["num_pred"] == out["num_gt"] == 3 and out["num_empty"] == 1
    assert [i["empty"] for i in out["instances"]] == [False, True, False]
    assert out["instance_fscore@0.1"] == pytest.approx(2 / 3, abs=0.01)  # the empty one scores 0 (the others: to the floor)
    printed = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pred.glb"), str(tmp_path / "gt.glb"), "--scene", "--num-points", "2000"])
    assert printed.exit_code == 0 and "instance part_1: empty" in printed.output


def test_cli_evaluate_counts_empty_parts_and_scores_the_others(tmp_path):
    """Object mode reads a generation's empty part in place too: counted in num_empty, the fused surface of the rest
    scored as if it were absent (same seed, exact)."""
    boxes = [trimesh.creation.box(extents=[0.4] * 3).apply_translation([x, 0, 0]) for x in (-1.0, 0.0, 1.0)]
    save_glb(tmp_path / "gt.glb", boxes, ["a", "b", "c"])
    save_glb(tmp_path / "pred.glb", [boxes[0], trimesh.Trimesh(), boxes[2]], ["a", "b", "c"], metadata={"verb": "generate"})
    save_glb(tmp_path / "two.glb", [boxes[0], boxes[2]], ["a", "c"])
    runner = CliRunner()
    scores = [json.loads(runner.invoke(app, ["evaluate", str(tmp_path / name), str(tmp_path / "gt.glb"), "--json", "-",
                                             "--num-points", "2000"]).stdout) for name in ("pred.glb", "two.glb")]
    assert scores[0]["num_empty"] == 1 and scores[1]["num_empty"] == 0
    assert scores[0]["fscore@0.1"] == scores[1]["fscore@0.1"] < 1.0
    result = runner.invoke(app, ["evaluate", str(tmp_path / "pred.glb"), str(tmp_path / "gt.glb"), "--json", str(tmp_path / "gt.glb" / "x.json")])
    assert "is a file, not a folder" in str(result.exception), result.output

def test_bad_prepare_settings_fail_before_any_work(tmp_path):
    from moca3d.errors import ConfigError

    bad = [
        (dict(val_fraction=1.5), "--val-fraction must be between 0 and 1, got 1.5"),
        (dict(val_fraction=0.6, test_fraction=0.6), "--val-fraction + --test-fraction must be at most 1"),
        (dict(surface=SurfaceSamplingConfig(num_points=0)), "--num-surface must be >= 1, got 0"),
        (dict(surface=SurfaceSamplingConfig(sharp_fraction=2.0)), "--sharp-fraction must be between 0 and 1, got 2.0"),
        (dict(queries=QueryConfig(num_queries=-1)), "--num-queries must be >= 1, got -1"),
        (dict(render=RenderConfig(size=0)), "--image-size must be at least 16 pixels, got 0"),
        (dict(max_components=0), "--max-components must be >= 1, got 0"),
        (dict(kind="room"), "--kind must be 'object' or 'scene'"),
        (dict(scene_objects=(5, 2)), "scenes hold 2 to 32 objects, got 5 to 2 (--scene-objects MIN MAX)"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            prep.PrepareConfig(**kwargs)
    runner = CliRunner()
    for args, message in [(["--image-size", "0"], "--image-size must be at least 16"), (["--val-fraction", "1.5"], "--val-fraction")]:
        result = runner.invoke(app, ["prepare", "--procedural", "objects", "--count", "1", "-o", str(tmp_path / "ds"), *args])
        assert isinstance(result.exception, ConfigError) and message in str(result.exception), result.output
    assert not (tmp_path / "ds").exists()  # nothing written, no per-asset skips reported
    existing = tmp_path / "existing_file.glb"
    existing.write_text("")
    result = runner.invoke(app, ["prepare", "--procedural", "objects", "--count", "1", "-o", str(existing)])
    assert isinstance(result.exception, ConfigError) and f"output {existing} is a file" in str(result.exception)


def test_prepare_workers_leave_ctrl_c_to_the_parent():
    """Workers start with SIGINT ignored (a Ctrl+C reaches the whole process group: each worker printed a traceback),
    and the parent's own handler is back once they have started."""
    import multiprocessing as mp
    import signal

    before = signal.getsignal(signal.SIGINT)
    with prep._workers_ignore_sigint():
        quiet = mp.get_context("spawn").Pool(1)
    entered = []
    real = prep._workers_ignore_sigint

    @contextlib.contextmanager
    def recorded():
        with real():
            entered.append(True)
            yield

    with pytest.MonkeyPatch.context() as patch:  # prepare's own pool starts inside it
        patch.setattr(prep, "_workers_ignore_sigint", recorded)
        assert list(prep._results([], Path("unused"), TINY, workers=2)) == [] and entered == [True]
    assert signal.getsignal(signal.SIGINT) is before
    loud = mp.get_context("spawn").Pool(1)  # the same pool started plainly: Python's KeyboardInterrupt handler
    with quiet, loud:
        assert quiet.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN
        assert loud.apply(signal.getsignal, (signal.SIGINT,)) != signal.SIG_IGN


def test_a_split_list_decides_every_assets_split_before_and_after(tmp_path):
    """Splits came only from a hash of the id (a benchmark's published test set could not be kept): --splits takes a
    list (JSON or `NAME SPLIT` lines; by id, source name or stem), re-splits assets prepared before, puts unlisted ones
    in train (named), warns of listed names that match no asset, and a later run must bring a list again."""
    from moca3d.errors import InputWarning

    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(["chair_a", "chair_b", "table_a", "lamp_a"]):
        trimesh.creation.box().apply_scale(1 + 0.2 * i).export(src / f"{name}.obj")
    root = tmp_path / "ds"
    args = ["prepare", str(src), "-o", str(root), "--num-surface", "64", "--num-queries", "64", "--image-size", "32"]
    assert CliRunner().invoke(app, args).exit_code == 0  # hashed splits first
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["chair_a.obj", "table_a"], "test": ["chair_b", "sofa_z"]}))
    with pytest.warns(InputWarning, match=r"splits.json: 1 listed name\(s\) match no asset here .*: sofa_z"):
        result = CliRunner().invoke(app, [*args, "--splits", str(tmp_path / "splits.json")])
    assert result.exit_code == 0, result.output
    assert "splits: 3 train, 0 val, 1 test (1 not in splits.json: train, e.g. lamp_a)" in result.output
    assert {r["id"]: r["split"] for r in _manifest(root)} == {"chair_a": "train", "chair_b": "test", "lamp_a": "train", "table_a": "train"}
    assert json.loads((root / "assets" / "chair_b" / "meta.json").read_text())["split"] == "test"
    from moca3d.commands.info import describe

    assert describe(root)["splits_drawn"] == "from a split list (prepare --splits)"  # what `moca3d info DATA` says
    (tmp_path / "splits.txt").write_text("id,split\nchair_a val  # by id\nlamp_a,test\n")
    assert CliRunner().invoke(app, [*args, "--splits", str(tmp_path / "splits.txt")]).exit_code == 0
    assert {r["id"]: r["split"] for r in _manifest(root)} == {"chair_a": "val", "chair_b": "train", "lamp_a": "test", "table_a": "train"}
    again = CliRunner().invoke(app, args)  # hashed splits would now mix with the listed ones
    assert isinstance(again.exception, ConfigError) and "its split list (--splits)" in str(again.exception)
    for text, message in (('{"train": ["a"], "holdout": ["b"]}', "unknown split 'holdout' \\(of b\\): expected train, val, test"),
                          ("a train\na test\n", "a is listed in two splits, train and test"),
                          ("a train extra\n", "unknown split 'extra' \\(of a train\\)"), (",test\n", "line 1 is not `NAME SPLIT`"),
                          ("{not json", "not valid JSON")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(InputError, match=message):
            prep.read_split_list(tmp_path / "bad.txt")


def test_models_in_formats_prepare_does_not_read_are_named_not_dropped_silently(tmp_path):
    """A mixed folder's FBX (or .blend, USD, ...) vanished from the run: nothing said it was not prepared."""
    src = tmp_path / "src"
    src.mkdir()
    trimesh.creation.box().export(src / "box.obj")
    for name in ("car.fbx", "room.blend", "texture.png", "notes.txt"):  # images and notes pass silently
        (src / name).write_bytes(b"\x00")
    with pytest.warns(prep.InputWarning, match=r"2 3D file\(s\) in formats prepare does not read are left out \(first: "
                                               r"car.fbx\): export them as GLB or OBJ"):
        jobs = prep.folder_jobs(src)
    assert [j.id for j in jobs] == ["box"]
    (src / "box.obj").unlink()
    with pytest.raises(InputError, match=r"no mesh files .* it holds 2 3D file\(s\) in formats prepare does not read"):
        prep.folder_jobs(src)
    with pytest.raises(InputError, match=r"car.fbx: neither a mesh file .* \(.fbx is not read: export it as GLB or OBJ"):
        prep.folder_jobs(src / "car.fbx")
    # a folder asset's part in such a format vanished from the asset: named; a folder of them alone, in the error
    from moca3d.geometry.mesh_io import load_asset

    lamp = tmp_path / "lamp"
    lamp.mkdir()
    trimesh.creation.box().export(lamp / "base.obj")
    trimesh.creation.icosphere().apply_translation([0, 2, 0]).export(lamp / "pole.obj")
    (lamp / "shade.fbx").write_bytes(b"\x00")
    (lamp / "lamp.blend").write_bytes(b"\x00")  # the project its parts came from: not named
    with pytest.warns(prep.InputWarning, match=r"^lamp: shade.fbx not read \(a format moca3d does not read\): if parts, "
                                               r"export them as GLB or OBJ"):
        assert load_asset(lamp)[1] == ["base", "pole"]
    for name in ("base.obj", "pole.obj"):
        (lamp / name).unlink()
    with pytest.raises(InputError, match=r"lamp: folder holds no mesh files; its lamp.blend, shade.fbx are in formats moca3d does not read"):
        load_asset(lamp)


def test_a_split_list_does_not_change_the_settings_fingerprint_of_skip_records():
    """report.jsonl keeps each skipped source with the settings' digest, and a rerun skips it again only when the
    digest matches: the split-list fields changed every config's digest, so an upgraded (or --splits) rerun retried
    every asset skipped before. The default config's digest is what it was before them."""
    assert prep.PrepareConfig(splits={"a": "test"}, split_list=True).digest() == prep.PrepareConfig().digest() == "83c51fa46a4e"


def test_a_split_list_takes_names_with_spaces_any_separator_and_refuses_an_asset_given_two_splits(tmp_path):
    """`office chair.glb test` was refused (split on every space) and a spreadsheet's CSV (a BOM, a `name,split`
    header) misread; an asset named by two listed names of different splits went to whichever was looked up first."""
    lines = "\ufeffname,split\noffice chair.glb,test\n\"desk lamp\",val\nstool\ttrain\nold bench   test  # spaces\n"
    (tmp_path / "splits.csv").write_text(lines, encoding="utf-8")
    assert prep.read_split_list(tmp_path / "splits.csv") == {"office chair.glb": "test", "desk lamp": "val", "stool": "train",
                                                              "old bench": "test"}
    (tmp_path / "marks.txt").write_text("chair#2 test  # a name may hold '#'\nchair, big.glb\tval\n")
    assert prep.read_split_list(tmp_path / "marks.txt") == {"chair#2": "test", "chair, big.glb": "val"}  # (a tab first)
    (tmp_path / "sheet.csv").write_text("# exported from a sheet\n\nid,category,split\nchair_1,chair,test\nbig table,table,val\n")
    assert prep.read_split_list(tmp_path / "sheet.csv") == {"chair_1": "test", "big table": "val"}  # by the header's columns
    (tmp_path / "bom.json").write_text('\ufeff{"test": ["a"]}', encoding="utf-8")
    assert prep.read_split_list(tmp_path / "bom.json") == {"a": "test"}
    src = tmp_path / "src"
    src.mkdir()
    trimesh.creation.box().export(src / "desk lamp.obj")
    root = tmp_path / "ds"
    prep.prepare(prep.folder_jobs(src), root, TINY, progress=False)
    with pytest.raises(InputError, match=r"gives asset desk_lamp two splits by its names \(desk lamp.obj test, desk lamp val\)"):
        prep.prepare(prep.folder_jobs(src), root, dataclasses.replace(TINY, splits={"desk lamp": "val", "desk lamp.obj": "test"}),
                     progress=False)
    assert [r["split"] for r in _manifest(root)] == ["train"]  # nothing re-split, the manifest still whole
    assert json.loads((root / "prepare.json").read_text())["split_list"] is False  # not split by a list: hashed splits
    # an exact id decides: model_1's stem is the other asset's id (two folders' model.glb), not a conflict
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        trimesh.creation.box().apply_scale(1.5 if folder == "b" else 1.0).export(tmp_path / folder / "model.glb")
        prep.prepare(prep.folder_jobs(tmp_path / folder), tmp_path / "two", TINY, progress=False)
    prep.prepare(prep.folder_jobs(tmp_path / "b"), tmp_path / "two", dataclasses.replace(TINY, splits={"model": "test", "model_1": "val"}),
                 progress=False)
    assert {r["id"]: r["split"] for r in _manifest(tmp_path / "two")} == {"model": "test", "model_1": "val"}


def test_a_rerun_names_assets_it_keeps_although_their_source_changed_or_stands_up_otherwise(tmp_path):
    """A rerun after editing a source (a part added) said '1 already done' and kept the old asset; so did one with
    --up-axis z after a run without it (the table lay on its side). Kept, but named, with how to prepare them anew."""
    import os
    import warnings

    src = tmp_path / "src"
    src.mkdir()
    trimesh.creation.box().export(src / "desk.obj")
    trimesh.creation.icosphere().export(src / "ball.obj")
    root = tmp_path / "ds"
    prep.prepare(prep.folder_jobs(src), root, TINY, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", prep.InputWarning)
        assert prep.prepare(prep.folder_jobs(src), root, TINY, progress=False).already_done == 2  # nothing changed: quiet
    later = (root / "assets" / "desk" / "meta.json").stat().st_mtime + 10
    os.utime(src / "ball.obj", (later, later))  # touched (a checkout, a copy of the same bytes): no change, no word
    trimesh.creation.box(extents=[1, 2, 1]).export(src / "desk.obj")
    os.utime(src / "desk.obj", (later, later))
    with pytest.warns(prep.InputWarning, match=r"1 asset\(s\) kept as prepared before, though their source changed since: desk; "
                                               r"delete their folders under assets/"):
        prep.prepare(prep.folder_jobs(src), root, TINY, progress=False)
    with pytest.warns(prep.InputWarning, match=r"2 asset\(s\) kept as prepared before, though prepared with another --up-axis "
                                               r"than z: ball, desk"):
        prep.prepare(prep.folder_jobs(src), root, dataclasses.replace(TINY, up_axis="z"), progress=False)
