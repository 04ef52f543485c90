"""What moca3d writes a generation as: an OBJ keeps every component (an empty one as an `o` object without faces), a
GLB colours each part with a named material and carries vertex normals, and so does an OBJ (its .mtl beside it); both
read back in place."""

import re

import numpy as np
import pytest
import trimesh
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.commands.info import describe
from moca3d.errors import InputError
from moca3d.evaluation import read_prediction
from moca3d.geometry.mesh_io import gltf_document, load_file, main_color, palette, save_components, save_glb

NAMES = ["box", "hole", "ball", "gap"]


@pytest.fixture
def parts():
    """Four components in one frame, the second and fourth empty (as a generation's empty parts)."""
    box = trimesh.creation.box(extents=[0.6, 0.6, 0.6]).apply_translation([-0.6, 0, 0])
    ball = trimesh.creation.icosphere(subdivisions=2, radius=0.3).apply_translation([0.6, 0, 0])
    return [box, trimesh.Trimesh(), ball, trimesh.Trimesh()]


@pytest.mark.parametrize("suffix", [".obj", ".glb"])
def test_every_component_is_written_and_read_back_in_place(parts, tmp_path, suffix):
    """The OBJ left its empty components out (trimesh skips nodes without geometry): 2 `o` objects for 4 instances."""
    path = save_components(tmp_path / f"scene{suffix}", parts, NAMES, metadata={"instances": 4})
    if suffix == ".obj":
        assert [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("o ")] == NAMES
    assert load_file(path)[1] == ["box", "ball"]  # the surfaces
    meshes, names = read_prediction(path)  # evaluation: the empty ones stay where they are
    assert names == NAMES and [len(m.faces) > 0 for m in meshes] == [True, False, True, False]
    assert np.allclose(meshes[2].bounds, parts[2].bounds)
    report = describe(path)
    assert report["components"] == NAMES and report["empty"] == ["hole", "gap"] and report["settings"] == {"instances": 4}
    text = CliRunner().invoke(app, ["info", str(path)]).output
    assert "4 components (2 empty: hole, gap): box, hole, ball, gap" in text


def test_evaluate_scene_pairs_an_obj_prediction_with_empty_instances(parts, tmp_path):
    """`evaluate --scene` on an OBJ generation with empty instances could not pair them (2 predicted, 4 in the GT)."""
    gt = [parts[0], trimesh.creation.box(extents=[0.2] * 3), parts[2], trimesh.creation.box(extents=[0.2] * 3).apply_translation([0, 0.5, 0])]
    save_components(tmp_path / "gt.glb", gt, NAMES)
    save_components(tmp_path / "pred.obj", parts, NAMES, metadata={"verb": "generate-scene"})
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pred.obj"), str(tmp_path / "gt.glb"), "--scene", "--num-points", "2000"])
    assert result.exit_code == 0, result.output
    assert "per-instance metrics need equal component counts" not in result.output
    assert "instance hole: empty" in result.output and "instance gap: empty" in result.output
    assert "instance box: chamfer" in result.output


def test_glb_parts_carry_a_named_material_of_their_colour_and_vertex_normals(parts, tmp_path):
    """Viewers and Blender show a material's colour (vertex colours alone came out white) and shade smoothly with the
    file's normals (none were written: faceted); the colour is stored linear, as glTF defines baseColorFactor (the
    palette's display values were stored: Blender and three.js showed them paler), and reads back as each part's
    display colour (within 6/255 from the 8-bit linear step, 1/255 from 60/255 up)."""
    colors = palette(4, seed=3)
    path = save_glb(tmp_path / "parts.glb", parts, NAMES, colors=colors)
    doc = gltf_document(path)
    meshes = {node["name"]: doc["meshes"][node["mesh"]] for node in doc["nodes"] if "mesh" in node}
    assert sorted(meshes) == ["ball", "box"]
    for name, k in (("box", 0), ("ball", 2)):
        primitive = meshes[name]["primitives"][0]
        assert "NORMAL" in primitive["attributes"] and "COLOR_0" not in primitive["attributes"]  # glTF multiplies the two
        material = doc["materials"][primitive["material"]]
        pbr = material["pbrMetallicRoughness"]
        assert material["name"] == name and pbr["metallicFactor"] == 0.0
        srgb = colors[k, :3] / 255
        linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)  # the sRGB curve, written out
        assert np.allclose(pbr["baseColorFactor"], [*linear, 1.0], atol=1e-12)  # exact (trimesh wrote its 8-bit copy)
    loaded, names = load_file(path)
    for mesh, k in zip(loaded, (0, 2)):  # render's part colours
        back = main_color(mesh).astype(int)
        assert back[3] == 255 and np.all(np.abs(back[:3] - colors[k, :3]) <= np.where(colors[k, :3] >= 60, 1, 6))
    assert all(np.allclose(m.vertices, p.vertices, atol=1e-6) and np.array_equal(m.faces, p.faces) for m, p in zip(loaded, parts[::2]))


@pytest.mark.parametrize("suffix", [".obj", ".glb"])
def test_another_tools_empty_objects_are_not_components(parts, tmp_path, suffix):
    """Only a file with moca3d's record keeps empty components: another tool's Empty node or face-less object (a
    helper line, a locator) is no part, or every per-instance pairing would be off by one."""
    path = save_components(tmp_path / f"other{suffix}", parts, NAMES)  # no record: as another tool writes them
    meshes, names = read_prediction(path)
    assert names == ["box", "ball"] and all(len(m.faces) for m in meshes)


def test_glb_normals_are_unit_even_on_a_two_sided_fin(tmp_path):
    """Decimation can leave a fin (a triangle and its twin): its vertex normals cancel to zero, which glTF forbids
    and viewers shade black; each such vertex takes one of its faces' normals (norms within 1e-5 of 1)."""
    fin = trimesh.Trimesh([[2, 0, 0], [3, 0, 0], [2, 1, 0]], [[0, 1, 2], [0, 2, 1]], process=False)
    path = save_glb(tmp_path / "fin.glb", [trimesh.creation.box(), fin], ["box", "fin"])
    doc, data = gltf_document(path), path.read_bytes()
    body = 20 + int.from_bytes(data[12:16], "little") + 8  # the BIN chunk's first byte
    for mesh in doc["meshes"]:
        accessor = doc["accessors"][mesh["primitives"][0]["attributes"]["NORMAL"]]
        view = doc["bufferViews"][accessor["bufferView"]]
        start = body + view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
        normals = np.frombuffer(data, np.float32, accessor["count"] * 3, start).reshape(-1, 3)  # (V, 3)
        assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5), mesh.get("name")


def test_obj_parts_come_out_as_named_coloured_meshes_with_normals(parts, tmp_path):
    """trimesh (force='scene') gave ONE mesh 'box' holding every part (it merges objects that share no material), and
    without `mtllib` / `usemtl` and `vn` other importers showed no part colours and shaded flat."""
    colors = palette(4)
    path = save_components(tmp_path / "chair.obj", parts, NAMES, metadata={"image": "mtllib.png"})
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# moca3d: ") and lines[1] == "mtllib chair.mtl"  # the record stays first
    mtl = (tmp_path / "chair.mtl").read_text().splitlines()
    assert [line[7:] for line in mtl if line.startswith("newmtl ")] == NAMES  # one material per part
    kd = {line[3:] for line in mtl if line.startswith("Kd ")}
    assert kd == {" ".join(f"{c / 255:.6f}" for c in color[:3]) for color in colors}
    scene = trimesh.load(path, force="scene")
    assert sorted(scene.geometry) == ["ball", "box"]  # one per part with faces, by its name
    for name, k in (("box", 0), ("ball", 2)):
        geom = scene.geometry[name]
        assert geom.visual.material.name == name and np.array_equal(geom.visual.material.main_color, colors[k])
        assert np.allclose(geom.bounds, parts[k].bounds) and len(geom.faces) == len(parts[k].faces)
    assert [line[7:] for line in lines if line.startswith("usemtl ")] == ["box", "ball"]
    # normals: one unit `vn` per vertex, pointing outward, each face corner naming its vertex's
    v = np.array([line.split()[1:4] for line in lines if line.startswith("v ")], dtype=float)  # (V, 3)
    vn = np.array([line.split()[1:] for line in lines if line.startswith("vn ")], dtype=float)  # (V, 3)
    assert vn.shape == v.shape and np.allclose(np.linalg.norm(vn, axis=1), 1.0, atol=1e-5)
    box = slice(0, len(parts[0].vertices))
    assert (np.einsum("ij,ij->i", vn[box], v[box] - parts[0].centroid) > 0).all()
    faces = [line for line in lines if line.startswith("f ")]
    assert len(faces) == 12 + 320 and all(re.fullmatch(r"f (\d+)//\1 (\d+)//\2 (\d+)//\3", f) for f in faces)
    assert describe(path)["settings"] == {"image": "mtllib.png"}  # escaped, so trimesh finds the real mtllib line


def test_obj_reads_back_in_place_with_or_without_its_mtl(parts, tmp_path):
    """moca3d's readers (evaluate, info, render) keep the parts by name and in order, the empty ones in place, and the
    colours; an OBJ whose `mtllib` names a missing file still loads (its vertex colours then give the colours)."""
    colors = palette(4)
    path = save_components(tmp_path / "chair.obj", parts, NAMES, metadata={"verb": "generate"})
    for step in ("with", "without"):
        if step == "without":
            (tmp_path / "chair.mtl").unlink()
        assert load_file(path)[1] == ["box", "ball"]
        meshes, names = read_prediction(path)
        assert names == NAMES and [len(m.faces) > 0 for m in meshes] == [True, False, True, False], step
        assert [main_color(meshes[k]).tolist() for k in (0, 2)] == [colors[0].tolist(), colors[2].tolist()], step
        assert all(np.allclose(meshes[k].bounds, parts[k].bounds) for k in (0, 2))
        assert describe(path)["empty"] == ["hole", "gap"]
        result = CliRunner().invoke(app, ["render", str(path), "-o", str(tmp_path / f"{step}.png"), "--size", "32"])
        assert result.exit_code == 0, result.output


def test_a_failed_obj_write_leaves_no_mtl_behind(parts, tmp_path):
    """The .obj and its .mtl are staged, then the .obj put in place before the .mtl: a folder where the .obj goes leaves
    no .mtl (nor temporary file) behind; one where the .mtl goes is named, and the .obj still reads."""
    (tmp_path / "chair.obj").mkdir()
    with pytest.raises(InputError, match=re.escape(f"cannot write {tmp_path / 'chair.obj'}")):
        save_components(tmp_path / "chair.obj", parts, NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chair.obj"]
    (tmp_path / "desk.mtl").mkdir()
    with pytest.raises(InputError, match=re.escape(f"cannot write {tmp_path / 'desk.mtl'}")):
        save_components(tmp_path / "desk.obj", parts, NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chair.obj", "desk.mtl", "desk.obj"]
    assert load_file(tmp_path / "desk.obj")[1] == ["box", "ball"]


def test_an_obj_named_with_spaces_points_to_a_mtl_without_them(tmp_path):
    """`mtllib` takes a list of names: "my chair.mtl" read as two files by strict readers."""
    from moca3d.geometry.mesh_io import save_components

    path = save_components(tmp_path / "my chair ü.obj", [trimesh.creation.box()], ["seat"])
    assert (tmp_path / "my_chair_ü.mtl").is_file()
    assert "mtllib my_chair_ü.mtl" in path.read_text(encoding="utf-8")


def test_colour_space_conversions_are_inverse_and_fixed_at_the_ends():
    """glTF's linear base colour and the display (sRGB) colour: black, white and alpha stay, mid grey 128 is linear
    0.216 (55/255), and every 8-bit value comes back within 6/255 (1/255 from 60/255 up)."""
    from moca3d.geometry.mesh_io import linear_to_srgb, srgb_to_linear

    values = np.arange(256, dtype=np.uint8)
    rgba = np.stack([values, values[::-1], values, np.full(256, 77, np.uint8)], axis=1)  # (256, 4)
    linear = srgb_to_linear(rgba)
    assert linear.dtype == np.uint8 and (linear[:, 3] == 77).all()
    assert linear[0, 0] == 0 and linear[255, 0] == 255 and linear[128, 0] == 55
    assert (np.diff(linear[:, 0].astype(int)) >= 0).all()  # monotone
    back = linear_to_srgb(linear).astype(int)
    error = np.abs(back[:, 0] - values)
    assert error.max() <= 6 and error[60:].max() <= 1 and (back[:, 3] == 77).all()
    assert np.array_equal(linear_to_srgb(srgb_to_linear(rgba[None]))[0], linear_to_srgb(linear))  # any leading shape


def test_each_part_node_pivots_at_its_centre_and_sits_where_it_was(parts, tmp_path):
    """Every node's origin was the object's origin (a rigger turning a wheel turned it about the object's centre):
    each part's node now carries a translation to the centre of the part's box, its vertices about it; readers (ours,
    trimesh's scene) put the parts back in place (atol 1e-6), and the normals stay unit."""
    path = save_glb(tmp_path / "parts.glb", parts, NAMES)
    doc = gltf_document(path)
    assert doc["asset"]["generator"].startswith("moca3d ")  # the writer's name (trimesh's URL was there)
    nodes = {node["name"]: node for node in doc["nodes"]}
    for name, k in (("box", 0), ("ball", 2)):
        centre = parts[k].bounds.mean(axis=0)
        assert np.allclose(nodes[name]["translation"] if "translation" in nodes[name] else nodes[name]["matrix"][12:15], centre)
    assert all("mesh" not in nodes[name] and "translation" not in nodes[name] for name in ("hole", "gap"))  # empty: none
    loaded, names = load_file(path)
    assert all(np.allclose(m.vertices, p.vertices, atol=1e-6) for m, p in zip(loaded, parts[::2]))
    placed = trimesh.load(path, force="scene").dump()
    assert sorted(np.round(m.bounds.mean(axis=0), 5).tolist() for m in placed) == sorted(
        np.round(p.bounds.mean(axis=0), 5).tolist() for p in parts[::2])
    local = trimesh.load(path, force="scene").geometry["box"]
    assert np.allclose(local.bounds.mean(axis=0), 0.0, atol=1e-6)  # the geometry itself about its pivot
    assert np.allclose(np.linalg.norm(local.vertex_normals, axis=1), 1.0, atol=1e-5)


def test_colours_of_textured_materials_and_of_files_written_before_linear_colours(tmp_path):
    """A PBR material without a base colour factor (a textured export) read as grey (now None: the caller's palette);
    a GLB moca3d wrote before colours were stored linear (its record, trimesh's generator) reads back its display
    colours as they are (converted, they came out paler: (230, 80, 80) read as (244, 152, 152))."""
    from moca3d.geometry.mesh_io import METADATA_KEY, linear_to_srgb

    textured = trimesh.creation.box()
    textured.visual = trimesh.visual.TextureVisuals(material=trimesh.visual.material.PBRMaterial(name="wood"))
    assert main_color(textured) is None
    colors = palette(2)
    old = trimesh.Scene()
    for k, (name, mesh) in enumerate((("seat", trimesh.creation.box()), ("leg", trimesh.creation.icosphere().apply_translation([3, 0, 0])))):
        mesh.visual = trimesh.visual.TextureVisuals(material=trimesh.visual.material.PBRMaterial(name=name, baseColorFactor=colors[k]))
        old.add_geometry(mesh, node_name=name, geom_name=name)
    old.metadata[METADATA_KEY] = {"verb": "generate"}
    (tmp_path / "old.glb").write_bytes(old.export(file_type="glb"))
    assert gltf_document(tmp_path / "old.glb")["asset"]["generator"] == "https://github.com/mikedh/trimesh"
    meshes, _ = load_file(tmp_path / "old.glb")
    assert [main_color(m).tolist() for m in meshes] == colors.tolist()
    del old.metadata[METADATA_KEY]  # another tool's file written with trimesh: glTF's linear colours, converted
    (tmp_path / "other.glb").write_bytes(old.export(file_type="glb"))
    assert main_color(load_file(tmp_path / "other.glb")[0][0]).tolist() == linear_to_srgb(colors[0]).tolist()
    # a file moca3d writes now, re-saved by trimesh (its generator back, our record kept): still read as linear
    save_glb(tmp_path / "new.glb", [trimesh.creation.box()], ["seat"], colors=colors[:1], metadata={"verb": "generate"})
    resaved = trimesh.load(tmp_path / "new.glb", force="scene")
    resaved.apply_scale(2.0)
    (tmp_path / "resaved.glb").write_bytes(resaved.export(file_type="glb"))
    assert gltf_document(tmp_path / "resaved.glb")["asset"]["generator"] == "https://github.com/mikedh/trimesh"
    back = main_color(load_file(tmp_path / "resaved.glb")[0][0]).astype(int)
    assert np.abs(back - colors[0]).max() <= 6  # (it read back far darker: 200 came back as 147)
