"""OBJ output and input, reviewed: the .mtl beside an OBJ replaces only one moca3d wrote; part names that OBJ readers
would take for keywords or line continuations are written so that the parts read back as written; faces outside any
object are a part in their place, first."""

import re
import warnings

import numpy as np
import pytest
import trimesh

from moca3d.errors import InputError
from moca3d.geometry.mesh_io import (MTL_HEADER, gltf_document, load_file, main_color, palette, read_components,
                                     save_components)


def boxes(count: int) -> list[trimesh.Trimesh]:
    """`count` unit boxes side by side along x (box k centred at x = 2k)."""
    return [trimesh.creation.box().apply_translation([2.0 * k, 0, 0]) for k in range(count)]


def starts(meshes: list[trimesh.Trimesh]) -> list[int]:
    """Each mesh's lowest x, rounded half up: 2k for box k (from 2k - 0.5) and for triangle k (from 2k)."""
    return [int(np.floor(m.bounds[0, 0] + 0.5)) for m in meshes]


# -- the .mtl beside an OBJ ------------------------------------------------------------------------------------------

def test_a_material_library_moca3d_did_not_write_is_kept_and_the_obj_refused(tmp_path):
    """Saving chair.obj replaced the user's own chair.mtl without a word; now neither file is touched."""
    mine = b"# my materials\nnewmtl oak\nKd 0.6 0.4 0.2\n"
    (tmp_path / "chair.mtl").write_bytes(mine)
    (tmp_path / "chair.obj").write_bytes(b"o old\n")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'chair.mtl'} is not a material file moca3d wrote")):
        save_components(tmp_path / "chair.obj", boxes(2), ["seat", "leg"])
    assert (tmp_path / "chair.mtl").read_bytes() == mine and (tmp_path / "chair.obj").read_bytes() == b"o old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chair.mtl", "chair.obj"]  # no temporary file either


def test_generate_refuses_a_foreign_material_library_before_the_model_loads(tmp_path, monkeypatch):
    """The refusal came after the generation had run (its work lost); now `generate` checks before loading."""
    from pathlib import Path

    from typer.testing import CliRunner

    import moca3d.pipeline
    from moca3d.cli import app

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(moca3d.pipeline.MoCAPipeline, "from_pretrained", no_model)
    (tmp_path / "chair.mtl").write_text("# my materials\nnewmtl oak\n")
    image = Path(__file__).resolve().parents[1] / "examples" / "chair.png"
    result = CliRunner().invoke(app, ["generate", str(image), "-o", str(tmp_path / "chair.obj")])
    assert isinstance(result.exception, InputError), result.output
    assert "chair.mtl is not a material file moca3d wrote" in str(result.exception)


def test_a_material_library_moca3d_wrote_is_replaced_silently(tmp_path):
    """moca3d's .mtl says so on its first line: writing the OBJ again replaces it, without a warning."""
    save_components(tmp_path / "chair.obj", boxes(2), ["seat", "leg"])
    assert (tmp_path / "chair.mtl").read_text().splitlines()[0] == MTL_HEADER
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_components(tmp_path / "chair.obj", boxes(3), ["back", "arm", "seat"])
    mtl = (tmp_path / "chair.mtl").read_text().splitlines()
    assert mtl[0] == MTL_HEADER and [line[7:] for line in mtl if line.startswith("newmtl ")] == ["back", "arm", "seat"]
    assert load_file(tmp_path / "chair.obj")[1] == ["back", "arm", "seat"]


# -- names OBJ readers would misread ---------------------------------------------------------------------------------

ODD = ["seat\nusemtl x", "leg usemtl foo", "  back  ", "arm #2", "#rest", "c\\", "usemtl", "a usemtl_foo\\\\"]
OBJ_NAMES = ["seat usemtl_x", "leg usemtl_foo", "back", "arm #2", "#rest", "c_", "usemtl", "a usemtl_foo\\_"]


def test_names_holding_obj_keywords_read_back_as_the_same_parts_in_order(tmp_path):
    """trimesh starts a material at every "usemtl " (ours came back as 'seat', 'leg', merged and out of order) and a
    line's last backslash continues it onto the next (the file became unreadable); each name is written once, by one
    rule, on its `o`, `usemtl` and `newmtl` lines, and the parts read back as many, in order, named as written."""
    parts = boxes(len(ODD))
    path = save_components(tmp_path / "odd.obj", parts, ODD)
    lines = path.read_text().split("\n")
    assert [line[2:] for line in lines if line.startswith("o ")] == OBJ_NAMES
    assert [line[7:] for line in lines if line.startswith("usemtl ")] == OBJ_NAMES
    mtl = (tmp_path / "odd.mtl").read_text().split("\n")
    assert [line[7:] for line in mtl if line.startswith("newmtl ")] == OBJ_NAMES
    meshes, names = load_file(path)
    assert names == read_components(path)[1] == OBJ_NAMES
    assert starts(meshes) == [2 * k for k in range(len(ODD))]
    colors = palette(len(ODD))
    assert [main_color(m).tolist() for m in meshes] == colors.tolist()  # each part kept its own material
    scene = trimesh.load(path, force="scene")  # as another trimesh user reads it
    assert sorted(scene.geometry) == sorted(OBJ_NAMES)


def test_names_made_alike_by_the_obj_rule_stay_apart(tmp_path):
    """Two names the rule makes equal are made unique after it: still one part each."""
    path = save_components(tmp_path / "pair.obj", boxes(2), ["a usemtl b", "a usemtl_b"])
    assert load_file(path)[1] == ["a usemtl_b", "a usemtl_b_1"]


def test_glb_keeps_such_names_as_they_are(tmp_path):
    """A GLB node name is JSON, not a line: only `clean_name` applies to it, as before."""
    path = save_components(tmp_path / "odd.glb", boxes(len(ODD)), ODD)
    written = ["seat usemtl x", "leg usemtl foo", "back", "arm #2", "#rest", "c\\", "usemtl", "a usemtl_foo\\\\"]
    assert [node["name"] for node in gltf_document(path)["nodes"]] == written
    assert load_file(path)[1] == written


# -- faces outside any object ----------------------------------------------------------------------------------------

def triangle(k: int) -> str:
    """OBJ lines of triangle k: its three vertices (at x = 2k) and its face."""
    return f"v {2 * k} 0 0\nv {2 * k + 1} 0 0\nv {2 * k} 1 0\nf {3 * k + 1} {3 * k + 2} {3 * k + 3}\n"


@pytest.mark.parametrize("body, names", [
    (triangle(0) + "o a\n" + triangle(1) + "o b\n" + triangle(2), ["chair.obj", "a", "b"]),
    (triangle(0) + "o a\n" + triangle(1), ["chair.obj", "a"]),
    ("mtllib chair.mtl\nusemtl wood\n" + triangle(0) + "o a\nusemtl oak\n" + triangle(1) + "o b\n" + triangle(2),
     ["chair.obj", "a", "b"]),
    (triangle(0) + "o a\n" + triangle(1) + "o b\n" + triangle(2) + "o a\n" + triangle(3),
     ["chair.obj", "a", "b", "a_1"]),
    (triangle(0) + "g a\n" + triangle(1) + "g b\n" + triangle(2), ["chair.obj", "a", "b"]),
    ("o thing\n" + triangle(0) + "g a\n" + triangle(1) + "g b\n" + triangle(2), ["thing", "a", "b"]),
], ids=["objects", "one-object", "materials", "repeated-name", "groups", "groups-in-an-object"])
def test_faces_before_the_first_object_are_the_first_part(tmp_path, body, names):
    """The faces before an OBJ's first `o` (or `g`) line came last: part 0 of the file was read as part N."""
    path = tmp_path / "chair.obj"
    path.write_text(body)
    meshes, read = load_file(path)
    assert read == read_components(path)[1] == names
    assert starts(meshes) == [2 * k for k in range(len(names))]


def test_a_material_library_of_an_earlier_moca3d_is_still_replaced(tmp_path):
    """A .mtl written before the header line (its blocks alone) was refused as someone else's: regenerating over
    yesterday's chair.obj failed. One with anything added to those blocks is still kept."""
    from moca3d.geometry.mesh_io import _mtl_text

    earlier = _mtl_text(["seat", "leg"], palette(2)).replace(MTL_HEADER + "\n\n", "")
    (tmp_path / "chair.mtl").write_text(earlier)
    save_components(tmp_path / "chair.obj", boxes(2), ["seat", "leg"])
    assert (tmp_path / "chair.mtl").read_text().startswith(MTL_HEADER)
    (tmp_path / "chair.mtl").write_text(earlier + "map_Kd oak.png\n")  # edited by hand since: the user's now
    with pytest.raises(InputError, match="is not a material file moca3d wrote"):
        save_components(tmp_path / "chair.obj", boxes(2), ["seat", "leg"])
