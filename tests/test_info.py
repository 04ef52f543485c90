"""`moca3d info`: a pipeline's or adapter's contents from its configs and weight headers, without loading a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.commands.info import describe
from moca3d.defaults import DEFAULT_MODEL_DIR, DEFAULT_SCENE_MODEL_DIR
from moca3d.errors import CheckpointError, InputError


def test_the_built_in_models_are_described_as_their_loaded_weights_count():
    from moca3d.pipeline import MoCAPipeline

    report = describe(DEFAULT_MODEL_DIR)
    assert report["kind"] == "pipeline" and report["task"] == "objects (one image)" and report["max_components"] == 50
    loaded = MoCAPipeline.from_pretrained()
    for name in ("transformer", "image_encoder", "vae"):  # the headers' element counts are the loaded parameters and buffers
        model = getattr(loaded, name)
        tensors = sum(t.numel() for t in model.state_dict().values())
        assert report["components"][name]["parameters"] == tensors, name
    assert report["components"]["transformer"]["dtypes"] == ["fp16"] and report["components"]["transformer"]["width"] == 192
    assert describe(DEFAULT_SCENE_MODEL_DIR)["task"] == "scenes (image + instance masks)"


def test_an_adapter_folder_and_bad_folders(tmp_path):
    from moca3d.models.lora import save_adapter

    layer = torch.nn.Linear(4, 3)
    layer.bias.requires_grad_(False)
    folder = save_adapter(tmp_path / "lora", layer, {"rank": 2, "alpha": 4, "target_modules": ["a", "b"], "train_full": ["router"],
                                                    "base": "runs/base", "base_fingerprint": None})
    report = describe(folder)
    assert report["kind"] == "LoRA adapter" and report["rank"] == 2 and report["adapted_layers"] == 2
    assert report["weights"]["parameters"] == 12  # the trained weight alone (4 x 3); the frozen bias is the base's
    for path, message in ((tmp_path / "none", "no such file or folder"), (tmp_path, "neither a pipeline folder")):
        with pytest.raises(CheckpointError, match=message):
            describe(path)


def test_info_cli_prints_a_summary_or_json():
    text = CliRunner().invoke(app, ["info"]).output
    assert "task: objects (one image), up to 50 components (trained on up to 27)" in text and "transformer   MoCATransformer: 5.4M parameters" in text
    report = json.loads(CliRunner().invoke(app, ["info", str(DEFAULT_SCENE_MODEL_DIR), "--json"]).output)
    assert report["components"]["image_encoder"]["in_channels"] == 7


def test_a_generated_file_records_how_it_was_made(tmp_path):
    """MoCAOutput.save writes the model, inputs and sampling settings into the GLB (scene extras) and the OBJ (first
    comment); `info` reads them back, and the OBJ still reads as its parts."""
    from moca3d.geometry.mesh_io import load_components, save_glb
    from moca3d.pipeline import MoCAPipeline

    out = MoCAPipeline.from_pretrained()("examples/chair.png", num_parts=2, steps=2, seed=3, resolution=32, show_progress=False)
    expected = {"model": "built-in", "lora": None, "image": "chair.png", "parts": 2, "steps": 2, "seed": 3, "guidance": 7.0,
                "resolution": 32, "shift": 1.0}
    for name in ("parts.glb", "parts.obj"):
        path = out.save(tmp_path / name)
        report = describe(path)
        assert report["kind"] == "generated file" and {k: report["settings"][k] for k in expected} == expected, name
        assert [n for n in report["components"] if n.startswith("part_")] == ["part_00", "part_01"]
    assert load_components(tmp_path / "parts.obj")[1] == ["part_00", "part_01"]
    plain = save_glb(tmp_path / "plain.glb", [m for m in out.meshes if len(m.faces)], None)
    assert describe(plain)["settings"] == {}
    text = CliRunner().invoke(app, ["info", str(plain)]).output  # moca3d wrote it, without a record: it said "not written by moca3d"
    assert "made with: no record (moca3d's generate, generate-scene and reconstruct write one)" in text and "not written" not in text
    assert "plain.glb: mesh file" in text  # not "generated file": nothing says how it was made
    stl = tmp_path / "part.stl"
    out.meshes[0].export(stl)  # formats render and evaluate read: info reads them too (it refused them)
    assert describe(stl)["kind"] == "mesh file" and len(describe(stl)["components"]) == 1
    text = CliRunner().invoke(app, ["info", str(tmp_path / "parts.glb")]).output
    assert "made with: model built-in, " in text and "seed 3" in text and "lora" not in text  # no "lora None"


def test_a_vae_folder_is_described_and_a_file_info_cannot_read_is_named(tmp_path):
    """The VAE folder `reconstruct` uses was "neither a pipeline folder nor a LoRA adapter"; an image was "no such folder"."""
    from moca3d.commands.vae import PACKAGED_VAE, load_vae

    report = describe(PACKAGED_VAE)
    assert report["kind"] == "VAE" and report["model"]["class"] == "VecSetVAE"
    assert (report["model"]["num_latents"], report["model"]["latent_channels"]) == (64, 8)
    assert report["model"]["parameters"] == sum(t.numel() for t in load_vae(None).state_dict().values())
    text = CliRunner().invoke(app, ["info", str(PACKAGED_VAE)]).output
    assert "VecSetVAE: 1.2M parameters (fp32, 4.6 MiB); latents 64 x 8," in text and "used by: moca3d reconstruct" in text
    with pytest.raises(InputError, match=r"chair.png: an image \(generate from it: moca3d generate .*\); info reads a mesh file"):
        describe(Path(__file__).resolve().parent.parent / "examples" / "chair.png")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="notes.txt: a .txt file; info reads"):
        describe(tmp_path / "notes.txt")


@pytest.mark.parametrize("partcrafter", [False, True])
def test_a_release_folder_is_named_with_its_conversion(tmp_path, partcrafter):
    """A TripoSG / PartCrafter release (transformer/, vae/, image_encoder_dinov2/, ...) was "image_encoder/config.json:
    unreadable config"."""
    from test_convert import write_release

    write_release(tmp_path, partcrafter=partcrafter)
    name = "PartCrafter" if partcrafter else "TripoSG"
    result = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert isinstance(result.exception, InputError)
    assert str(result.exception) == (f"{tmp_path}: a {name} release, not a moca3d pipeline: convert it first "
                                     f"(moca3d convert {name.lower()} {tmp_path} DST), then run info on DST")


def test_a_training_run_and_its_checkpoints_point_to_what_it_exported(object_pipeline):
    """A run folder (OUT of `moca3d train`) and a checkpoint in it were "neither a pipeline folder ... nor ..."."""
    pipeline = Path(object_pipeline)
    run = pipeline.parent
    report = describe(run)
    assert report["kind"] == "training run" and (report["step"], report["steps"], report["init_from"]) == (2, 2, None)
    assert report["exports"] == {"pipeline": str(pipeline)} and report["last_logged"]["step"] == 2
    loss = report["last_logged"]["loss"]
    text = CliRunner().invoke(app, ["info", str(run)]).output
    assert text.startswith(f"{run}: training run\n  trained to step 2 of 2 (newest checkpoint): finished; last logged loss {loss:.4f} (step 2)\n")
    assert "started from: scratch (no init_from); task: objects (one image)" in text
    assert f"  pipeline: {pipeline} (moca3d info {pipeline})\n" in text
    checkpoint = run / "checkpoints" / "step_00000001"
    report = describe(checkpoint)
    assert report["kind"] == "training checkpoint" and report["step"] == 1 and report["run"] == describe(run)
    text = CliRunner().invoke(app, ["info", str(checkpoint)]).output
    assert text.startswith(f"{checkpoint}: training checkpoint (step 1) of the run {run}\n  trained to step 2 of 2")
    assert f"  pipeline: {pipeline} (moca3d info {pipeline})\n" in text


def test_an_export_cut_off_by_a_kill_is_called_incomplete(object_pipeline, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(Path(object_pipeline).parent, run)
    (run / "pipeline" / "model_index.json").unlink()  # written last: a kill during the export leaves none
    text = CliRunner().invoke(app, ["info", str(run)]).output
    assert f"pipeline: {run / 'pipeline'} is incomplete (cut off while written)" in text
    assert describe(run)["incomplete"] == ["pipeline"]


def test_a_run_says_when_its_time_limit_or_fewer_steps_finished_it(object_dataset, tmp_path):
    """A run stopped by its time limit read "trained to step 1 of 50", as if it had more to do; one resumed with fewer
    --steps than it had run read "trained to step 2 of 1"."""
    import shutil

    from conftest import tiny_dit_recipe
    from moca3d.training.train_dit import train

    root, vae_dir = object_dataset
    train(root, tmp_path / "timed", tiny_dit_recipe(steps=50, time_limit_s=1e-6), vae_dir=vae_dir, device="cpu", progress=False)
    text = CliRunner().invoke(app, ["info", str(tmp_path / "timed")]).output
    assert "trained to step 1 of 50 (newest checkpoint): finished, its time limit of 0 s reached" in text
    train(root, tmp_path / "run", tiny_dit_recipe(steps=2), vae_dir=vae_dir, device="cpu", progress=False)
    train(root, tmp_path / "run", tiny_dit_recipe(steps=1), vae_dir=vae_dir, device="cpu", progress=False)
    text = CliRunner().invoke(app, ["info", str(tmp_path / "run")]).output
    assert "trained to step 2 (newest checkpoint): finished (its recipe now asks for 1)" in text
    train(root, tmp_path / "long", tiny_dit_recipe(steps=3, checkpoint_every=1, time_limit_s=3600), vae_dir=vae_dir,
          device="cpu", progress=False)
    shutil.rmtree(tmp_path / "long" / "checkpoints" / "step_00000003")  # cut after step 2: under way
    text = CliRunner().invoke(app, ["info", str(tmp_path / "long")]).output
    assert "trained to step 2 of 3 (newest checkpoint, 0.0 of its 60.0 min)" in text


def test_a_prepared_dataset_shows_its_assets_splits_and_which_latents_it_holds(object_dataset, tmp_path):
    """`info DATA` was refused ("neither a pipeline folder ..."): a user preparing their own data could not see its
    splits, component counts or whether (and with which VAE) encode-dataset had cached its latents."""
    import shutil

    from moca3d.data.dataset import read_manifest

    root = Path(shutil.copytree(object_dataset[0], tmp_path / "data"))
    entries = read_manifest(root)
    counts = sorted(e["num_components"] for e in entries)
    (root / "assets" / entries[0]["id"] / "latents.safetensors").unlink()  # one not encoded yet
    with open(root / "manifest.jsonl", "a") as fh:
        fh.write("{cut off by a kill\n")
    report = describe(root)
    assert report["kind"] == "prepared dataset" and report["assets"] == len(entries) and report["unreadable_lines"] == 1
    assert sum(report["splits"].values()) == len(entries) and report["kinds"] == {"object": len(entries)}
    assert sum(report["categories"].values()) == len(entries)
    assert report["components"] == {"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]}
    (made,) = report["latents"]
    assert made["assets"] == len(entries) - 1 and made["model"] == "test" and made["encoder"].startswith("sha256:")
    assert report["without_latents"] == 1 and report["splits_drawn"].startswith("by id hash (val ")
    result = CliRunner().invoke(app, ["info", str(root)])
    assert result.exit_code == 0, result.output
    assert f"{len(entries)} assets ({len(entries)} objects)" in result.output and f"latents of {len(entries) - 1} of {len(entries)}: model test" in result.output
    assert "1 asset without latents: `moca3d encode-dataset" in result.output and "--model <the VAE that made the others>" in result.output and "1 manifest line unreadable" in result.output


def test_a_folder_of_part_files_shows_its_parts_and_how_they_were_made(tmp_path):
    """`info OUT/` of `save_parts` was refused: each part file held the record, the folder could not be asked."""
    import trimesh

    from moca3d.geometry.mesh_io import save_separate

    meshes = [trimesh.creation.box(), trimesh.Trimesh(), trimesh.creation.icosphere(subdivisions=1)]
    save_separate(tmp_path / "parts", meshes, ["part_00", "part_01", "part_02"], ext="glb", metadata={"seed": 7, "steps": 2})
    report = describe(tmp_path / "parts")
    assert report["kind"] == "folder of generated parts" and report["components"] == ["part_00", "part_02"]
    assert report["settings"] == {"seed": 7, "steps": 2} and report["empty"] == []
    result = CliRunner().invoke(app, ["info", str(tmp_path / "parts")])
    assert result.exit_code == 0 and "2 components: part_00, part_02" in result.output and "seed 7" in result.output, result.output
    (tmp_path / "mine").mkdir()
    trimesh.creation.box().export(tmp_path / "mine" / "a.stl")  # no record: another tool's parts
    assert describe(tmp_path / "mine")["kind"] == "mesh file"  # one file: read as that file, as evaluate reads it
    trimesh.creation.icosphere().export(tmp_path / "mine" / "b.stl")
    mine = describe(tmp_path / "mine")
    assert mine["kind"] == "folder of part files" and mine["components"] == ["a", "b"] and mine["settings"] == {}
    # whole objects side by side (a folder of generations, e.g. `generate imgs/ -o outs/`): no one record, per file
    from moca3d.geometry.mesh_io import save_glb

    (tmp_path / "outs").mkdir()
    for name, seed in (("chair", 1), ("desk lamp", 2)):
        save_glb(tmp_path / "outs" / f"{name}.glb", [trimesh.creation.box(), trimesh.creation.icosphere().apply_translation([3, 0, 0])],
                 ["part_00", "part_01"], metadata={"seed": seed})
    (tmp_path / "outs" / "zz.ply").write_bytes(b"garbage")
    outs = describe(tmp_path / "outs")
    assert outs["kind"] == "folder of mesh files" and outs["files"] == {"chair.glb": 2, "desk lamp.glb": 2}
    assert len(outs["unreadable"]) == 1 and outs["unreadable"][0].startswith("zz.ply (")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "outs")])
    assert result.exit_code == 0 and "2 mesh files: chair.glb (2 components), desk lamp.glb (2 components)" in result.output
    assert "unreadable: zz.ply" in result.output
    (tmp_path / "broken").mkdir()
    for name in ("a.ply", "b.ply"):  # nothing readable: said so, not "0 mesh files: " (one file: read as that file)
        (tmp_path / "broken" / name).write_bytes(b"garbage")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "broken")])
    assert result.exit_code == 0 and "no readable mesh file" in result.output and "unreadable: a.ply" in result.output
    (tmp_path / "fbx").mkdir()
    (tmp_path / "fbx" / "car.fbx").write_bytes(b"\x00")
    with pytest.raises(InputError, match=r"its car.fbx are in formats moca3d does not read: export them as GLB or OBJ"):
        describe(tmp_path / "fbx")
