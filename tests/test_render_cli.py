"""`moca3d render`: a preview PNG of a mesh file's components, alone or beside the input image."""

import numpy as np
import pytest
import trimesh
from PIL import Image
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.errors import ConfigError, InputError
from moca3d.geometry.mesh_io import save_glb

RED, BLUE = (220, 30, 30, 255), (30, 30, 220, 255)


@pytest.fixture
def two_boxes(tmp_path):
    """A GLB with a red box on the left and a blue box on the right."""
    left, right = trimesh.creation.box(extents=[0.6, 0.6, 0.6]), trimesh.creation.box(extents=[0.6, 0.6, 0.6])
    left.apply_translation([-0.5, 0, 0])
    right.apply_translation([0.5, 0, 0])
    path = tmp_path / "boxes.glb"
    save_glb(path, [left, right], ["left", "right"], colors=np.array([RED, BLUE]))
    return path


def test_render_counts_what_it_drew_of_the_file(tmp_path):
    """One box and an empty node: "1 component drawn of 2" (it said "1 components", while info said 2 components)."""
    path = save_glb(tmp_path / "one.glb", [trimesh.creation.box(), trimesh.Trimesh()], ["box", "empty"], metadata={"seed": 0})
    result = CliRunner().invoke(app, ["render", str(path), "-o", str(tmp_path / "one.png"), "--size", "32"])
    assert result.exit_code == 0 and "1 component drawn of 2 (the others empty or degenerate)" in result.output


def test_render_draws_every_component_in_its_colour(two_boxes, tmp_path):
    out = tmp_path / "preview.png"
    result = CliRunner().invoke(app, ["render", str(two_boxes), "-o", str(out), "--size", "64", "--azimuth", "0"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 2 components drawn\n" in result.output
    rgb = np.asarray(Image.open(out).convert("RGB")).astype(int)  # (64, 64, 3)
    assert rgb.shape == (64, 64, 3)
    reddish = (rgb[..., 0] > rgb[..., 2] + 60).sum()
    bluish = (rgb[..., 2] > rgb[..., 0] + 60).sum()
    assert reddish > 50 and bluish > 50
    # seen from +z, the red box (x < 0) is on the left half, the blue one on the right
    cols = np.arange(64)[None, :].repeat(64, 0)
    assert cols[rgb[..., 0] > rgb[..., 2] + 60].mean() < 32 < cols[rgb[..., 2] > rgb[..., 0] + 60].mean()


def test_render_beside_an_image_doubles_the_width(two_boxes, tmp_path):
    image = tmp_path / "input.png"
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(image)  # transparent: composited on white
    out = tmp_path / "pair.png"
    result = CliRunner().invoke(app, ["render", str(two_boxes), "-o", str(out), "--size", "32", "--beside", str(image)])
    assert result.exit_code == 0, result.output
    pair = np.asarray(Image.open(out).convert("RGB"))
    assert pair.shape == (32, 64, 3)
    assert (pair[:, :32] == 255).all()


def test_render_bad_inputs_are_one_line_errors(two_boxes, tmp_path):
    text = tmp_path / "not_an_image.png"
    text.write_text("hello")
    result = CliRunner().invoke(app, ["render", str(two_boxes), "-o", str(tmp_path / "x.png"), "--beside", str(text)])
    assert isinstance(result.exception, InputError) and "cannot read image" in str(result.exception)
    result = CliRunner().invoke(app, ["render", str(tmp_path / "missing.glb"), "-o", str(tmp_path / "y.png")])
    assert isinstance(result.exception, InputError) and "missing.glb: no such file or folder" in str(result.exception)
    assert not (tmp_path / "y.png").exists()


def test_render_refuses_unrenderable_meshes_angles_and_outputs(two_boxes, tmp_path):
    """A picture that would come out blank (NaN or zero-area mesh, NaN angle) or cannot be saved is a one-line error."""
    box = trimesh.creation.box()
    vertices = np.array(box.vertices)
    vertices[0, 0] = np.nan
    nan_mesh, flat_mesh = tmp_path / "nan.obj", tmp_path / "flat.obj"
    trimesh.Trimesh(vertices, box.faces, process=False).export(nan_mesh)
    trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [[0, 1, 2]], process=False).export(flat_mesh)  # one degenerate face
    cases = [
        ([str(nan_mesh)], "non-finite (NaN/inf) vertices"),
        ([str(flat_mesh)], "zero surface area"),
        ([str(two_boxes), "--elevation", "nan"], "--elevation must be a finite number of degrees, got nan"),
        ([str(two_boxes), "--azimuth", "inf"], "--azimuth must be a finite number of degrees, got inf"),
    ]
    out = tmp_path / "never.png"
    for args, message in cases:
        result = CliRunner().invoke(app, ["render", *args, "-o", str(out), "--size", "16"])
        assert isinstance(result.exception, InputError) and message in str(result.exception), result.output
        assert not out.exists()
    unwritable = tmp_path / "a_file.png"
    unwritable.write_text("")
    result = CliRunner().invoke(app, ["render", str(two_boxes), "-o", str(unwritable / "r.png"), "--size", "16"])
    assert isinstance(result.exception, ConfigError), result.output  # it said "cannot write .../r.png: File exists"
    assert str(result.exception) == f"--output {unwritable / 'r.png'}: {unwritable} is a file, not a folder"


def test_render_far_from_the_origin_and_at_any_scale_is_the_same_picture(two_boxes, tmp_path):
    """The preview does not depend on where the mesh sits or its units: the boxes moved 1e7 away and scaled 1e3 render
    as they do at the origin (float32 rays far out would draw facets and gaps)."""
    from moca3d.geometry.mesh_io import load_file

    meshes, names = load_file(two_boxes)
    far = tmp_path / "far.glb"
    save_glb(far, [m.copy().apply_scale(1e3).apply_translation([1e7, -3e6, 2e6]) for m in meshes], names,
             colors=np.array([RED, BLUE]))
    pictures = []
    for path in (two_boxes, far):
        out = tmp_path / f"{path.stem}.png"
        result = CliRunner().invoke(app, ["render", str(path), "-o", str(out), "--size", "64"])
        assert result.exit_code == 0, result.output
        pictures.append(np.asarray(Image.open(out).convert("RGB")).astype(int))
    assert np.abs(pictures[0] - pictures[1]).max() <= 8


def test_render_takes_more_components_than_an_8_bit_mask_holds(tmp_path):
    """300 parts (a scan's pieces, a big scene): the preview is drawn; the label mask is 16-bit, every part in it."""
    from moca3d.geometry.render import RenderConfig, orbit_camera, render

    cubes = [trimesh.creation.box(extents=[0.05] * 3).apply_translation([(i % 20) * 0.1 - 1, (i // 20) * 0.1 - 0.75, 0])
             for i in range(300)]
    config = RenderConfig(size=256, supersample=1)
    _, mask = render(cubes, orbit_camera(cubes, 0.0, 89.0, config), config=config)
    assert mask.dtype == np.uint16 and mask.max() > 254
    path = tmp_path / "many.glb"
    save_glb(path, cubes, [f"piece_{i}" for i in range(300)])
    result = CliRunner().invoke(app, ["render", str(path), "-o", str(tmp_path / "many.png"), "--size", "64"])
    assert result.exit_code == 0 and "300 components" in result.output, result.output


def test_a_stray_degenerate_part_is_left_out_of_the_picture_not_fatal(tmp_path):
    """One collapsed node (zero area) of an otherwise fine export made render refuse the whole file."""
    from moca3d.errors import InputWarning
    from moca3d.geometry.mesh_io import save_glb

    stray = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [[0, 1, 2]], process=False)
    save_glb(tmp_path / "export.glb", [trimesh.creation.box(), stray], ["body", "stray"])
    out = tmp_path / "export.png"
    with pytest.warns(InputWarning, match="1 component.s. with zero area or non-finite vertices left out of the picture: stray"):
        result = CliRunner().invoke(app, ["render", str(tmp_path / "export.glb"), "-o", str(out), "--size", "16"])
    assert result.exit_code == 0 and out.is_file(), result.output


def test_a_wide_image_beside_keeps_its_aspect(two_boxes, tmp_path):
    """A 3:1 photo was squeezed into the square: now fitted, centred, on white."""
    wide = np.full((20, 60, 3), 255, np.uint8)
    wide[:, 20:40] = (0, 0, 0)  # a black square in the middle third
    Image.fromarray(wide).save(tmp_path / "wide.png")
    result = CliRunner().invoke(app, ["render", str(two_boxes), "-o", str(tmp_path / "out.png"), "--size", "60",
                                      "--beside", str(tmp_path / "wide.png")])
    assert result.exit_code == 0, result.output
    left = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))[:, :60]
    dark = np.argwhere(left.max(axis=2) < 128)  # the black square: 20 x 20, in the middle of the panel
    assert dark[:, 0].min() == 20 and dark[:, 0].max() == 39 and dark[:, 1].min() == 20 and dark[:, 1].max() == 39
    assert (left[:20] == 255).all() and (left[40:] == 255).all()  # white above and below
