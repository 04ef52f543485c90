"""`moca3d --help` and the verbs' shared conventions."""

import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from moca3d.cli import VERB_ORDER, app


def _commands():
    group = typer.main.get_group(app)
    return group, group.list_commands(None)


def test_help_lists_every_verb_in_workflow_order():
    group, names = _commands()
    verbs = [n for n in names if n != "convert"]  # convert is a group of its own (triposg, partcrafter)
    assert sorted(verbs) == sorted(VERB_ORDER), "a new verb needs a place in cli.VERB_ORDER"
    assert verbs == list(VERB_ORDER)
    text = CliRunner().invoke(app, ["--help"]).output
    assert text.index("generate ") < text.index("train ") and "Start here: moca3d generate" in text
    for name in names:
        assert group.get_command(None, name).get_short_help_str(), f"{name} has no help line"


def test_every_output_option_takes_out_and_output():
    group, names = _commands()
    checked = 0
    for name in names:
        command = group.get_command(None, name)
        for param in getattr(command, "params", []):
            if "-o" in param.opts:
                assert {"--out", "--output"} <= set(param.opts), f"{name}: {param.opts}"
                checked += 1
    assert checked >= 10  # generate, generate-scene, render, prepare, train-*, evaluate-*, ... (the loop ran)


def test_sampling_defaults_have_one_definition():
    import inspect

    from moca3d import defaults
    from moca3d.evaluation import evaluate_pipeline, evaluate_scenes
    from moca3d.pipeline import MoCAPipeline

    group, _ = _commands()

    def cli_default(verb, name):
        return next(p.default for p in group.get_command(None, verb).params if p.name == name)

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    for verb, fn, guidance in [("generate", MoCAPipeline.__call__, defaults.GUIDANCE),
                               ("evaluate-model", evaluate_pipeline, defaults.GUIDANCE),
                               ("generate-scene", MoCAPipeline.generate_scene, defaults.SCENE_GUIDANCE),
                               ("evaluate-scenes", evaluate_scenes, defaults.SCENE_GUIDANCE)]:
        assert cli_default(verb, "guidance") == default(fn, "guidance") == guidance, verb
        assert cli_default(verb, "steps") == default(fn, "steps") == defaults.STEPS, verb


def test_generate_takes_a_folder_of_images_one_glb_each_and_names_the_bad_ones(object_dataset, object_pipeline, tmp_path):
    """The model loads once; each image writes <name>.glb into the output folder; an unreadable one is reported and
    skipped, and the command then ends with one line naming it."""
    import shutil

    import trimesh

    from moca3d.errors import ConfigError, InputError

    root, _ = object_dataset
    images = tmp_path / "images"
    images.mkdir()
    renders = sorted((root / "assets").iterdir())[:2]
    for k, asset in enumerate(renders):
        shutil.copy(asset / "render.png", images / f"view{k}.png")
    (images / "notes.png").write_text("not an image")
    (images / "readme.txt").write_text("ignored: not an image file name")
    out = tmp_path / "out"
    args = ["generate", str(images), "--model", object_pipeline, "--parts", "2", "--steps", "2", "--resolution", "16",
            "--device", "cpu", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, InputError), result.output
    assert "1 of 3 images could not be used (first: notes.png)" in str(result.exception)
    assert "skipped notes.png" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["view0.glb", "view1.glb"]
    assert len(trimesh.load(out / "view0.glb", force="scene").geometry) >= 1
    wrong = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "one.glb")])
    assert isinstance(wrong.exception, ConfigError) and "-o names the folder" in str(wrong.exception)
    (images / "notes.png").unlink()
    (images / "view0.jpg").write_bytes((images / "view0.png").read_bytes())
    clash = CliRunner().invoke(app, args)
    assert isinstance(clash.exception, InputError) and "two images are named 'view0'" in str(clash.exception)


def test_evaluate_model_scores_a_folder_of_predictions_in_any_frame(object_dataset, tmp_path):
    """Another method's outputs, <id>.glb per asset: the GT itself scores F = 1, also moved and scaled (each side is
    normalised); an asset without a prediction scores as empty and is listed; no model is loaded."""
    import numpy as np
    from conftest import cli_report

    from moca3d.data.dataset import read_manifest
    from moca3d.errors import ConfigError, InputError
    from moca3d.geometry.mesh_io import load_components, save_components

    root, _ = object_dataset
    ids = [r["id"] for r in read_manifest(root, "train")]
    preds = tmp_path / "preds"
    preds.mkdir()
    for k, asset in enumerate(ids[:2]):
        meshes, names = load_components(root / "assets" / asset / "mesh.glb")
        if k == 1:  # another frame: scaled by 3 and moved
            meshes = [m.copy().apply_scale(3.0).apply_translation([5.0, -2.0, 1.0]) for m in meshes]
        save_components(preds / f"{asset}.glb", meshes, names)
    base = ["evaluate-model", str(root), "--split", "train", "--metric-points", "4000", "--predictions", str(preds)]
    report = cli_report(base, tmp_path / "scores.json")
    scores = {row["id"]: row for row in report["assets"]}
    printed = CliRunner().invoke(app, base)  # the summary counts empty predicted parts (the JSON alone had them)
    solid = sum(scores[a]["num_pred"] for a in ids[:2])
    assert printed.exit_code == 0 and f"0 of {solid} predicted parts empty" in printed.output, printed.output
    for asset in ids[:2]:
        assert scores[asset]["fscore@0.1"] == 1.0 and scores[asset]["chamfer"] < 0.06  # the sampling floor at 4000 points
    assert report["missing"] == ids[2:] and all(scores[a]["fscore@0.1"] == 0.0 for a in ids[2:])
    from moca3d.errors import InputWarning

    with pytest.warns(InputWarning, match=rf"--frame gt: 1 of {len(ids)} predictions barely overlap their ground truth's box "
                                          rf"\(IoU under 0.4; first: {ids[1]}\)"):  # the moved one; missing ones are not
        in_gt_frame = {row["id"]: row for row in cli_report(base + ["--frame", "gt"], tmp_path / "gt.json")["assets"]}
    assert in_gt_frame[ids[0]]["fscore@0.1"] == 1.0 and in_gt_frame[ids[1]]["fscore@0.1"] < 0.2  # the moved one: off
    assert isinstance(CliRunner().invoke(app, base + ["--frame", "partcrafter"]).exception, ConfigError)
    both = CliRunner().invoke(app, base + ["--save", str(tmp_path / "saved")])
    assert isinstance(both.exception, ConfigError) and "give one of them" in str(both.exception)
    assert report["mean"]["fscore@0.1"] == np.mean([scores[a]["fscore@0.1"] for a in ids]) and "model" not in report
    wrong = CliRunner().invoke(app, base + ["--model", "somewhere"])
    assert isinstance(wrong.exception, ConfigError) and "--model would not be used" in str(wrong.exception)
    empty = tmp_path / "none"
    empty.mkdir()
    nothing = CliRunner().invoke(app, base[:-1] + [str(empty)])
    assert isinstance(nothing.exception, InputError) and "no prediction for any of the" in str(nothing.exception)


def test_saved_generations_score_as_they_did_when_read_back(object_dataset, object_pipeline, tmp_path):
    """evaluate-model --save writes each generation as <id>.glb; --predictions on that folder gives the same scores,
    in either frame (a model's outputs are in the prepared assets' frame)."""
    from moca3d.evaluation import evaluate_pipeline
    from moca3d.pipeline import MoCAPipeline

    root, _ = object_dataset
    pipe = MoCAPipeline.from_pretrained(object_pipeline)
    kw = dict(count=2, steps=2, resolution=16, metric_points=2000, progress=False)
    generated = evaluate_pipeline(pipe, root, "train", save=tmp_path / "saved", **kw)
    saved = {p.stem for p in (tmp_path / "saved").iterdir()}
    kept = {row["id"] for row in generated["assets"] if row["num_pred"]}  # an all-empty generation has no file
    assert saved == kept
    from moca3d.commands.info import generation_record

    record = generation_record(next((tmp_path / "saved").iterdir()))["settings"]  # how it was made, as `generate` records
    assert record.get("saved_by") == "evaluation" and (record.get("steps"), record.get("seed")) == (2, 0) and "model" in record, record
    read = evaluate_pipeline(None, root, "train", predictions=tmp_path / "saved", **kw)
    for a, b in zip(generated["assets"], read["assets"]):
        assert (a["id"], a["fscore@0.1"], a["num_pred"], a["num_empty"]) == (b["id"], b["fscore@0.1"], b["num_pred"], b["num_empty"])
        assert a["chamfer"] == pytest.approx(b["chamfer"], rel=1e-6)  # GLB stores float32 vertices
    assert generated["frame"] == "each" and evaluate_pipeline(None, root, "train", predictions=tmp_path / "saved", frame="gt",
                                                                 **kw)["frame"] == "gt"
    import trimesh

    from moca3d.evaluation import load_prediction, save_prediction

    box = trimesh.creation.box()
    save_prediction(tmp_path / "saved", "holed", [box, trimesh.Trimesh(), box.copy().apply_translation([2, 0, 0])], "part")
    back, _ = load_prediction(tmp_path / "saved", "holed", [])  # the empty part in its place (it was dropped: 2 parts)
    assert [len(m.faces) for m in back] == [12, 0, 12]


def test_predictions_found_in_any_mesh_format_and_a_one_file_folder_gives_its_parts(object_dataset, tmp_path):
    """<id>.GLB, <id>.gltf and <id>/<any name>.glb are predictions too (they were listed as missing, or a folder's one
    file fused into one part); a prediction's empty part is kept and counted as empty."""
    import trimesh

    from moca3d.data.dataset import read_manifest
    from moca3d.evaluation import evaluate_pipeline
    from moca3d.geometry.mesh_io import load_components, save_components

    root, _ = object_dataset
    ids = [r["id"] for r in read_manifest(root, "train")][:3]
    preds = tmp_path / "preds"
    parts = {}
    for asset in ids:
        parts[asset] = load_components(root / "assets" / asset / "mesh.glb")
    save_components(preds / f"{ids[0]}.GLB", *parts[ids[0]])
    trimesh.Scene(parts[ids[1]][0]).export(preds / f"{ids[1]}.gltf")
    meshes, names = parts[ids[2]]
    save_components(preds / ids[2] / "output.glb", [*meshes, trimesh.Trimesh()], [*names, "empty"], metadata={"verb": "generate"})
    report = evaluate_pipeline(None, root, "train", count=3, metric_points=20_000, progress=False, predictions=preds)
    assert report["missing"] == []
    scores = {row["id"]: row for row in report["assets"]}
    assert all(scores[a]["fscore@0.1"] > 0.99 for a in ids)  # each its ground truth: to the sampling floor
    assert scores[ids[2]]["num_pred"] == len(meshes) and scores[ids[2]]["num_empty"] == 1


def test_generate_folder_warns_about_each_image_on_a_coloured_background_by_name(object_pipeline, tmp_path):
    """Python shows a warning once per place: the second image on a grey background went unwarned, and the one
    warning did not say which image it was about."""
    import warnings

    import numpy as np
    from PIL import Image

    from moca3d.errors import InputWarning

    images = tmp_path / "images"
    images.mkdir()
    for name, background in (("grey", 120), ("blue", 60), ("white", 255)):
        pixels = np.full((48, 48, 3), background, dtype=np.uint8)
        pixels[12:36, 12:36] = (200, 30, 30)
        Image.fromarray(pixels).save(images / f"{name}.png")
    args = ["generate", str(images), "--model", object_pipeline, "--parts", "1", "--steps", "1", "--resolution", "16",
            "--device", "cpu", "-o", str(tmp_path / "out")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own filter for a UserWarning
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, InputWarning))
    assert len(messages) == 2 and messages[0].startswith("blue.png: the image has no transparency")
    assert messages[1].startswith("grey.png: ")


def test_object_verbs_refuse_a_scene_adapter_before_loading_a_model(object_dataset, tmp_path, monkeypatch):
    """`generate --lora` and `evaluate-model --lora` with a scene adapter (OUT/lora of train-scene) stop with one line
    naming the kind, before any pipeline loads."""
    import json

    from moca3d.errors import CheckpointError
    from moca3d.pipeline import MoCAPipeline

    spec = {"rank": 4, "alpha": 4, "target_modules": ["blocks.0.attn.to_q"], "train_full": []}
    adapter = tmp_path / "scene_lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "format": "moca3d-lora", **spec, "base_fingerprint": "0" * 64, "condition": "scene",
        "image_encoder": {**spec, "widen_init": "zero"}}))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(MoCAPipeline, "from_pretrained", no_loading)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(image)
    for args in (["generate", str(image), "--lora", str(adapter), "-o", str(tmp_path / "o.glb")],
                 ["evaluate-model", str(object_dataset[0]), "--split", "train", "--lora", str(adapter)]):
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, CheckpointError), result.output
        assert "a LoRA adapter for scenes" in str(result.exception) and "this needs one for objects" in str(result.exception)


def test_an_adapter_config_with_a_malformed_condition_is_one_line(tmp_path):
    import json

    from moca3d.errors import CheckpointError
    from moca3d.models.lora import read_adapter_config

    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "format": "moca3d-lora", "rank": 4, "alpha": 4, "target_modules": [], "train_full": [], "base_fingerprint": "0",
        "condition": ["scene"]}))
    with pytest.raises(CheckpointError, match="adapter of an unknown condition"):
        read_adapter_config(adapter)
    shown = CliRunner().invoke(app, ["info", str(adapter)])
    assert shown.exit_code == 0 and "?" in shown.output, shown.output


def test_ctrl_c_during_generation_says_what_was_written_and_exits_130(tmp_path, monkeypatch):
    """Ctrl+C exited with code 130 and no word; now one line on stderr names what was written by then."""
    import shutil
    from pathlib import Path

    import torch
    import trimesh

    from moca3d.pipeline import MoCAOutput, MoCAPipeline

    examples = Path(__file__).resolve().parents[1] / "examples"

    class CutAfterOne:
        """A loaded pipeline whose first generation ends and whose second one is cut by Ctrl+C."""

        def __init__(self):
            self.calls = 0

        def __call__(self, image, num_parts=1, **kwargs):
            self.calls += 1
            if self.calls > 1:
                raise KeyboardInterrupt
            return MoCAOutput([trimesh.creation.box()], ["part_00"], torch.zeros(1, 1, 1), kind="part")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MoCAPipeline, "from_pretrained", classmethod(interrupted))
    for verb in (["generate", str(examples / "chair.png")],
                 ["generate-scene", str(examples / "scene4.png"), "--masks", str(examples / "scene4_masks.png")]):
        result = CliRunner().invoke(app, verb + ["--device", "cpu", "-o", str(tmp_path / "one.glb")])
        assert result.exit_code == 130 and result.stderr == "interrupted: nothing written\n", result.output
        assert not (tmp_path / "one.glb").exists()
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(examples / "chair.png", images / name)
    monkeypatch.setattr(MoCAPipeline, "from_pretrained", classmethod(lambda cls, *args, **kwargs: CutAfterOne()))
    result = CliRunner().invoke(app, ["generate", str(images), "--parts", "1", "--device", "cpu", "-o", str(tmp_path / "out")])
    assert result.exit_code == 130 and result.stderr == f"interrupted: 1 written, the last {tmp_path / 'out' / 'a.glb'}\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.glb"]


def test_prepare_interrupted_says_what_is_kept(tmp_path, monkeypatch):
    """Ctrl+C during prepare: one line saying the prepared assets stay and the same command resumes, exit code 130."""
    import moca3d.data.prepare as prepare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "prepare", interrupted)
    out = tmp_path / "data"
    result = CliRunner().invoke(app, ["prepare", "--procedural", "objects", "--count", "2", "-o", str(out)])
    assert result.exit_code == 130, result.output
    assert result.stderr == f"interrupted: the assets prepared in {out} are kept (manifest written); the same command resumes\n"


def test_separate_writes_each_component_as_its_own_file_beside_the_output(object_pipeline, tmp_path):
    """A tool that takes one mesh per file had only the Python API's save_parts: `--separate FORMAT` writes them from
    the CLI too (generate, generate-scene), named and in place; a wrong format or a file where its folder goes is
    refused before any model loads."""
    import numpy as np

    from moca3d.errors import InputError
    from moca3d.geometry.mesh_io import read_components

    examples = Path(__file__).resolve().parents[1] / "examples"
    base = ["--steps", "2", "--resolution", "16", "--device", "cpu"]
    out = tmp_path / "chair.glb"
    result = CliRunner().invoke(app, ["generate", str(examples / "chair.png"), "--model", object_pipeline, "--parts", "3",
                                      "-o", str(out), "--separate", "OBJ", *base])
    assert result.exit_code == 0, result.output
    whole, names = read_components(out)
    solid = [n for n, m in zip(names, whole) if len(m.faces)]
    files = sorted(p.name for p in (tmp_path / "chair_parts").iterdir())
    assert files == sorted([f"{n}.obj" for n in solid] + [f"{n}.mtl" for n in solid])
    assert f"wrote {len(solid)} part file" in result.output and "chair_parts/" in result.output
    for name, mesh in zip(names, whole):
        if len(mesh.faces):  # in its place in the whole, as its own file
            (part,), _ = read_components(tmp_path / "chair_parts" / f"{name}.obj")
            assert np.allclose(part.bounds, mesh.bounds, atol=1e-5)
    for separate, message in (("fbx", "--separate writes glb, obj, ply, stl, not 'fbx'"),
                              ("ply", "blocked_parts is a file, where the ply files of the parts go")):
        (tmp_path / "blocked_parts").write_text("in the way")
        bad = CliRunner().invoke(app, ["generate", str(examples / "chair.png"), "--model", str(tmp_path / "nowhere"),
                                       "-o", str(tmp_path / "blocked.glb"), "--separate", separate])
        assert isinstance(bad.exception, InputError) and re.search(message, str(bad.exception)), bad.output
    scene = CliRunner().invoke(app, ["generate-scene", str(examples / "scene4.png"), "--masks", str(examples / "scene4_masks.png"),
                                     "-o", str(tmp_path / "room.glb"), "--separate", "stl", "--steps", "4", "--resolution", "32",
                                     "--device", "cpu"])
    assert scene.exit_code == 0, scene.output
    assert {p.suffix for p in (tmp_path / "room_parts").iterdir()} == {".stl"}
    assert all(p.stem.startswith("instance_") for p in (tmp_path / "room_parts").iterdir())
