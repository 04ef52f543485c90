"""The lower-level API a researcher scripts against: flow.sample seeded like the pipeline, decode_latents taking what
generate_latents returns, one-line errors that quote what they were given."""

from pathlib import Path

import pytest
import torch

from moca3d import MoCAPipeline, flow
from moca3d.errors import ConfigError, InputError

CHAIR = Path(__file__).resolve().parents[1] / "examples" / "chair.png"


@pytest.fixture(scope="module")
def pipe(object_pipeline):
    return MoCAPipeline.from_pretrained(str(object_pipeline))


def test_flow_sample_with_a_seeded_generator_is_reproducible_and_matches_the_pipeline(pipe):
    """Without `ids`, the transformer drew new component IDs from the global RNG at every call (each step, each
    guidance half): two runs from one seed differed (max 2.18). One draw from the generator now, as the pipeline's."""
    cond = pipe.encode_image(CHAIR)  # (1, M, D)
    cfg = pipe.transformer.config
    shape = (1, 3, cfg.num_latents, cfg.in_channels)
    runs = [flow.sample(pipe.transformer, cond, shape, uncond=torch.zeros_like(cond), steps=3, guidance=3.0,
                        generator=torch.Generator().manual_seed(5), scheduler=pipe.scheduler) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(123)  # the global RNG plays no part
    again = flow.sample(pipe.transformer, cond, shape, uncond=torch.zeros_like(cond), steps=3, guidance=3.0,
                        generator=torch.Generator().manual_seed(5), scheduler=pipe.scheduler)
    assert torch.equal(runs[0], again)
    piped = pipe.generate_latents(cond, 3, steps=3, guidance=3.0, seed=5)
    assert torch.equal(piped, runs[0])  # the pipeline's own draws, in its order


def test_decode_latents_takes_generate_latents_output(pipe):
    cfg = pipe.transformer.config
    latents = torch.randn(1, 2, cfg.num_latents, cfg.in_channels)
    assert len(pipe.decode_latents(latents, resolution=16)) == 2  # it raised "too many values to unpack"
    assert len(pipe.decode_latents(latents[0], resolution=16)) == 2
    with pytest.raises(InputError, match=r"latents must be \(N, L, C\) or \(1, N, L, C\)"):
        pipe.decode_latents(latents.repeat(2, 1, 1, 1), resolution=16)


def test_errors_quote_a_string_given_for_a_number(pipe):
    with pytest.raises(InputError, match="got '2'"):
        pipe(CHAIR, num_parts="2", steps=1)
    with pytest.raises(ConfigError, match="got '3'"):
        pipe(CHAIR, num_parts=2, steps=1, seed="3")


def test_vae_encode_of_a_numpy_array_is_one_line(pipe):
    import numpy as np

    with pytest.raises(InputError, match="surface must be a torch tensor"):
        pipe.vae.encode(np.zeros((1, 64, 6), dtype=np.float32))  # AttributeError: 'str' object has no attribute 'type'


def test_transformer_and_pipeline_inputs_are_checked_in_one_line(pipe):
    """Raw torch errors ("shape '[2, 65, 6, 32]' is invalid", "'float' object has no attribute 'to'") before."""
    T, c = pipe.transformer, pipe.transformer.config
    z = torch.randn(1, 2, c.num_latents, c.in_channels)
    cond = torch.randn(1, 5, c.cond_dim)
    assert T(z, torch.tensor([0.5]), cond).shape == z.shape
    for args, message in [((z, 0.5, cond), "timestep must be a tensor"), ((z, torch.tensor([.5, .1, .2]), cond), "timestep must be"),
                          ((z, torch.tensor([.5]), torch.randn(1, 4, 7)), f"cond must be \\(B, M, {c.cond_dim}\\)"),
                          ((z.repeat(2, 1, 1, 1), torch.tensor([.5, .5]), cond), "with B=2, N=2, got \\(1, 5")]:
        with pytest.raises(InputError, match=message):
            T(*args)
    with pytest.raises(InputError, match="one image per call, got a list of 2"):
        pipe([CHAIR, CHAIR], num_parts=2, steps=1)


def test_procedural_generators_check_their_counts():
    from moca3d.data.procedural import generate_object, generate_scene

    for count in (1, 100):
        with pytest.raises(ConfigError, match="scenes hold 2 to 32 objects"):
            generate_scene(0, 0, num_objects=count)
    with pytest.raises(ConfigError, match="must be >= 0"):
        generate_object(-1, 0)  # numpy's "expected non-negative integer" before
    assert len(generate_scene(0, 0, num_objects=3).meshes) == 3


def test_input_warnings_are_said_by_the_first_process_alone(monkeypatch, capsys):
    """Under torchrun every process read the same data and said each warning once per process."""
    from moca3d.cli import show_warning
    from moca3d.errors import InputWarning

    for rank, said in (("1", ""), ("3", ""), ("0", "warning: five assets left out\n"), ("", "warning: five assets left out\n")):
        monkeypatch.setenv("RANK", rank)
        show_warning(InputWarning("five assets left out"), InputWarning, "x.py", 1)
        assert capsys.readouterr().err == said, rank
    monkeypatch.delenv("RANK")
    show_warning(InputWarning("five assets left out"), InputWarning, "x.py", 1)
    assert capsys.readouterr().err == "warning: five assets left out\n"


def test_errors_and_interruptions_are_said_by_the_first_process_alone(monkeypatch, capsys):
    """Under torchrun each process printed the same `error:` line and the same `interrupted:` line (twice for 2)."""
    import sys

    import typer

    from moca3d import cli
    from moca3d.commands.common import training_stops
    from moca3d.errors import ConfigError
    from moca3d.training.stop import TrainingStopped

    def failing(*args, **kwargs):
        raise ConfigError("batch_size 3 must be divisible by the 2 processes")

    monkeypatch.setattr(cli, "app", failing)
    monkeypatch.setattr(sys, "argv", ["moca3d"])
    for rank, said in (("1", ""), ("0", "error: batch_size 3 must be divisible by the 2 processes\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as ended:
            cli.main()
        assert ended.value.code == 2 and capsys.readouterr().err == said, rank
        with pytest.raises(typer.Exit):
            with training_stops(Path("run")):
                raise TrainingStopped("stopped at step 75 of 300 (SIGTERM)", signum=15)
        assert capsys.readouterr().err == ("interrupted: stopped at step 75 of 300 (SIGTERM)\n" if rank == "0" else ""), rank


def test_usage_errors_are_one_line_printed_by_the_first_process_alone(monkeypatch, capsys):
    """Typer drew a five-line box for a usage error (USAGE.md: bad input stops with one line), and under torchrun each
    process drew it; now one `error:` line naming the verb's --help, from the first process; later ones end silently."""
    import sys

    from moca3d import cli

    cases = ((["moca3d", "train", "--bogus"], 2, "No such option: --bogus"), (["moca3d", "train"], 2, "Missing argument 'data'"),
             (["moca3d", "generate-scene", str(CHAIR)], 2, "Missing option '--masks'"), (["moca3d", "info", "--help"], 0, None))
    for argv, code, message in cases:
        monkeypatch.setattr(sys, "argv", argv)
        for rank in ("1", "0"):
            monkeypatch.setenv("RANK", rank)
            with pytest.raises(SystemExit) as ended:
                cli.main()
            out = capsys.readouterr()
            assert ended.value.code == code, (argv, rank)
            if message is None:  # --help is asked of each process: each answers
                assert "Usage:" in out.out and "info" in out.out, rank
            elif rank == "0":
                assert out.err.count("\n") == 1 and out.err.startswith(f"error: {message}"), out.err
                assert out.err.rstrip().endswith(f"{argv[1]} --help)"), out.err
            else:
                assert out.err == "" and out.out == "", (argv, out)


def test_pipeline_reconstruct_round_trips_components_through_its_vae(pipe, tmp_path):
    """The VAE round trip (the ceiling of any transformer) took private pieces from training/train_vae.py: now one call,
    for a list, one mesh or a file, in the input's frame and order, an empty component kept in its place."""
    import trimesh

    from moca3d.geometry.mesh_io import save_components

    parts = [trimesh.creation.box(extents=[1.0, 0.5, 0.5]).apply_translation([3.0, 1.0, 0.0]), trimesh.Trimesh(),
             trimesh.creation.icosphere(2, radius=0.4).apply_translation([4.5, 1.0, 0.0])]
    n = pipe.vae.config.num_latents
    out = pipe.reconstruct(parts, points=max(64, n), resolution=16)
    assert len(out) == 3 and len(out[1].faces) == 0
    import numpy as np

    shift = np.array([10.0, -2.0, 5.0])  # in the input's frame: the same round trip, moved with it (atol 1e-4)
    moved = pipe.reconstruct([p.copy().apply_translation(shift) for p in parts], points=max(64, n), resolution=16)
    for a, b in zip(out, moved):
        assert a.vertices.shape == b.vertices.shape and np.allclose(a.vertices + shift, b.vertices, atol=1e-4)
    path = tmp_path / "parts.glb"
    save_components(path, parts, ["a", "b", "c"], metadata={"saved_by": "test"})
    assert len(pipe.reconstruct(path, points=max(64, n), resolution=16)) == 3
    assert len(pipe.reconstruct(parts[0], points=max(64, n), resolution=16)) == 1
    with pytest.raises(ConfigError, match="points must be a whole number >= the VAE's"):
        pipe.reconstruct(parts, points=n - 1, resolution=16)
    loaded = trimesh.load(path)  # a Scene (trimesh.load of a GLB): its two meshes (an empty node has none), as the metrics read it
    assert isinstance(loaded, trimesh.Scene) and len(pipe.reconstruct(loaded, points=max(64, n), resolution=16)) == 2
    for wrong, holds in (([parts[0], "b.glb"], "a list holding a str"), (None, "NoneType")):
        with pytest.raises(InputError, match=f"expected trimesh meshes .*, got {holds}"):
            pipe.reconstruct(wrong, resolution=16)


def test_half_precision_on_the_cpu_is_warned_about_by_the_pipeline(object_pipeline):
    """The CLI warned of --dtype bf16 on the CPU; pipe.to("cpu", torch.float16) ran silently, several times slower."""
    import warnings

    from moca3d.errors import InputWarning

    with pytest.warns(InputWarning, match="float16 on the CPU is slower than float32"):
        half = MoCAPipeline.from_pretrained(str(object_pipeline), torch_dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        half.to(torch.float32)  # back to fp32: nothing to say
    assert half.dtype == torch.float32
    one = half(CHAIR, num_parts=1, steps=1, resolution=16, show_progress=False)
    assert repr(one).startswith("MoCAOutput(1 part, ")  # it said "1 parts"


def test_the_readmes_shipped_model_paths_load_from_any_folder(tmp_path, monkeypatch):
    """`--model src/moca3d/weights/scene` worked from anywhere (the CLI found the package's copy); the API only in the repository."""
    monkeypatch.chdir(tmp_path)
    scene = MoCAPipeline.from_pretrained("src/moca3d/weights/scene")
    assert scene.is_scene_model and scene.source["model"] == "built-in scene"
    assert not MoCAPipeline.from_pretrained(Path("src/moca3d/weights/default")).is_scene_model
    with pytest.raises(Exception, match="no such pipeline folder"):
        MoCAPipeline.from_pretrained("src/moca3d/weights/nothere")


def test_save_pretrained_can_store_half_precision_as_the_built_in_model_ships(pipe, tmp_path):
    """save_pretrained wrote fp32 only (twice the size of the shipped fp16 transformer), with no way to keep fp16."""
    from safetensors import safe_open

    full, half = pipe.save_pretrained(tmp_path / "fp32"), pipe.save_pretrained(tmp_path / "fp16", torch_dtype="fp16")
    for name, dtype in (("transformer", torch.float16), ("image_encoder", torch.float16), ("vae", torch.float32)):
        (weights,) = (half / name).glob("*.safetensors")
        with safe_open(str(weights), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}, name
    size = [sum(p.stat().st_size for p in (root / "transformer").glob("*.safetensors")) for root in (full, half)]
    assert size[1] < 0.6 * size[0]
    assert pipe.dtype == torch.float32  # the pipeline itself is not cast
    again = MoCAPipeline.from_pretrained(half)
    assert again.dtype == torch.float32  # loaded back as fp32; fp16 storage rounds the weights (rel. 1e-3)
    assert torch.allclose(again(CHAIR, num_parts=2, steps=3, resolution=16, show_progress=False).latents, pipe(CHAIR, num_parts=2, steps=3, resolution=16, show_progress=False).latents, atol=0.05)


def test_output_parts_save_one_file_each_and_read_back_as_the_components(pipe, tmp_path):
    """There was no per-part export (a tool taking one mesh per file); the folder reads back as the components."""
    import numpy as np

    from moca3d.geometry.mesh_io import read_components

    out = pipe(CHAIR, num_parts=3, steps=2, resolution=16, show_progress=False)
    solid = [n for n, m in zip(out.names, out.meshes) if len(m.faces)]
    for ext in ("glb", "obj"):
        paths = out.save_parts(tmp_path / ext, ext=ext)
        assert [p.name for p in paths] == [f"{n}.{ext}" for n in solid]
        meshes, names = read_components(tmp_path / ext)
        assert names == solid
        for mesh, name in zip(meshes, names):
            original = out.meshes[out.names.index(name)]
            assert np.allclose(mesh.bounds, original.bounds, atol=1e-5)
    with pytest.raises(InputError, match="parts are written as glb, obj, ply, stl, not 'fbx'"):
        out.save_parts(tmp_path / "x", ext="fbx")


def test_part_files_keep_name_colour_normals_and_record_and_replace_an_earlier_outputs(pipe, tmp_path):
    """Per-part files were bare geometry (a GLB node named geometry_0, no material, no record), and a second output
    saved into the same folder left the first one's other parts there, read back with it (render drew 8 of 6)."""
    import numpy as np
    import trimesh

    from moca3d.commands.info import generation_record
    from moca3d.geometry.mesh_io import gltf_document, main_color, palette, read_components

    out = pipe(CHAIR, num_parts=4, steps=2, resolution=16, show_progress=False)
    solid = [i for i, m in enumerate(out.meshes) if len(m.faces)]
    colors = palette(len(out.meshes))
    for ext in ("glb", "obj"):
        for i, path in zip(solid, out.save_parts(tmp_path / ext, ext=ext)):
            assert generation_record(path)["settings"]["seed"] == out.settings["seed"]
            (mesh,), (name,) = read_components(path)
            assert name == out.names[i] and np.abs(main_color(mesh).astype(int) - colors[i]).max() <= 6  # glb: 8-bit linear
    doc = gltf_document(tmp_path / "glb" / f"{out.names[solid[0]]}.glb")
    assert [n["name"] for n in doc["nodes"]] == [out.names[solid[0]]] and "NORMAL" in doc["meshes"][0]["primitives"][0]["attributes"]
    ply = trimesh.load(out.save_parts(tmp_path / "ply", ext="ply")[0], process=False)
    assert np.array_equal(ply.visual.vertex_colors[0], colors[solid[0]]) and "nx" in ply.metadata["_ply_raw"]["vertex"]["data"].dtype.names

    folder = tmp_path / "mixed"
    (folder).mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "part_09.stl").write_bytes(b"stale")  # an earlier, larger output's
    (folder / "part_08.obj").write_text("o part_08\n")
    (folder / "part_08.mtl").write_text("# moca3d materials, one per component\n")
    paths = out.save_parts(folder, ext="glb")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*(p.name for p in paths), "notes.txt"])
    assert read_components(folder)[1] == [out.names[i] for i in solid]
