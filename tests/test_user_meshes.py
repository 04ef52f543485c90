"""A technical artist's own part meshes through prepare / render / evaluate / evaluate-model (defects found on that journey)."""

import dataclasses
import json
from pathlib import Path

import pytest
import trimesh
from typer.testing import CliRunner

import moca3d.data.prepare as prep
from conftest import TINY_PREPARE
from moca3d.cli import app
from moca3d.errors import ConfigError, InputError, InputWarning
from moca3d.geometry.inside import QueryConfig
from moca3d.geometry.mesh_io import UP_ROTATIONS, load_components, save_glb, save_separate
from moca3d.geometry.render import RenderConfig
from moca3d.geometry.sampling import SurfaceSamplingConfig
from moca3d.metrics import check_metric_settings

TINY = dataclasses.replace(TINY_PREPARE, max_components=2)


def _write_obj(path, parts, mtllib=None):
    """An OBJ as Blender writes it: `o NAME`, its vertices, then faces under `usemtl` switches.

    parts: (object name or None, mesh, {face index: material switched to before it}).
    """
    lines = [f"mtllib {mtllib}"] if mtllib else []
    offset = 0
    for name, mesh, switches in parts:
        if name:
            lines.append(f"o {name}")
        lines += [f"v {x} {y} {z}" for x, y, z in mesh.vertices]
        for i, (a, b, c) in enumerate(mesh.faces):
            if i in switches:
                lines.append(f"usemtl {switches[i]}")
            lines.append(f"f {a + 1 + offset} {b + 1 + offset} {c + 1 + offset}")
        offset += len(mesh.vertices)
    path.write_text("\n".join(lines) + "\n")


def test_obj_objects_with_several_materials_stay_one_component_each(tmp_path):
    """Blender's OBJ export switches `usemtl` inside an object: trimesh split each object by material, so a seat
    with a fabric top came out as two open halves 'Seat_Fabric' and 'Seat_Wood' (three parts for two objects)."""
    (tmp_path / "chair.mtl").write_text("newmtl Wood\nKd 0.6 0.4 0.2\nnewmtl Fabric\nKd 0.8 0.1 0.1\n")
    seat = trimesh.creation.box((1, 1, 0.2))
    leg = trimesh.creation.box((0.1, 0.1, 1)).apply_translation((0.4, 0.4, -0.6))
    _write_obj(tmp_path / "chair.obj", [("Seat", seat, {0: "Wood", 6: "Fabric"}), ("Leg", leg, {0: "Wood"})], "chair.mtl")
    meshes, names = load_components(tmp_path / "chair.obj")
    assert names == ["Seat", "Leg"]
    assert [len(m.faces) for m in meshes] == [12, 12]
    assert all(trimesh.Trimesh(m.vertices, m.faces).is_watertight for m in meshes)
    # one object (no `o`), two materials: one component, named after the file
    _write_obj(tmp_path / "stool.obj", [(None, seat, {0: "Wood", 6: "Fabric"})], "chair.mtl")
    with pytest.warns(InputWarning, match="stool.obj: read as one part though its faces use 2 materials"):  # (they may be its parts)
        meshes, names = load_components(tmp_path / "stool.obj")
    assert names == ["stool"] and [len(m.faces) for m in meshes] == [12]


def test_a_skipped_asset_is_retried_when_the_settings_change(tmp_path):
    """'40 components exceed the maximum of 32', then a rerun with --max-components 40 said '0 prepared, 1 already
    done or reported' and left the asset out: report.jsonl hid it whatever the new settings."""
    src = tmp_path / "src"
    src.mkdir()
    parts = [trimesh.creation.box().apply_translation([2 * i, 0, 0]) for i in range(3)]
    save_glb(src / "three.glb", parts, ["a", "b", "c"])
    jobs, root = prep.folder_jobs(src), tmp_path / "ds"
    summary = prep.prepare(jobs, root, TINY, progress=False)
    assert (summary.processed, summary.skipped) == (0, 1)
    summary = prep.prepare(jobs, root, TINY, progress=False)  # same settings: still reported, not rebuilt
    assert (summary.processed, summary.skipped, summary.already_done) == (0, 0, 1)
    summary = prep.prepare(jobs, root, dataclasses.replace(TINY, max_components=3), progress=False)
    assert (summary.processed, summary.skipped) == (1, 0)
    assert [json.loads(line)["id"] for line in (root / "manifest.jsonl").read_text().splitlines()] == ["three"]


def test_prepare_refuses_an_image_size_no_memory_holds(tmp_path):
    """--image-size 60000 failed every asset with a MemoryError, each then listed as skipped in report.jsonl."""
    with pytest.raises(ConfigError, match="--image-size must be at most 4096 pixels, got 60000"):
        dataclasses.replace(TINY, render=RenderConfig(size=60000))
    result = CliRunner().invoke(app, ["prepare", str(tmp_path), "-o", str(tmp_path / "ds"), "--image-size", "60000"])
    assert isinstance(result.exception, ConfigError) and not (tmp_path / "ds" / "report.jsonl").exists()


def test_render_size_bound_and_a_folder_of_part_files(tmp_path):
    """`render --size 100000` died with a 298 GiB MemoryError traceback; a folder asset (one file per part, as
    `prepare` reads it) was refused as 'unsupported mesh format'."""
    folder = tmp_path / "lamp"
    save_separate(folder, [trimesh.creation.box(), trimesh.creation.icosphere(1).apply_translation([0, 0, 2])], ["base", "shade"])
    out = tmp_path / "lamp.png"
    result = CliRunner().invoke(app, ["render", str(folder), "-o", str(out), "--size", "100000"])
    assert isinstance(result.exception, InputError) and "--size must be from 16 to 4096 pixels, got 100000" in str(result.exception)
    result = CliRunner().invoke(app, ["render", str(folder), "-o", str(out), "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "2 components" in result.output and out.is_file()


def test_metric_points_bound(tmp_path):
    """`evaluate A A --num-points 2000000000` was killed for memory after minutes, with no message."""
    with pytest.raises(ConfigError, match="num_points must be at most 10000000"):
        check_metric_settings(2_000_000_000, 64)
    glb = save_glb(tmp_path / "a.glb", [trimesh.creation.box()], ["box"])
    result = CliRunner().invoke(app, ["evaluate", str(glb), str(glb), "--num-points", "2000000000"])
    assert isinstance(result.exception, ConfigError) and "--num-points must be at most" in str(result.exception)


def test_evaluate_model_refuses_an_empty_split_before_loading_the_model(tmp_path, monkeypatch):
    """A dozen own meshes give no test split (5%): evaluate-model loaded the model (seconds) before saying so."""
    import moca3d.pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for an empty split")

    monkeypatch.setattr(moca3d.pipeline.MoCAPipeline, "from_pretrained", no_load)
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "a", "split": "train", "num_components": 2}) + "\n")
    result = CliRunner().invoke(app, ["evaluate-model", str(tmp_path), "--split", "test", "--device", "cpu"])
    assert isinstance(result.exception, InputError), result.exception
    assert "no assets in the 'test' split with 1-32 components" in str(result.exception)


def test_prepare_rerun_with_every_asset_reported_is_an_error_not_an_empty_dataset(tmp_path):
    """A folder whose only asset was skipped: the rerun says so (and how to retry) instead of exiting 0 with no data."""
    src = tmp_path / "meshes"
    src.mkdir()
    flat = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]])  # encloses no volume: skipped
    save_glb(src / "a.glb", [flat, trimesh.creation.box()], ["sheet", "box"])
    runner = CliRunner()
    args = ["prepare", str(src), "-o", str(tmp_path / "data"), "--num-surface", "128", "--num-queries", "96", "--image-size", "48"]
    first = runner.invoke(app, args)
    assert isinstance(first.exception, InputError) and "no asset could be prepared" in str(first.exception)
    again = runner.invoke(app, args)
    assert isinstance(again.exception, InputError), again.output
    assert "every one is listed as skipped" in str(again.exception) and "--retry-failed" in str(again.exception)


def test_prepare_names_every_empty_held_out_split(tmp_path):
    src = tmp_path / "meshes"
    src.mkdir()
    save_glb(src / "a.glb", [trimesh.creation.box(), trimesh.creation.icosphere()], ["box", "ball"])
    result = CliRunner().invoke(app, ["prepare", str(src), "-o", str(tmp_path / "data"), "--num-surface", "128",
                                      "--num-queries", "96", "--image-size", "48"])
    assert result.exit_code == 0, result.output
    assert "val and test empty: prepare into a new --output with a larger --val-fraction and --test-fraction" in result.output


def test_an_open_part_is_prepared_and_said(tmp_path):
    """A box with one face missing still encloses volume (winding number): kept, but named as open, not silently."""
    src = tmp_path / "meshes"
    src.mkdir()
    box = trimesh.creation.box()
    open_box = trimesh.Trimesh(box.vertices, box.faces[2:])  # one side (two triangles) missing
    assert not open_box.is_watertight
    save_glb(src / "a.glb", [open_box, trimesh.creation.icosphere()], ["lid_missing", "ball"])
    result = CliRunner().invoke(app, ["prepare", str(src), "-o", str(tmp_path / "data"), "--num-surface", "128",
                                      "--num-queries", "96", "--image-size", "48"])
    assert result.exit_code == 0, result.output
    assert "1 prepared with open components" in result.output
    meta = json.loads((tmp_path / "data" / "assets" / "a" / "meta.json").read_text())
    assert meta["open_components"] == ["lid_missing"]


def test_a_model_path_that_does_not_exist_is_named_as_such(tmp_path):
    from moca3d.errors import CheckpointError
    from moca3d.pipeline import MoCAPipeline

    with pytest.raises(CheckpointError, match=r"nope: no such pipeline folder$"):
        MoCAPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a moca3d pipeline folder, model_index.json missing"):
        MoCAPipeline.from_pretrained(tmp_path / "empty")


def test_a_rerun_with_other_shared_settings_is_refused_a_new_stream_is_not(tmp_path):
    """One dataset folder, one set of samples/queries/renders/splits (prepare.json): a rerun with another
    --num-surface would mix sample counts and is refused; the next part of a procedural stream (seed, start, scene
    sizes, --max-components) is not."""
    root, base = tmp_path / "data", dataclasses.replace(TINY, max_components=32)
    prep.prepare(prep.procedural_jobs("objects", 1, seed=0), root, base, progress=False)
    assert json.loads((root / "prepare.json").read_text())["surface.num_points"] == 128
    other = dataclasses.replace(base, surface=SurfaceSamplingConfig(num_points=256))
    with pytest.raises(ConfigError, match=r"data was prepared with other settings \(surface.num_points 128 -> 256\)"):
        prep.prepare(prep.procedural_jobs("objects", 1, seed=0, start=1), root, other, progress=False)
    more = dataclasses.replace(base, seed=3, max_components=16)
    assert prep.prepare(prep.procedural_jobs("objects", 1, seed=3), root, more, progress=False).processed == 1
    fewer = dataclasses.replace(base, queries=QueryConfig(num_queries=32))
    assert prep.prepare(prep.procedural_jobs("objects", 1, seed=0, start=1), root, fewer, progress=False,
                        vary=("queries.num_queries",)).processed == 1


def test_a_rerun_prepares_a_file_added_beside_a_namesake_once_and_nothing_twice(tmp_path):
    """a.ply and b.ply prepared, then a.obj added: the rerun prepares a.obj (under a free id), and neither a.ply nor
    b.ply again, although the folder's ids moved (a.obj now sorts first and would take "a")."""
    src = tmp_path / "meshes"
    src.mkdir()
    two_boxes = trimesh.util.concatenate([trimesh.creation.box(), trimesh.creation.box().apply_translation([2, 0, 0])])
    for scale, name in ((1.0, "a.ply"), (1.5, "b.ply")):  # two shapes: a copy of a file is left out (`resume_jobs`)
        two_boxes.copy().apply_scale(scale).export(src / name)
    args = ["prepare", str(src), "-o", str(tmp_path / "data"), "--num-surface", "128", "--num-queries", "96",
            "--image-size", "48", "--val-fraction", "0", "--test-fraction", "0"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    trimesh.creation.icosphere().export(src / "a.obj")
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    sources = {}
    for meta in (tmp_path / "data" / "assets").glob("*/meta.json"):
        record = json.loads(meta.read_text())
        sources.setdefault(Path(record["source"]).name, []).append(record["id"])
    assert sorted(sources) == ["a.obj", "a.ply", "b.ply"] and all(len(ids) == 1 for ids in sources.values()), sources


def test_obj_objects_of_one_name_stay_separate_components(tmp_path):
    """Two `o leg` objects were merged by trimesh's OBJ loader into one part spanning both legs (prepare, info,
    reconstruct and evaluate all saw 2 parts of 3): each `o` line starts a component, a repeated name made unique."""
    from moca3d.geometry.mesh_io import load_file, read_components

    legs = [trimesh.creation.box(extents=(0.2, 1, 0.2)).apply_translation([x, 0, 0]) for x in (-1.0, 1.0)]
    top = trimesh.creation.box(extents=(2.4, 0.2, 1)).apply_translation([0, 0.6, 0])
    path = tmp_path / "table.obj"
    _write_obj(path, [("leg", legs[0], {}), ("leg", legs[1], {}), ("top", top, {})])
    meshes, names = load_file(path)
    assert names == ["leg", "leg_1", "top"] and read_components(path)[1] == names
    assert [round(float(m.bounds.mean(axis=0)[0]), 3) for m in meshes] == [-1.0, 1.0, 0.0]  # each leg where it is
    assert len(load_components(path)[0]) == 3


def test_a_closed_part_wound_inside_out_is_turned_outward(tmp_path):
    """An inside-out part's sampled normals all pointed inwards (the VAE reads them): its reconstruction was worse than
    the same part's wound outward (CD 0.067 against 0.049)."""
    inside_out = trimesh.creation.box().apply_translation([2, 0, 0])
    inside_out.invert()
    assert inside_out.volume < 0
    save_glb(tmp_path / "parts.glb", [trimesh.creation.box(), inside_out], ["ok", "flipped"])
    meshes, names = load_components(tmp_path / "parts.glb")
    assert names == ["ok", "flipped"] and all(m.volume > 0 for m in meshes)
    centre = meshes[1].bounds.mean(axis=0)
    outward = ((meshes[1].triangles_center - centre) * meshes[1].face_normals).sum(axis=1)
    assert (outward > 0).all()


def test_prepare_category_labels_file_assets_and_keeps_same_named_files_apart(tmp_path):
    """Every file asset was category "mesh" (evaluate-model's by-category table said only that); one run per category
    into the same dataset labels a mixed one, and chairs/a.glb beside tables/a.glb stay two assets."""
    for category, part in (("chair", trimesh.creation.box()), ("table", trimesh.creation.icosphere())):
        (tmp_path / category).mkdir()
        save_glb(tmp_path / category / "a.glb", [part, part.copy().apply_translation([2, 0, 0])], ["p", "q"])
        result = CliRunner().invoke(app, ["prepare", str(tmp_path / category), "-o", str(tmp_path / "data"), "--category", category,
                                          "--num-surface", "128", "--num-queries", "96", "--image-size", "48"])
        assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["category"]) for r in records) == [("chair_a", "chair"), ("table_a", "table")]
    bad = CliRunner().invoke(app, ["prepare", str(tmp_path / "chair"), "-o", str(tmp_path / "other"), "--category", " "])
    assert isinstance(bad.exception, ConfigError) and "--category must be a printable, non-empty label" in str(bad.exception)


def test_prepare_leaves_out_copies_of_prepared_assets(tmp_path):
    """The same folder prepared again under another --category (or a copy of a file under another name) made a second
    asset of the same mesh, which could land in train while its twin sat in test; both are left out now, and said."""
    (tmp_path / "chairs").mkdir()
    box = trimesh.creation.box()
    save_glb(tmp_path / "chairs" / "a.glb", [box, box.copy().apply_translation([2, 0, 0])], ["p", "q"])
    sphere = trimesh.creation.icosphere()
    save_glb(tmp_path / "chairs" / "b.glb", [sphere, sphere.copy().apply_translation([2, 0, 0])], ["p", "q"])
    options = ["-o", str(tmp_path / "data"), "--num-surface", "128", "--num-queries", "96", "--image-size", "48"]
    first = CliRunner().invoke(app, ["prepare", str(tmp_path / "chairs"), "--category", "chair", *options])
    assert first.exit_code == 0 and "2 prepared" in first.output, first.output
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "copy_of_a.glb").write_bytes((tmp_path / "chairs" / "a.glb").read_bytes())
    again = CliRunner().invoke(app, ["prepare", str(tmp_path / "chairs"), "--category", "seating", *options])
    assert again.exit_code == 0, again.output
    assert f"left out {tmp_path / 'chairs' / 'a.glb'}: already prepared as asset 'chair_a' (category 'chair')" in again.output
    assert "0 prepared, 0 already done or reported" in again.output and "2 left out as copies of assets" in again.output
    copy = CliRunner().invoke(app, ["prepare", str(tmp_path / "more"), "--category", "chair", *options])
    assert "the same content as asset 'chair_a'" in copy.output and "1 left out as copies" in copy.output
    records = [json.loads(line) for line in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["chair_a", "chair_b"]


def test_obj_object_names_of_unicode_spaces_are_told_alike(tmp_path):
    """An `o` line holding only a no-break space made the renaming of repeated names run out (a raw StopIteration)."""
    from moca3d.geometry.mesh_io import load_file

    path = tmp_path / "odd.obj"
    tri = "v {x} 0 0\nv {y} 0 0\nv {x} 1 0\n"
    path.write_text("o leg\n" + tri.format(x=0, y=1) + "f 1 2 3\no \u00a0\n" + tri.format(x=3, y=4) + "f 4 5 6\no leg\n"
                    + tri.format(x=6, y=7) + "f 7 8 9\n", encoding="utf-8")
    names = load_file(path)[1]
    assert names[:2] == ["leg", "leg_1"] and len(names) == 3


def test_a_part_of_two_closed_bodies_is_turned_outward_body_by_body(tmp_path):
    """Inverting the whole part turned a big inside-out body outward and its small outward one inward."""
    big = trimesh.creation.box(extents=(2, 2, 2))
    big.invert()
    small = trimesh.creation.box(extents=(0.2, 0.2, 0.2)).apply_translation([3, 0, 0])
    save_glb(tmp_path / "two.glb", [trimesh.util.concatenate([big, small])], ["p"])
    part = load_components(tmp_path / "two.glb")[0][0]
    for body in part.split(only_watertight=False):
        centre = body.bounds.mean(axis=0)
        assert (((body.triangles_center - centre) * body.face_normals).sum(axis=1) > 0).all()


def test_a_single_file_is_prepared_and_a_z_up_one_stands_up(tmp_path):
    """`prepare FILE` was refused ("not a folder of meshes"); --up-axis z turns a Z-up file to moca3d's Y up: its
    samples come out as the same object saved Y up."""
    import numpy as np

    from moca3d.data.dataset import load_samples

    tall = trimesh.creation.box(extents=(0.4, 0.4, 2.0))  # tall along Z, a second part on top
    cap = trimesh.creation.box(extents=(0.6, 0.6, 0.2)).apply_translation([0, 0, 1.1])
    turn = np.eye(4)
    turn[:3, :3] = UP_ROTATIONS["z"]
    for name, parts in (("z_up", [tall, cap]), ("y_up", [m.copy().apply_transform(turn) for m in (tall, cap)])):
        (tmp_path / name).mkdir()
        save_glb(tmp_path / name / "lamp.glb", parts, ["post", "cap"])  # one asset id: the same sampling seed
    args = ["--num-surface", "128", "--num-queries", "96", "--image-size", "48", "--test-fraction", "0", "--val-fraction", "0"]
    for name, extra in (("z_up", ["--up-axis", "z"]), ("y_up", [])):
        result = CliRunner().invoke(app, ["prepare", str(tmp_path / name / "lamp.glb"), "-o", str(tmp_path / f"{name}_data"),
                                          *args, *extra])
        assert result.exit_code == 0, result.output
    stood, upright = (load_samples(tmp_path / f"{name}_data", "lamp")["surface"][..., :3] for name in ("z_up", "y_up"))  # (2, P, 3)
    assert np.allclose(stood, upright, atol=1e-5)  # the same samples: the same seed, the same geometry
    assert np.ptp(upright[0], axis=0).argmax() == 1  # the post stands along Y
    bad = CliRunner().invoke(app, ["prepare", str(tmp_path / "z_up"), "-o", str(tmp_path / "bad"), "--up-axis", "w"])
    assert isinstance(bad.exception, ConfigError) and "--up-axis must be one of y, z, -z, x, -y" in str(bad.exception)


def test_a_part_without_surface_is_left_out_not_the_asset(tmp_path):
    """A stray node collapsed to a line (zero area, as DCC exports carry) skipped its whole asset; now the asset is
    prepared without it, and the part is named (on the terminal and in meta.json); all parts degenerate still skips."""
    import numpy as np

    box = trimesh.creation.box()
    line = trimesh.Trimesh(np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]]), [[0, 1, 2]], process=False)  # zero area
    save_glb(tmp_path / "lamp.glb", [box, box.copy().apply_translation([2, 0, 0]), line], ["base", "shade", "decal"])
    result = CliRunner().invoke(app, ["prepare", str(tmp_path / "lamp.glb"), "-o", str(tmp_path / "data"),
                                      "--num-surface", "128", "--num-queries", "96", "--image-size", "48"])
    assert result.exit_code == 0, result.output
    assert "left out of" in result.output and "decal" in result.output and "1 prepared without components" in result.output
    meta = json.loads((tmp_path / "data" / "assets" / "lamp" / "meta.json").read_text())
    assert meta["names"] == ["base", "shade"] and meta["dropped_components"] == ["decal"] and meta["num_components"] == 2


def test_a_folder_of_multi_part_objects_is_not_one_asset_of_stacked_objects(tmp_path):
    """A category folder (chairs/ of multi-part GLBs) given with its parent became one asset whose "parts" were whole
    objects stacked on each other, silently; it is refused, naming the way out. A folder asset's part files, and one
    part file of several pieces among them, still read."""
    from moca3d.errors import InputError
    from moca3d.geometry.mesh_io import load_folder

    chairs = tmp_path / "chairs"
    for name in ("a", "b"):
        save_glb(chairs / f"{name}.glb", [trimesh.creation.box(), trimesh.creation.icosphere(1).apply_translation([0, 2, 0])],
                 ["seat", "back"])
    with pytest.raises(InputError, match="chairs: each of its 2 files holds several parts .*prepare that folder itself"):
        load_folder(chairs)
    lamp = tmp_path / "lamp"
    save_separate(lamp, [trimesh.creation.box(), trimesh.creation.icosphere(1).apply_translation([0, 0, 2])], ["base", "shade"])
    save_glb(lamp / "stand.glb", [trimesh.creation.box().apply_translation([3, 0, 0]), trimesh.creation.box().apply_translation([5, 0, 0])])
    meshes, names = load_folder(lamp)
    assert names == ["base", "shade", "stand"] and len(meshes) == 3


def test_a_one_part_file_of_several_materials_is_named(tmp_path):
    """An OBJ whose parts were told apart only by `usemtl` (no `o` / `g` lines) became one part without a word; one
    warning now says so and how to separate it. A file whose objects are its parts, several materials or not: none."""
    import warnings

    from moca3d.errors import InputWarning
    from moca3d.geometry.mesh_io import load_asset

    body = "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\n"
    faces = "usemtl seat\nf 1 2 3\nusemtl leg\nf 1 2 4\nf 1 3 4\nf 2 3 4\n"
    (tmp_path / "by_material.obj").write_text(body + faces)
    with pytest.warns(InputWarning, match=r"by_material.obj: read as one part though its faces use 2 materials: "
                                          r".*Separate > By Material"):
        meshes, names, _ = load_asset(tmp_path / "by_material.obj")
    assert names == ["by_material"]
    (tmp_path / "objects.obj").write_text(body + "o seat\nusemtl seat\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n"
                                          + body.replace("0 0 0", "3 0 0") + "o leg\nusemtl leg\nf 5 6 7\nf 5 6 8\nf 5 7 8\nf 6 7 8\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        assert load_asset(tmp_path / "objects.obj")[1] == ["seat", "leg"]
