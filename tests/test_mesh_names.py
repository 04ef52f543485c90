"""Every reader names and orders a file's components alike (`mesh_io.read_components`): `evaluate` on both sides,
`info`, `reconstruct`; what the writers write reads back as written, however odd the names."""

import io
import json
import struct
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import trimesh
from typer.testing import CliRunner

import moca3d.geometry.mesh_io as mesh_io
from moca3d.cli import app
from moca3d.commands.info import describe
from moca3d.errors import InputError
from moca3d.evaluation import read_ground_truth, read_prediction
from moca3d.geometry.mesh_io import METADATA_KEY, gltf_document, load_file, save_components


def boxes(count: int) -> list[trimesh.Trimesh]:
    """`count` unit boxes side by side along x (box k centred at x = 2k)."""
    return [trimesh.creation.box().apply_translation([2.0 * k, 0, 0]) for k in range(count)]


def glb_of(path, nodes: list, record: bool = True):
    """A GLB with one node per (name, mesh) in order (mesh None: a node without one, as moca3d writes an empty part),
    its names as given (as another writer's), with moca3d's record if `record`."""
    scene = trimesh.Scene()
    for k, (name, mesh) in enumerate(nodes):
        if mesh is None:
            scene.graph.update(frame_to=name, frame_from=scene.graph.base_frame, matrix=np.eye(4))
        else:
            scene.add_geometry(mesh, node_name=name, geom_name=f"geometry{k}")
    if record:
        scene.metadata[METADATA_KEY] = {"verb": "generate"}
    path.write_bytes(scene.export(file_type="glb"))
    return path


def without_node_names(path):
    """Rewrite a GLB with its nodes' names taken out (as some exporters leave them)."""
    data = path.read_bytes()
    size = int.from_bytes(data[12:16], "little")
    doc = json.loads(data[20:20 + size])
    for node in doc["nodes"]:
        node.pop("name", None)
    text = json.dumps(doc).encode()
    text += b" " * (-len(text) % 4)  # chunks are 4-byte aligned
    rest = data[20 + size:]
    path.write_bytes(b"glTF" + struct.pack("<II", 2, 20 + len(text) + len(rest)) + struct.pack("<I", len(text)) + b"JSON"
                     + text + rest)
    return path


# -- evaluate: PRED and GT read alike ------------------------------------------------------------------------------

def test_evaluate_reads_a_folder_of_one_multi_part_file_alike_on_both_sides(tmp_path):
    """GT went through load_components (a folder: one fused component per file) and PRED through read_prediction (a
    folder of one file: that file's parts): the same folder was 1 GT instance against 3 predicted."""
    (tmp_path / "gt").mkdir()
    save_components(tmp_path / "gt" / "mesh.glb", boxes(3), ["a", "b", "c"])
    assert read_ground_truth(tmp_path / "gt")[1] == read_prediction(tmp_path / "gt")[1] == ["a", "b", "c"]
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "gt"), str(tmp_path / "gt"), "--scene", "--json", "-",
                                      "--num-points", "2000", "--iou-resolution", "16"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["instances"]) == 3 and report["chamfer"] < 0.06  # the sampling floor at 2000 points


def test_evaluate_refuses_a_ground_truth_with_an_empty_part_instead_of_shifting_the_pairs(tmp_path):
    """GT's empty part (a generation used as GT) was dropped, so GT instance i no longer faced predicted instance i."""
    parts = boxes(3)
    save_components(tmp_path / "pred.glb", parts, ["a", "b", "c"])
    save_components(tmp_path / "gt.glb", [parts[0], trimesh.Trimesh(), parts[2]], ["a", "hole", "c"], metadata={"verb": "generate"})
    with pytest.raises(InputError, match="gt.glb: component 'hole' is empty"):
        read_ground_truth(tmp_path / "gt.glb")
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pred.glb"), str(tmp_path / "gt.glb"), "--scene"])
    assert isinstance(result.exception, InputError) and "component 'hole' is empty" in str(result.exception)


# -- info: the names every reader gives --------------------------------------------------------------------------

def test_info_names_components_as_every_reader_does(tmp_path):
    """info parsed names itself: an OBJ without moca3d's first line lost its first `o` object, and unnamed glTF nodes
    printed blank."""
    obj = tmp_path / "other.obj"
    obj.write_text("o seat\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\no back\nv 0 0 1\nv 1 0 1\nv 0 1 1\nf 4 5 6\n")
    glb = without_node_names(glb_of(tmp_path / "unnamed.glb", [("x", boxes(1)[0]), ("y", boxes(2)[1])], record=False))
    for path in (obj, glb):
        names = load_file(path)[1]
        assert describe(path)["components"] == names == read_prediction(path)[1], path.name
        assert all(names)
    assert describe(obj)["components"] == ["seat", "back"]
    assert "2 components: 0, 1" in CliRunner().invoke(app, ["info", str(glb)]).output


# -- reconstruct: one reading, the input's order and names --------------------------------------------------------

@pytest.fixture
def identity_vae(monkeypatch):
    """`reconstruct` with a VAE whose round trip is the identity (no model, no decoding); yields the extraction
    settings each run was given."""
    import moca3d.training.train_vae as train_vae

    given = []

    def identity(parts, names, vae, points, extract, **kwargs):
        given.append(extract)
        return parts

    monkeypatch.setattr(train_vae, "reconstruct_components", identity)
    monkeypatch.setattr("moca3d.commands.vae.load_vae", lambda folder, device="cpu": SimpleNamespace(config=SimpleNamespace(num_latents=16)))
    return given


def reconstruct(source, out):
    """Run `moca3d reconstruct SOURCE -o OUT` on the CPU."""
    return CliRunner().invoke(app, ["reconstruct", str(source), "-o", str(out), "--resolution", "32", "--device", "cpu"])


def test_reconstruct_reads_the_inputs_empty_components_once(identity_vae, tmp_path, monkeypatch):
    """They were parsed twice: to keep them in place, then again to name them in the warning."""
    parts = boxes(2)
    save_components(tmp_path / "in.glb", [parts[0], trimesh.Trimesh(), parts[1]], ["a", "hole", "b"], metadata={"verb": "generate"})
    calls = []
    real = mesh_io.empty_components
    monkeypatch.setattr(mesh_io, "empty_components", lambda path: calls.append(path) or real(path))
    result = reconstruct(tmp_path / "in.glb", tmp_path / "out.glb")
    assert result.exit_code == 0, result.output
    assert "kept as empty: hole (empty in the input)" in result.output
    assert calls == [tmp_path / "in.glb"]
    # the packaged reconstruction VAE (not the built-in pipeline's: another decoder) is what the record names
    assert describe(tmp_path / "out.glb")["settings"]["model"] == "built-in reconstruction VAE"


@pytest.mark.parametrize("suffix", [".glb", ".obj"])
def test_reconstruct_keeps_the_input_order_when_names_are_made_unique_around_an_empty_part(identity_vae, tmp_path, suffix):
    """"a" and "a " are one name once trimmed: the second became "a_1", which the input's order did not know, so it
    moved to the end, behind the empty part's neighbours (a, hole, b, a_1)."""
    parts = boxes(3)
    source = glb_of(tmp_path / "in.glb", [("a", parts[0]), ("hole", None), ("a ", parts[1]), ("b", parts[2])])
    expected = ["a", "hole", "a_1", "b"]
    assert read_prediction(source)[1] == expected
    result = reconstruct(source, tmp_path / f"out{suffix}")
    assert result.exit_code == 0, result.output
    meshes, names = read_prediction(tmp_path / f"out{suffix}")
    assert names == expected and [len(m.faces) > 0 for m in meshes] == [True, False, True, True]
    assert [round(float(m.bounds.mean(axis=0)[0])) for m in meshes if len(m.faces)] == [0, 2, 4]  # each part in its place


def test_reconstruct_shows_its_progress_bar_only_on_a_terminal(identity_vae, tmp_path, monkeypatch):
    """The decoding bar was drawn into pipes and log files, where the other verbs show none; it is tqdm's, on stderr,
    so stderr is the stream that decides (stdout was checked: `reconstruct ... 2> log` filled the log with it)."""
    import moca3d.progress as progress
    from moca3d.progress import on_terminal

    save_components(tmp_path / "in.glb", boxes(2), ["a", "b"])
    assert reconstruct(tmp_path / "in.glb", tmp_path / "out.glb").exit_code == 0  # CliRunner: no terminal
    with monkeypatch.context() as patch:
        patch.setattr("rich.console.Console.is_terminal", property(lambda self: True))
        assert reconstruct(tmp_path / "in.glb", tmp_path / "out.glb").exit_code == 0
    assert [extract.progress for extract in identity_vae] == [False, True]
    checked = []
    monkeypatch.setattr(progress, "on_terminal", lambda stream=None: checked.append(stream is sys.stderr) or on_terminal(stream))
    assert reconstruct(tmp_path / "in.glb", tmp_path / "out.glb").exit_code == 0
    assert checked == [True]


def test_on_terminal_asks_the_stream_it_is_given():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    from moca3d.progress import on_terminal

    assert on_terminal(Terminal()) and not on_terminal(io.StringIO())


def test_reconstruct_faces_budget_counts_only_the_parts_it_decodes(identity_vae, tmp_path):
    """A generation's empty part counted against --faces (40 for parts a, hole, b was refused: 'at least 20 each, 60 in
    all'), though only the two solid parts are decoded and simplified."""
    parts = boxes(2)
    save_components(tmp_path / "in.glb", [parts[0], trimesh.Trimesh(), parts[1]], ["a", "hole", "b"], metadata={"verb": "generate"})
    result = CliRunner().invoke(app, ["reconstruct", str(tmp_path / "in.glb"), "-o", str(tmp_path / "out.glb"), "--resolution",
                                      "32", "--device", "cpu", "--faces", "40"])
    assert result.exit_code == 0, result.output
    assert sum(len(m.faces) for m in read_prediction(tmp_path / "out.glb")[0]) <= 40


# -- writers: odd names stay on their line -------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".obj", ".glb"])
def test_names_with_line_breaks_and_control_characters_are_written_on_one_line(tmp_path, suffix):
    """A name holding a line break broke the OBJ: "a\\nv 9 9 9" became object "a" and an extra vertex (every face of
    the file then pointed one vertex off); the GLB kept it, and info printed it over two lines."""
    parts = boxes(4)
    odd = ["a\nv 9 9 9", "b\r\n\tc\x00d", "  e   f  ", "a v\u20289 9 9"]
    path = save_components(tmp_path / f"odd{suffix}", parts, odd, metadata={"verb": "generate"})
    written = ["a v 9 9 9", "b c d", "e f", "a v 9 9 9_1"]  # one line each, unique
    if suffix == ".obj":
        lines = path.read_text().split("\n")
        assert [line[2:] for line in lines if line.startswith("o ")] == written
        assert "v 9 9 9" not in lines
    else:
        assert [node["name"] for node in gltf_document(path)["nodes"]] == written
    meshes, names = load_file(path)
    assert names == read_prediction(path)[1] == describe(path)["components"] == written
    assert all(np.allclose(m.bounds, p.bounds) for m, p in zip(meshes, parts))  # the geometry is intact
    assert f"4 components: {', '.join(written)}\n" in CliRunner().invoke(app, ["info", str(path)]).output


def test_reconstruct_warns_of_open_components(identity_vae, tmp_path):
    """prepare named an open part; reconstruct returned it hollow and ragged without a word."""
    from moca3d.errors import InputWarning

    opened = trimesh.creation.box()
    opened.update_faces(np.arange(len(opened.faces)) >= 2)  # one side of the box missing
    save_components(tmp_path / "in.glb", [boxes(1)[0], opened.apply_translation([3, 0, 0])], ["closed", "lidless"])
    with pytest.warns(InputWarning, match="in.glb: open .not watertight. components lidless"):
        assert reconstruct(tmp_path / "in.glb", tmp_path / "out.glb").exit_code == 0


def test_evaluate_warns_of_a_predicted_part_with_nan_vertices(tmp_path):
    """One NaN vertex emptied its whole part silently (CD inf, F 0, exit 0): a broken export looked like a generation's
    empty part. It still scores as empty (instance i stays i), with one warning naming it; a generation's empty part,
    no warning."""
    import warnings

    from moca3d.errors import InputWarning

    parts = boxes(2)
    broken = trimesh.Trimesh(np.vstack([parts[1].vertices[:-1], [[np.nan, 0, 0]]]), parts[1].faces, process=False)
    path = tmp_path / "pred.obj"
    path.write_text(trimesh.exchange.obj.export_obj(trimesh.Scene({"a": parts[0], "b": broken}), include_normals=False))
    with pytest.warns(InputWarning, match=r"pred.obj: 1 component\(s\) with NaN or infinite vertices scored as empty: b"):
        meshes, names = read_prediction(path)
    assert names == ["a", "b"] and [len(m.faces) > 0 for m in meshes] == [True, False]
    save_components(tmp_path / "gen.glb", [parts[0], trimesh.Trimesh()], ["a", "b"], metadata={"verb": "generate"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        assert [len(m.faces) > 0 for m in read_prediction(tmp_path / "gen.glb")[0]] == [True, False]
