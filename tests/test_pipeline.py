"""End to end on tiny models: prepare -> encode latents -> train the DiT (resume) -> export -> generate."""

import json
import re
import math
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import trimesh
from PIL import Image
from typer.testing import CliRunner

from moca3d.commands.info import describe
from moca3d.data.images import preprocess_image
from moca3d.errors import CheckpointError, ConfigError, InputError
from moca3d.pipeline import DEFAULT_MODEL_DIR, DEFAULT_SCENE_MODEL_DIR, MoCAPipeline
from moca3d.training.train_dit import DiTTrainConfig, LatentDataset, build_models, step_draws, train, training_loss


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tiny_recipe(steps=4, **kw):
    recipe = dict(
        transformer=dict(width=32, num_layers=2, num_heads=4, compression=4),
        image_encoder=dict(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4),
        steps=steps, batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1,
    )
    return DiTTrainConfig.from_dict({**recipe, **kw})


@pytest.fixture(scope="module")
def dataset(object_dataset):
    """Six tiny procedural objects with cached latents of a random tiny VAE, and that VAE's folder (conftest)."""
    return object_dataset


def test_train_resume_export_and_generate(dataset, tmp_path):
    root, vae_dir = dataset
    run = tmp_path / "run"
    first = train(root, run, tiny_recipe(steps=2), vae_dir=vae_dir, device="cpu", progress=False)
    assert first["steps"] == 2 and np.isfinite(first["final_loss"])
    # resume: continue to 4 steps from the step-2 checkpoint
    second = train(root, run, tiny_recipe(steps=4), vae_dir=vae_dir, device="cpu", progress=False)
    assert (run / "checkpoints").is_dir() and second["steps"] == 4
    # a resumed run gives the same weights as an uninterrupted one
    straight = tmp_path / "straight"
    train(root, straight, tiny_recipe(steps=4), vae_dir=vae_dir, device="cpu", progress=False)
    a = MoCAPipeline.from_pretrained(run / "pipeline")
    b = MoCAPipeline.from_pretrained(straight / "pipeline")
    for (k, v), (k2, v2) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        torch.testing.assert_close(v, v2, atol=1e-6, rtol=1e-5, msg=k)

    image = root / "assets" / LatentDataset(root, "train", 32).ids[0] / "render.png"
    out = a(image, num_parts=3, steps=2, guidance=2.0, seed=1, resolution=16, show_progress=False)
    assert len(out.meshes) == 3 and out.latents.shape == (3, 16, 4)
    glb = out.save(tmp_path / "parts.glb")
    scene = trimesh.load(glb, file_type="glb")
    assert {"part_00", "part_01", "part_02"} <= set(scene.graph.nodes)
    from moca3d.geometry.mesh_io import load_components

    parts, names = load_components(out.save(tmp_path / "parts.obj"))  # OBJ: one `o` object per part, read back as parts
    assert names == ["part_00", "part_01", "part_02"]
    for got, want in zip(parts, out.meshes):
        np.testing.assert_allclose(got.vertices, want.vertices, atol=1e-6)
        assert np.array_equal(got.faces, want.faces)
    again = a(image, num_parts=3, steps=2, guidance=2.0, seed=1, resolution=16, show_progress=False)
    assert torch.equal(out.latents, again.latents), "the same seed must give the same latents"

    from moca3d.evaluation import evaluate_pipeline

    report = evaluate_pipeline(a, root, "train", count=2, steps=1, resolution=16, metric_points=2000, progress=False)
    assert report["count"] == 2 and set(report["mean"]) >= {"chamfer", "fscore@0.1", "fscore@0.05", "self_iou"}
    # each row is the metric of that asset's own generation (same settings, same metric seed), the mean their mean
    from moca3d.evaluation import object_metrics
    from moca3d.geometry.mesh_io import load_components
    from moca3d.metrics import MetricsConfig

    row = report["assets"][1]
    gt, _ = load_components(root / "assets" / row["id"] / "mesh.glb")
    meshes = a(root / "assets" / row["id"] / "render.png", num_parts=len(gt), steps=1, seed=0, resolution=16, show_progress=False).meshes
    expected = object_metrics(meshes, gt, MetricsConfig(num_points=2000, seed=0))
    for key in ("chamfer", "fscore@0.1", "fscore@0.05", "self_iou"):
        assert row[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
        assert report["mean"][key] == pytest.approx(np.mean([r[key] for r in report["assets"]]), rel=1e-12)
    # per category: the assets' count and their means (here recomputed from the rows)
    cats = {r["category"] for r in report["assets"]}
    assert set(report["by_category"]) == cats and sum(c["count"] for c in report["by_category"].values()) == 2
    for cat, summary in report["by_category"].items():
        rows = [r for r in report["assets"] if r["category"] == cat]
        assert summary["fscore@0.1"] == pytest.approx(np.mean([r["fscore@0.1"] for r in rows]))
    # --reconstruct: the GT parts through the pipeline's VAE = the cached latents decoded as a generation is
    from safetensors.torch import load_file

    from moca3d.evaluation import round_trip

    asset = image.parent
    cached = load_file(str(asset / "latents.safetensors"))["latents"]  # (N, L, C), encode-dataset's posterior means
    expected = a.decode_latents(a.vae.normalize_latents(cached), 16)
    for got, want in zip(round_trip(a, asset, 16), expected):
        np.testing.assert_allclose(got.vertices, want.vertices, atol=1e-5)
    ceiling = evaluate_pipeline(a, root, "train", count=2, resolution=16, metric_points=2000, progress=False, reconstruct=True)
    assert ceiling["reconstruct"] and [r["id"] for r in ceiling["assets"]] == [r["id"] for r in report["assets"]]


def test_latent_cache_round_trip_and_training_from_it(dataset, tmp_path):
    root, vae_dir = dataset
    data = LatentDataset(root, "train", 32)
    cache = data.save_cache(tmp_path / "cache.safetensors")
    back = LatentDataset.from_cache(cache)
    assert back.ids == data.ids
    for a, b in zip(data.latents, back.latents):
        assert torch.equal(a, b)
    for a, b in zip(data.images, back.images):
        assert torch.equal(a, b), "8-bit images must come back exactly"
    few = min(z.shape[0] for z in data.latents)
    small = LatentDataset.from_cache(cache, max_components=few)
    assert len(small) == sum(z.shape[0] <= few for z in data.latents) and all(z.shape[0] <= few for z in small.latents)
    with pytest.raises(InputError, match="not a moca3d latent cache"):
        LatentDataset.from_cache(vae_dir / "diffusion_pytorch_model.safetensors")

    with pytest.raises(ConfigError, match="cached images are 32 px"):
        LatentDataset.from_cache(cache, image_size=64)
    # training from the cache follows the same draws as training from the folder
    a = train(root, tmp_path / "folder", tiny_recipe(steps=2), vae_dir=vae_dir, device="cpu", progress=False)
    b = train(cache, tmp_path / "cached", tiny_recipe(steps=2), vae_dir=vae_dir, device="cpu", progress=False)
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-6)
    # a run resumes on the cache of its own split (the same assets), not on other assets
    assert train(cache, tmp_path / "folder", tiny_recipe(steps=3), vae_dir=vae_dir, device="cpu", progress=False)["steps"] == 3
    data.latents, data.images, data.ids = data.latents[1:], data.images[1:], data.ids[1:]
    other = data.save_cache(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match=rf"folder was trained on other data \({len(back)} assets\) than .*other.safetensors "
                                          rf"gives \({len(back) - 1} assets, other ids\): resume on its own data"):
        train(other, tmp_path / "folder", tiny_recipe(steps=4), vae_dir=vae_dir, device="cpu", progress=False)


def test_export_only_writes_the_newest_checkpoint_and_the_run_trains_on_after(dataset, tmp_path):
    import shutil

    from moca3d.cli import app

    root, vae_dir = dataset
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="run: no checkpoint to export"):
        train(root, run, tiny_recipe(steps=4), vae_dir=vae_dir, device="cpu", progress=False, export_only=True)
    train(root, run, tiny_recipe(steps=2), vae_dir=vae_dir, device="cpu", progress=False)
    shutil.move(run / "pipeline", tmp_path / "at_step_2")
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps(tiny_recipe(steps=4).to_dict()))
    result = CliRunner().invoke(app, ["train", str(root), "-o", str(run), "--config", str(config), "--vae", str(vae_dir),
                                      "--device", "cpu", "--export-only"])
    assert result.exit_code == 0, result.output
    assert "trained nothing: the run is at step 2" in result.output and "its pipeline exported, nothing trained" in result.output
    a, b = MoCAPipeline.from_pretrained(run / "pipeline"), MoCAPipeline.from_pretrained(tmp_path / "at_step_2")
    for (k, v), (_, w) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        assert torch.equal(v, w), k  # the step-2 checkpoint's EMA weights, as the run's own export at step 2
    assert train(root, run, tiny_recipe(steps=4), vae_dir=vae_dir, device="cpu", progress=False)["trained_steps"] == 2


def test_token_positions_train_on_canonical_latents_only(dataset, tmp_path):
    """A transformer with token positions refuses FPS-ordered latents (one-line error) and trains on canonical
    ones, from the folder and from a latent cache, which keeps the order; mixed orders are refused."""
    import shutil

    from moca3d.models.vae import VecSetVAE
    from moca3d.training.train_vae import encode_dataset

    root, vae_dir = dataset
    cfg = tiny_recipe(steps=2, transformer=dict(width=32, num_layers=2, num_heads=4, compression=4, token_positions=True))
    with pytest.raises(ConfigError, match="encode-dataset --token-order canonical"):
        train(root, tmp_path / "fps", cfg, vae_dir=vae_dir, device="cpu", progress=False)
    ordered = Path(shutil.copytree(root, tmp_path / "data"))
    vae = VecSetVAE.from_pretrained(vae_dir)
    encode_dataset(ordered, vae, "test", num_points=512, progress=False, token_order="canonical", overwrite=True)
    data = LatentDataset(ordered, "train", 32)
    assert data.token_order == "canonical"
    assert LatentDataset.from_cache(data.save_cache(tmp_path / "cache.safetensors")).token_order == "canonical"
    result = train(tmp_path / "cache.safetensors", tmp_path / "run", cfg, vae_dir=vae_dir, device="cpu", progress=False)
    pipe = MoCAPipeline.from_pretrained(result["pipeline"])
    assert pipe.transformer.token_order == "canonical" and np.isfinite(result["final_loss"])
    # back to FPS order (an order change re-encodes with --overwrite), then one asset canonical again: refused
    assert encode_dataset(ordered, vae, "test", num_points=512, progress=False, overwrite=True)["encoded"] == len(data)
    assert LatentDataset(ordered, "train", 32).token_order == "fps"
    from safetensors.torch import save_file

    first = ordered / "assets" / data.ids[0] / "latents.safetensors"
    save_file({"latents": data.latents[0]}, str(first), metadata={"token_order": "canonical"})
    with pytest.raises(InputError, match="mix token orders"):
        LatentDataset(ordered, "train", 32)


def test_time_limit_stops_checkpoints_and_exports(dataset, tmp_path):
    root, vae_dir = dataset
    run = tmp_path / "run"
    result = train(root, run, tiny_recipe(steps=50, time_limit_s=1e-6), vae_dir=vae_dir, device="cpu", progress=False)
    assert result["steps"] == 1, "the limit is checked after every step"
    assert (run / "checkpoints" / "step_00000001").is_dir() and (run / "pipeline" / "model_index.json").is_file()
    # a later run without the limit resumes from that checkpoint
    assert train(root, run, tiny_recipe(steps=3), vae_dir=vae_dir, device="cpu", progress=False)["steps"] == 3


def test_resume_refuses_another_recipe_keeps_its_clock_and_says_when_finished(dataset, tmp_path, capsys):
    from moca3d.training.checkpoints import latest_checkpoint

    root, vae_dir = dataset
    run = tmp_path / "run"
    train(root, run, tiny_recipe(steps=2), vae_dir=vae_dir, device="cpu", progress=False)
    lr = json.loads((run / "train_config.json").read_text())["lr"]
    with pytest.raises(ConfigError, match=rf"was started with another recipe \(lr {lr} -> 0.5\): resume with its own"):
        train(root, run, tiny_recipe(steps=4, lr=0.5), vae_dir=vae_dir, device="cpu", progress=False)
    wider = {**json.loads((run / "train_config.json").read_text())["transformer"]}
    wider["width"] *= 2  # another model size: refused by the recipe check, not by a checkpoint that will not load
    width = wider["width"] // 2
    with pytest.raises(ConfigError, match=rf"was started with another recipe \(transformer.width {width} -> {2 * width}\)"):
        train(root, run, tiny_recipe(steps=4, transformer=wider), vae_dir=vae_dir, device="cpu", progress=False)
    capsys.readouterr()
    result = train(root, run, tiny_recipe(steps=4), vae_dir=vae_dir, device="cpu", progress=False)  # more steps: allowed
    assert (result["steps"], result["trained_steps"]) == (4, 2) and "resuming with steps 2 -> 4" in capsys.readouterr().out
    assert json.loads((run / "train_config.json").read_text())["steps"] == 4
    assert json.loads((latest_checkpoint(run) / "state.json").read_text())["extra"]["elapsed_s"] > 0  # the run's clock
    result = train(root, run, tiny_recipe(steps=4), vae_dir=vae_dir, device="cpu", progress=False)
    assert (result["steps"], result["trained_steps"], result["final_loss"]) == (4, 0, None)
    assert "finished: nothing to train" in capsys.readouterr().out
    timed = tmp_path / "timed"
    train(root, timed, tiny_recipe(steps=50, time_limit_s=1e-6), vae_dir=vae_dir, device="cpu", progress=False)
    again = train(root, timed, tiny_recipe(steps=50, time_limit_s=1e-6), vae_dir=vae_dir, device="cpu", progress=False)
    assert (again["steps"], again["trained_steps"]) == (1, 0), "a resumed run's time limit counts its earlier seconds"


@pytest.mark.parametrize("recipe, message", [
    (dict(lr=-1.0), "lr must be positive, got -1.0"),
    (dict(lr=float("nan")), "lr must be positive, got nan"),
    (dict(warmup_steps=-2), "warmup_steps must be >= 0"),
    (dict(min_lr_ratio=2.0), r"min_lr_ratio must be in \[0, 1\]"),
    (dict(transformer=dict(widht=32)), "unknown transformer config keys: widht"),
    (dict(image_encoder=dict(patch=8)), "unknown image_encoder config keys: patch"),
])
def test_recipe_values_are_checked_before_training(recipe, message):
    with pytest.raises(ConfigError, match=message):
        DiTTrainConfig.from_dict(recipe)


def test_assets_without_latents_are_reported_not_silently_dropped(dataset, tmp_path):
    import shutil

    root, _ = dataset
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    first = LatentDataset(copy, "train", 32).ids[0]
    (copy / "assets" / first / "latents.safetensors").unlink()
    with pytest.warns(UserWarning, match=f"1 'train' assets have no cached latents and are left out .first: {first}."):
        data = LatentDataset(copy, "train", 32)
    assert first not in data.ids


def test_lr_schedule_is_linear_warmup_then_cosine_to_the_floor():
    """lr(s) = lr (s + 1) / W during the warm-up, then lr (m + (1 - m) (1 + cos(pi p)) / 2), p = (s - W) / (S - W)."""
    from moca3d.training.recipe import lr_at

    cfg = tiny_recipe(steps=110, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3], rel=1e-12)
    assert lr_at(10, cfg) == pytest.approx(1e-3, rel=1e-12)  # the peak, then down
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-12)  # half-way: the mean of peak and floor
    assert lr_at(35, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))), rel=1e-12)
    assert lr_at(110, cfg) == lr_at(500, cfg) == pytest.approx(1e-4, rel=1e-12)  # the floor, held after the end


def test_time_limited_schedule_ends_at_the_limit():
    from moca3d.training.recipe import lr_at
    from moca3d.training.train_dit import schedule_step

    cfg = tiny_recipe(steps=1010, warmup_steps=10, time_limit_s=100.0)
    assert schedule_step(5, cfg, elapsed=50.0) == 5, "the warm-up counts steps"
    assert schedule_step(10, cfg, elapsed=0.0) == 10
    assert schedule_step(20, cfg, elapsed=50.0) == 510, "half the time: half the schedule, however few steps ran"
    assert lr_at(schedule_step(20, cfg, elapsed=100.0), cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert schedule_step(600, cfg, elapsed=10.0) == 600, "a fast machine follows the steps"
    assert schedule_step(20, tiny_recipe(steps=1010, warmup_steps=10), elapsed=1e9) == 20, "no limit: the steps alone"
    assert schedule_step(410, cfg, elapsed=50.0) == 510, "a resumed run keeps its clock: the time limit holds for the whole run"


def test_training_backend_override_is_not_saved(dataset, tmp_path):
    root, vae_dir = dataset

    with pytest.raises(ConfigError, match="attention_backend"):
        tiny_recipe(attention_backend="fast")
    result = train(root, tmp_path / "run", tiny_recipe(steps=1, attention_backend="reference"), vae_dir=vae_dir, device="cpu", progress=False)
    pipe = MoCAPipeline.from_pretrained(result["pipeline"])
    assert pipe.transformer.config.attention_backend == "auto"
    assert pipe.transformer.attention_config.backend == "auto"


def test_validation_generations_are_logged(dataset, tmp_path):
    root, vae_dir = dataset
    run = tmp_path / "run"
    # the tiny dataset has no val split: point validation at the train manifest through a copy
    import shutil

    data = tmp_path / "data"
    shutil.copytree(root, data)
    lines = (data / "manifest.jsonl").read_text().splitlines()
    (data / "manifest.jsonl").write_text("\n".join(lines + [line.replace('"split": "train"', '"split": "val"') for line in lines[:1]]) + "\n")
    train(data, run, tiny_recipe(steps=2, validate_every=2, val_assets=1, val_steps=1, val_resolution=16), vae_dir=vae_dir, device="cpu", progress=False)
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_fscore@0.1" in r]
    assert val and val[0]["step"] == 2 and val[0]["val_count"] == 1
    assert 0.0 <= val[0]["val_fscore@0.1"] <= 1.0


def test_generate_cli_and_clear_errors(dataset, tmp_path):
    from moca3d.cli import app

    root, vae_dir = dataset
    train(root, tmp_path / "run", tiny_recipe(steps=1), vae_dir=vae_dir, device="cpu", progress=False)
    model = tmp_path / "run" / "pipeline"
    image = next((root / "assets").glob("*/render.png"))
    runner = CliRunner()
    res = runner.invoke(app, ["generate", str(image), "--parts", "2", "-o", str(tmp_path / "o.glb"), "--model", str(model), "--steps", "1", "--resolution", "16"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("wrote "), res.output  # no blank line first, left by a progress bar outside a terminal
    record = describe(tmp_path / "o.glb")["settings"]  # the image, read before the model loads, still named
    assert record["image"] == image.name and record["model"] == str(model) and record["parts"] == 2
    pipe = MoCAPipeline.from_pretrained(model)
    with pytest.raises(InputError, match="exceed the model's limit"):
        pipe(image, num_parts=51, steps=1, show_progress=False)
    with pytest.raises(InputError, match="image not found"):
        pipe(tmp_path / "missing.png", num_parts=2, steps=1, show_progress=False)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image"):
        pipe(tmp_path / "bad.png", num_parts=2, steps=1, show_progress=False)
    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "blank.png")
    with pytest.raises(InputError, match="no foreground"):
        pipe(tmp_path / "blank.png", num_parts=2, steps=1, show_progress=False)
    with pytest.raises(CheckpointError, match="model_index.json"):
        MoCAPipeline.from_pretrained(tmp_path)
    res = runner.invoke(app, ["evaluate-model", str(root), "--model", str(model), "--min-parts", "5", "--max-parts", "2"])
    assert isinstance(res.exception, ConfigError) and "--min-parts 5 is above --max-parts 2" in str(res.exception)


def test_train_cli_cache_attention_mode_and_time_limit(dataset, tmp_path):
    from moca3d.cli import app

    root, vae_dir = dataset
    runner = CliRunner()
    cache = tmp_path / "cache.safetensors"
    res = runner.invoke(app, ["cache-latents", str(root), "-o", str(cache), "--image-size", "32"])
    assert res.exit_code == 0, res.output
    assert f"{len(LatentDataset(root, 'train', 32))} assets" in res.output
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe(steps=2).to_dict()))
    base = ["train", str(cache), "--config", str(recipe), "--vae", str(vae_dir), "--device", "cpu"]
    for given in (base, base[:4]):  # without --vae too: the bad value is named, not the missing VAE
        res = runner.invoke(app, given + ["-o", str(tmp_path / "bad"), "--attention-mode", "sparse"])
        assert isinstance(res.exception, ConfigError) and "--attention-mode must be one of" in str(res.exception)
    res = runner.invoke(app, base[:4] + ["--device", "cpu", "--out", str(tmp_path / "novae")])
    assert isinstance(res.exception, ConfigError) and "needs --vae" in str(res.exception)  # else no pipeline at the end
    assert not (tmp_path / "novae").exists()
    res = runner.invoke(app, base + ["--out", str(tmp_path / "none"), "--attention-mode", "none", "--time-limit", "1e-6"])
    assert res.exit_code == 0, res.output
    assert "trained 1 step " in res.output
    pipe = MoCAPipeline.from_pretrained(tmp_path / "none" / "pipeline")
    assert pipe.transformer.config.attention_mode == "none"


def test_training_from_a_cache_leaves_validation_out_with_a_warning(dataset, tmp_path):
    """A recipe that validates (configs/dit_small.json: every 1 000 steps) trains from a latent cache, which holds no val
    split, without validation and says so (it was refused: the README's dense-baseline command failed as written)."""
    from moca3d.errors import InputWarning

    root, vae_dir = dataset
    cache = LatentDataset(root, "train", 32).save_cache(tmp_path / "cache.safetensors")
    with pytest.warns(InputWarning, match=r"^validate_every 1: validation reads the dataset folder's val split, which a latent cache"):
        result = train(cache, tmp_path / "run", tiny_recipe(steps=2, validate_every=1), vae_dir=vae_dir, device="cpu",
                       progress=False)
    assert result["steps"] == 2
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log and all("loss" in row for row in log)  # no validation rows


def test_train_cli_in_a_log_file_prints_progress_lines(dataset, tmp_path, monkeypatch):
    """Off a terminal (a log file, a pipe: CliRunner's streams) `moca3d train` prints plain progress lines on stderr (it
    printed nothing until the end: hours of silence in a job's log), and no bar."""
    from moca3d import progress
    from moca3d.cli import app

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    root, vae_dir = dataset
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe(steps=2).to_dict()))
    res = CliRunner().invoke(app, ["train", str(root), "--config", str(recipe), "--vae", str(vae_dir), "--device", "cpu",
                                   "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("train: ")]
    assert [line.split(",")[0] for line in lines] == ["train: 1/2 steps", "train: 2/2 steps"], res.stderr
    assert "━" not in res.output  # no rich bar


def test_fine_tuning_from_a_cache_of_another_image_size_is_refused_with_the_remedy(dataset, tmp_path):
    """A cache written at 48 px for a pipeline whose encoder takes 32 px (init_from): refused before training with the
    cache-latents command that fits (it failed at the first batch: "images must be (B, 3, 32, 32), got (2, 3, 48, 48)")."""
    root, vae_dir = dataset
    train(root, tmp_path / "base", tiny_recipe(steps=1), vae_dir=vae_dir, device="cpu", progress=False)
    cache = LatentDataset(root, "train", 48).save_cache(tmp_path / "cache48.safetensors")
    with pytest.raises(ConfigError, match=r"cached images are 48 px, the encoder takes 32 \(`moca3d cache-latents --image-size 32`"):
        train(cache, tmp_path / "ft", tiny_recipe(steps=1, init_from=str(tmp_path / "base" / "pipeline")), device="cpu",
              progress=False)


def test_training_on_cuda_without_it_or_on_another_gpu_is_refused(monkeypatch):
    """device="cuda" on a machine without CUDA trained on the CPU in bf16 (a torch dtype warning, 20x slower steps);
    "cuda:1" trained on GPU 0 (accelerate's choice) without a word."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"^device 'cuda' requested but CUDA is not available$"):
        train("unused", "unused", tiny_recipe(steps=1), device="cuda", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"^device 'cuda:1': training runs on the first visible GPU; choose it with "
                                          r"CUDA_VISIBLE_DEVICES=1 and --device cuda$"):
        train("unused", "unused", tiny_recipe(steps=1), device="cuda:1", progress=False)


def test_weights_missing_a_tensor_or_stored_as_integers_are_refused(dataset, tmp_path):
    """A transformer file missing one tensor died in a torch traceback ("Tensor.item() cannot be called on meta
    tensors"); one stored as int32 (its values truncated) loaded silently. Both are one-line CheckpointErrors now."""
    import shutil

    from safetensors.torch import load_file, save_file

    root, vae_dir = dataset
    train(root, tmp_path / "run", tiny_recipe(steps=1), vae_dir=vae_dir, device="cpu", progress=False)
    good = tmp_path / "run" / "pipeline"
    (weights,) = (good / "transformer").glob("*.safetensors")
    tensors = load_file(weights)
    name = sorted(k for k in tensors if k.endswith("to_k.weight"))[0]
    for case, changed in (("missing", {k: v for k, v in tensors.items() if k != name}),
                          ("integers", {**tensors, name: tensors[name].to(torch.int32)})):
        bad = tmp_path / case
        shutil.copytree(good, bad)
        save_file(changed, str(bad / "transformer" / weights.name))
        message = f"tensor '{name}' is missing from the weights" if case == "missing" else f"tensor '{name}' is stored as I32, not floating point"
        with pytest.raises(CheckpointError, match=re.escape(message)):
            MoCAPipeline.from_pretrained(bad)


def test_a_vae_of_another_encoder_swapped_into_a_pipeline_is_refused(dataset, tmp_path):
    """A pipeline folder with another run's vae/ (another encoder: latents its transformer never saw) loaded and
    generated without a word; a decoder fine-tune of its own VAE (the encoder kept) still loads."""
    import shutil

    from moca3d.models.vae import VecSetVAE

    root, vae_dir = dataset
    train(root, tmp_path / "run", tiny_recipe(steps=1), vae_dir=vae_dir, device="cpu", progress=False)
    good = tmp_path / "run" / "pipeline"
    from moca3d.training.train_vae import LATENT_MODULES

    for case in ("decoder", "encoder"):
        folder = tmp_path / case
        shutil.copytree(good, folder)
        vae = VecSetVAE.from_pretrained(good / "vae")
        with torch.no_grad():
            weight = next(w for n, w in vae.named_parameters()
                          if (n.split(".")[0] in LATENT_MODULES) == (case == "encoder"))  # an encoder or a decoder tensor
            weight.add_(0.01)
        vae.save_pretrained(folder / "vae")
        if case == "decoder":
            MoCAPipeline.from_pretrained(folder)
        else:
            with pytest.raises(CheckpointError, match=r"vae: not the VAE this pipeline was saved with \(another encoder than sha256:"):
                MoCAPipeline.from_pretrained(folder)


def test_train_takes_threads_and_a_resume_may_change_them(dataset, tmp_path):
    """train had no --threads (train-vae had): a torchrun user's `--threads 1` was a usage error from every process."""
    from moca3d.cli import app

    root, vae_dir = dataset
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe(steps=1).to_dict()))
    base = ["train", str(root), "--config", str(recipe), "--vae", str(vae_dir), "--device", "cpu", "-o", str(tmp_path / "run")]
    first = CliRunner().invoke(app, base + ["--threads", "1"])
    assert first.exit_code == 0, first.output
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["num_threads"] == 1
    again = CliRunner().invoke(app, base[:2] + base[6:] + ["--threads", "2", "--steps", "2"])  # the run's recipe, resumed
    assert again.exit_code == 0 and "trained 1 step (to step 2)" in again.output, again.output
    bad = CliRunner().invoke(app, base + ["--threads", "-1"])
    assert "--threads must be >= 0" in str(bad.exception)


def test_nan_weights_are_refused(dataset, tmp_path):
    root, vae_dir = dataset
    train(root, tmp_path / "run", tiny_recipe(steps=1), vae_dir=vae_dir, device="cpu", progress=False)
    pipe = MoCAPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    with torch.no_grad():
        pipe.transformer.proj_in.weight[0, 0] = float("nan")
    pipe.transformer.save_pretrained(tmp_path / "run" / "pipeline" / "transformer")
    with pytest.raises(CheckpointError, match="NaN"):
        MoCAPipeline.from_pretrained(tmp_path / "run" / "pipeline")


def test_preprocess_crops_foreground_onto_white():
    img = np.full((100, 80, 4), 0, np.uint8)  # fully transparent
    img[40:60, 30:50] = [200, 10, 10, 255]  # an opaque red square
    x = preprocess_image(img, 32)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 0, 0], torch.ones(3))  # corner: white background
    centre = x[:, 16, 16]
    assert centre[0] > 0.7 and centre[1] < 0.1  # the square fills the middle
    # Off-centre, the square is cropped, centred and padded by 10% a side: 32 / 1.2 = 26.7 px wide, from 2.7 to 29.3.
    img = np.full((100, 80, 4), 0, np.uint8)
    img[10:30, 5:25] = [200, 10, 10, 255]
    rows, cols = np.nonzero((preprocess_image(img, 32) < 0.9).any(0).numpy())
    for lo, hi in ((rows.min(), rows.max()), (cols.min(), cols.max())):
        assert abs(lo - 2.5) <= 1 and abs(hi - 29.5) <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, root, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = tiny_recipe(batch_size=4)
    data = LatentDataset(root, "train", 32)
    torch.manual_seed(cfg.seed)
    model = build_models(cfg, tuple(data.latents[0].shape[1:]))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    local = cfg.batch_size // world
    loss = training_loss(ddp, data, step_draws(cfg, 5, len(data), cfg.batch_size), slice(rank * local, (rank + 1) * local), "cpu")
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, result_path)  # test artefact only
    dist.barrier()
    # Leave without tearing down gloo: its destructor can deadlock on the GIL at interpreter exit
    # (ProcessGroupGloo joins a worker thread that waits for the GIL the main thread holds).
    os._exit(0)


def test_two_process_gradients_match_single_process(dataset, tmp_path):
    """DDP over two processes, each with half of the global batch, equals one process with all of it."""
    root, _ = dataset
    result = tmp_path / "grads.pt"
    context = mp.spawn(_ddp_worker, args=(2, _free_port(), str(root), str(result)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("two-process training did not finish within 300 s")
    ddp_grads = torch.load(result)
    cfg = tiny_recipe(batch_size=4)
    data = LatentDataset(root, "train", 32)
    torch.manual_seed(cfg.seed)
    model = build_models(cfg, tuple(data.latents[0].shape[1:]))
    training_loss(model, data, step_draws(cfg, 5, len(data), cfg.batch_size), slice(0, 4), "cpu").backward()
    assert ddp_grads
    for name, p in model.named_parameters():
        if p.grad is not None:
            # equal batches per process: the DDP mean of per-process means is the global mean
            torch.testing.assert_close(ddp_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sequential_cpu_offload_gives_the_same_latents(dataset, tmp_path):
    """accelerate offload hooks (executing on the CPU here) leave generation unchanged."""
    root, vae_dir = dataset
    train(root, tmp_path / "run", tiny_recipe(steps=1), vae_dir=vae_dir, device="cpu", progress=False)
    image = next((root / "assets").glob("*/render.png"))
    plain = MoCAPipeline.from_pretrained(tmp_path / "run" / "pipeline")(image, num_parts=2, steps=2, resolution=16, show_progress=False)
    pipe = MoCAPipeline.from_pretrained(tmp_path / "run" / "pipeline").enable_sequential_cpu_offload("cpu")
    assert next(pipe.transformer.parameters()).device.type == "meta"  # weights live in the offload hooks
    offloaded = pipe(image, num_parts=2, steps=2, resolution=16, show_progress=False)
    torch.testing.assert_close(offloaded.latents, plain.latents, atol=1e-6, rtol=0)


def test_group_by_parts_draws_batches_of_neighbouring_part_counts():
    counts = [2, 9, 3, 8, 2, 7, 5, 4, 6, 9, 3, 2]
    by_parts = sorted(range(len(counts)), key=lambda i: (counts[i], i))
    cfg = tiny_recipe(group_by_parts=4, batch_size=3)
    seen = set()
    for step in range(300):
        draws = step_draws(cfg, step, len(counts), 3, by_parts)
        positions = [by_parts.index(i) for i in draws["indices"]]
        assert max(positions) - min(positions) < 4  # one window of 4 neighbours in part-count order
        seen.update(draws["indices"])
        again = step_draws(cfg, step, len(counts), 3, by_parts)
        assert again["indices"] == draws["indices"] and torch.equal(again["t"], draws["t"])
    assert seen == set(range(len(counts)))
    # off (the default): the uniform draws, whatever order is passed
    plain = tiny_recipe(batch_size=3)
    assert step_draws(plain, 7, len(counts), 3, by_parts)["indices"] == step_draws(plain, 7, len(counts), 3)["indices"]


def test_cfg_dropout_rate_and_dropped_rows_see_the_sampler_unconditional_input(dataset):
    """step_draws drops the condition at the rate cfg_drop (within 5 binomial sigmas); a dropped row is the
    transformer on an all-zero condition, the input the pipeline's unconditional pass gives (atol 1e-6)."""
    cfg = tiny_recipe(cfg_drop=0.3)
    drops = torch.cat([step_draws(cfg, step, 100, 8)["drop"] for step in range(500)]).float()
    assert abs(float(drops.mean()) - 0.3) < 5 * (0.3 * 0.7 / drops.numel()) ** 0.5
    root, _ = dataset
    data = LatentDataset(root, "train", 32)
    model = build_models(tiny_recipe(), tuple(data.latents[0].shape[1:])).eval()
    torch.nn.init.normal_(model.transformer.proj_out.weight, std=0.1)  # the zero init would make every output 0
    batch = data.batch([0, 1])
    z, t = torch.randn_like(batch["latents"]), torch.tensor([0.7, 0.4])
    mask = batch["component_mask"]
    ids = model.transformer.sample_ids(2, z.shape[1], torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model(z, t, batch["images"], mask, torch.tensor([True, False]), ids, None)
        cond = model.image_encoder(batch["images"])
        uncond = model.transformer(z, t, torch.zeros_like(cond), component_mask=mask, ids=ids)
        conditional = model.transformer(z, t, cond, component_mask=mask, ids=ids)
    torch.testing.assert_close(pred[0], uncond[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(pred[1], conditional[1], atol=1e-6, rtol=0)
    assert (uncond[1] - conditional[1]).abs().max() > 1e-4  # the condition matters, so the check can fail


@pytest.mark.parametrize("assignment", ["random", "sequential"])
def test_training_follows_the_id_assignment(dataset, assignment):
    """Sequential ids: component i of every sample is id i in training, as in sampling; random: distinct draws."""
    root, _ = dataset
    data = LatentDataset(root, "train", 32)
    cfg = tiny_recipe(transformer=dict(width=32, num_layers=2, num_heads=4, compression=4, id_assignment=assignment))
    model = build_models(cfg, tuple(data.latents[0].shape[1:]))
    seen = []
    forward = model.transformer.forward
    model.transformer.forward = lambda *a, **kw: seen.append(kw["ids"]) or forward(*a, **kw)
    draws = step_draws(cfg, 0, len(data), 4)
    training_loss(model, data, draws, slice(0, 4), "cpu")
    (ids,) = seen
    n = ids.shape[1]
    if assignment == "sequential":
        assert torch.equal(ids, torch.arange(n).expand(4, n))
        assert torch.equal(model.transformer.sample_ids(4, n), ids)
    else:
        assert all(len(set(row.tolist())) == n for row in ids) and not torch.equal(ids[0], torch.arange(n))


def test_files_name_the_shipped_models_never_their_install_path(tmp_path):
    """Scene GLBs recorded the built-in scene model's install path (generate-scene passes its folder); objects said built-in."""
    assert MoCAPipeline.from_pretrained().source["model"] == "built-in"
    assert MoCAPipeline.from_pretrained(DEFAULT_MODEL_DIR).source["model"] == "built-in"
    assert MoCAPipeline.from_pretrained(DEFAULT_SCENE_MODEL_DIR).source["model"] == "built-in scene"
    mine = shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "mine")  # a copy is a folder of the user's: named by its path
    assert MoCAPipeline.from_pretrained(mine).source["model"] == str(mine)


def test_progress_leaves_no_blank_line_where_stdout_is_not_a_terminal(capsys):
    """The transient progress bar cleared itself with an empty line before every output not in a terminal."""
    MoCAPipeline.from_pretrained()(EXAMPLES / "chair.png", num_parts=1, steps=1, resolution=16)
    assert capsys.readouterr().out == ""


def test_a_device_torch_lacks_is_a_one_line_config_error(monkeypatch):
    """The Python API raised torch's bare AssertionError ("Torch not compiled with CUDA enabled"); now the CLI's one line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^device 'cuda' requested but CUDA is not available$"):
        MoCAPipeline.from_pretrained(device="cuda")
    pipe = MoCAPipeline.from_pretrained(device="auto")
    for move in (lambda: pipe.to("cuda:0"), lambda: pipe.enable_sequential_cpu_offload()):
        with pytest.raises(ConfigError, match="^device 'cuda.*' requested but CUDA is not available$"):
            move()
    assert pipe.to(torch.device("cpu")).device.type == "cpu"


def test_fine_tuning_with_a_vae_of_other_latents_than_its_base_warns(dataset, tmp_path):
    """`train --init-from PIPE --vae OTHER` trained without a word although PIPE's transformer learned the latents of
    its own VAE: another latent scale (or encoder) is named in one warning; PIPE's VAE, even copied elsewhere, is not."""
    import warnings

    from moca3d.errors import InputWarning

    root, vae_dir = dataset
    train(root, tmp_path / "base", tiny_recipe(steps=1), vae_dir=vae_dir, device="cpu", progress=False)
    base = tmp_path / "base" / "pipeline"
    same, rescaled = shutil.copytree(base / "vae", tmp_path / "same"), shutil.copytree(base / "vae", tmp_path / "rescaled")
    config = json.loads((rescaled / "config.json").read_text())
    (rescaled / "config.json").write_text(json.dumps({**config, "scaling_factor": 2.5 * config["scaling_factor"]}))
    recipe = tiny_recipe(steps=1, warmup_steps=0, init_from=str(base))
    with pytest.warns(InputWarning, match=rf"--vae {re.escape(str(rescaled))} is not {re.escape(str(base))}'s VAE and "
                                          r"its latent shift/scale differ: .* drop --vae .*encode-dataset DATA --model"):
        train(root, tmp_path / "ft_rescaled", recipe, vae_dir=rescaled, device="cpu", progress=False)
    for vae in (same, None):  # a copy of the base's VAE, or none given (the base's own)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(root, tmp_path / f"ft_{vae is None}", recipe, vae_dir=vae, device="cpu", progress=False)
        assert not [str(w.message) for w in caught if issubclass(w.category, InputWarning)], vae
