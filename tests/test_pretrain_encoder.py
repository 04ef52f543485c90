"""Image-encoder pre-training on coarse surface grids, and DiT training from the pre-trained encoder."""

import json
import re
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.errors import ConfigError, InputError
from moca3d.models.image_encoder import ImageEncoder
from moca3d.training.pretrain_encoder import (
    EncoderPretrainConfig, build_grid_cache, dilate_grids, draw_queries, grid_centres, grid_iou, load_grid_cache,
    load_surface_points, pretrain_encoder, surface_grid,
)
from moca3d.training.train_dit import DiTTrainConfig, LatentDataset, train

TINY_ENCODER = dict(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4)


def tiny_pretrain(**kw):
    base = dict(image_encoder=TINY_ENCODER, grid_resolution=8, dilate=0, queries_per_image=64, head_width=32,
                head_heads=4, steps=6, batch_size=2, warmup_steps=1, val_assets=1, log_every=2, checkpoint_every=3)
    return EncoderPretrainConfig.from_dict({**base, **kw})


@pytest.fixture(scope="module")
def dataset(object_dataset):
    """Six tiny procedural objects (all train) with cached latents and surface samples (conftest)."""
    return object_dataset[0]


def test_grid_cells_and_centres_agree():
    """The cell of each grid centre is that centre's own flat index; points land in the expected cell."""
    r = 5
    centres = grid_centres(r)  # (R^3, 3)
    for i in range(r**3):  # every cell
        grid = surface_grid(centres[i : i + 1], r)
        assert grid.sum() == 1 and grid.reshape(-1)[i]
    corner = surface_grid(torch.tensor([[-1.0, -1.0, 1.0]]), r)  # the boundary +1 belongs to the last cell
    assert corner[0, 0, r - 1] and corner.sum() == 1


def test_dilation_grows_a_cell_to_a_cube_and_both_definitions_agree():
    """One occupied cell dilated by 1 is a 3^3 cube; both dilations equal scipy's binary dilation by a cube."""
    from scipy.ndimage import binary_dilation

    point = torch.tensor([[0.01, -0.3, 0.5]])
    grown = surface_grid(point, 9, dilate=1)
    assert grown.sum() == 27
    points = torch.rand(50, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1  # some land in boundary cells: the dilation must not wrap around
    plain = surface_grid(points, 7)
    for d in (1, 2):
        expected = torch.from_numpy(binary_dilation(plain.numpy(), structure=np.ones((3, 3, 3)), iterations=d))
        assert torch.equal(surface_grid(points, 7, dilate=d), expected)
        assert torch.equal(dilate_grids(plain[None], d)[0], expected)


def test_query_draws_are_half_occupied_and_labelled_by_the_grid():
    grids = torch.rand(3, 6, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.8
    idx, labels = draw_queries(grids, 40, torch.Generator().manual_seed(0))
    assert idx.shape == labels.shape == (3, 40)
    assert torch.equal(labels, grids.reshape(3, -1).float().gather(1, idx))
    assert labels[:, :20].all()  # the first half is drawn among occupied cells


def test_grid_iou_limits():
    a = torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(2)) > 0.5
    assert torch.allclose(grid_iou(a, a), torch.ones(2))
    assert torch.allclose(grid_iou(a, ~a), torch.zeros(2))
    b = torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)) > 0.5  # independent halves: IoU about 1/3 (Dice would be about 1/2)
    expected = (a & b).flatten(1).sum(1).float() / (a | b).flatten(1).sum(1).float()
    torch.testing.assert_close(grid_iou(a, b), expected, atol=1e-7, rtol=0)


def test_grid_cache_round_trip(dataset, tmp_path):
    """Packed bits and back; R = 7 (343 cells, not a whole number of bytes) exercises the trim."""
    ids = sorted(p.name for p in (dataset / "assets").iterdir())[:3]
    path = build_grid_cache(dataset, ids, 7, tmp_path / "grids.safetensors")
    grids, got_ids, r = load_grid_cache(path)
    assert got_ids == ids and r == 7 and grids.shape == (3, 7, 7, 7)
    for i, asset_id in enumerate(ids):
        assert torch.equal(grids[i], surface_grid(load_surface_points(dataset / "assets" / asset_id), 7))


def test_bad_grid_inputs_get_clear_errors(dataset, tmp_path):
    """A missing samples.npz, a file that is not a grid cache, a grid of another size, assets without grids."""
    with pytest.raises(InputError, match="no samples.npz"):
        load_surface_points(tmp_path)
    with pytest.raises(InputError, match="not found"):
        load_grid_cache(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="not a moca3d surface-grid cache"):
        load_grid_cache(tmp_path / "other.safetensors")
    ids = sorted(p.name for p in (dataset / "assets").iterdir())
    build_grid_cache(dataset, ids, 4, tmp_path / "r4.safetensors")
    with pytest.raises(ConfigError, match="grids are 4\\^3"):
        pretrain_encoder(tiny_pretrain(), dataset, tmp_path / "a", grids_path=tmp_path / "r4.safetensors", log=lambda r: None)
    build_grid_cache(dataset, ids[:2], 8, tmp_path / "few.safetensors")
    with pytest.raises(InputError, match="no grid for 4 of the training assets"):
        pretrain_encoder(tiny_pretrain(), dataset, tmp_path / "b", grids_path=tmp_path / "few.safetensors", log=lambda r: None)
    with pytest.raises(ConfigError, match="queries_per_image"):
        tiny_pretrain(queries_per_image=1)
    with pytest.raises(ConfigError, match="freeze_image_encoder needs a trained encoder"):
        DiTTrainConfig.from_dict({"freeze_image_encoder": True})


def test_pretraining_resumes_and_writes_a_loadable_encoder(dataset, tmp_path):
    """Six steps, then resumed from the step-3 checkpoint (as after a kill): the same encoder again."""
    import shutil

    out_a, out_b = tmp_path / "a", tmp_path / "b"
    pretrain_encoder(tiny_pretrain(), dataset, out_a, log=lambda r: None)
    shutil.copytree(out_a, out_b)
    shutil.rmtree(out_b / "image_encoder")
    shutil.rmtree(out_b / "checkpoints" / "step_00000006")
    records = []
    pretrain_encoder(tiny_pretrain(), dataset, out_b, log=records.append)
    assert records[0] == {"event": "resume", "step": 3}
    a = ImageEncoder.from_pretrained(out_a / "image_encoder").state_dict()
    b = ImageEncoder.from_pretrained(out_b / "image_encoder").state_dict()
    fresh = ImageEncoder(**TINY_ENCODER).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(a[k], fresh[k]) for k in a)  # it trained
    summary = json.loads((out_a / "summary.json").read_text())
    assert summary["step"] == 6 and 0 <= summary["grid_iou"] <= 1 and 0 <= summary["mean_grid_iou"] <= 1


def test_pretraining_resumes_only_its_own_recipe(dataset, tmp_path):
    """Run again into its folder, a pre-training run refuses another recipe in one line (its recipe and checkpoints
    untouched), resumes with more steps or a time limit (recorded; the limit counts its earlier seconds) and says
    when it is finished."""
    run = tmp_path / "run"
    pretrain_encoder(tiny_pretrain(steps=2, checkpoint_every=2), dataset, run, log=lambda r: None)
    recorded = (run / "pretrain_config.json").read_text()
    with pytest.raises(ConfigError, match=r"was started with another recipe \(head_width 32 -> 64\): resume with its own"):
        pretrain_encoder(tiny_pretrain(steps=2, checkpoint_every=2, head_width=64), dataset, run, log=lambda r: None)
    (tmp_path / "other.json").write_text(json.dumps(tiny_pretrain(lr=0.5).to_dict()))
    bad = CliRunner().invoke(app, ["pretrain-encoder", str(dataset), "-o", str(run), "--config", str(tmp_path / "other.json")])
    assert isinstance(bad.exception, ConfigError) and "another recipe (lr 0.001 -> 0.5)" in str(bad.exception)
    assert (run / "pretrain_config.json").read_text() == recorded
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    few = LatentDataset(dataset, "train", 32)  # a cache of other assets (one left out): not this run's data
    few.latents, few.images, few.ids = few.latents[1:], few.images[1:], few.ids[1:]
    with pytest.raises(ConfigError, match=r"run was trained on other data \(6 assets\) than .* \(5 assets, other ids\)"):
        pretrain_encoder(tiny_pretrain(steps=2, checkpoint_every=2), dataset, run, cache=few.save_cache(tmp_path / "few.safetensors"),
                         log=lambda r: None)
    records = []
    pretrain_encoder(tiny_pretrain(steps=4, checkpoint_every=2), dataset, run, log=records.append)  # more steps: allowed
    assert records[0] == {"event": "resume", "step": 2, "note": "resuming with steps 2 -> 4"}
    assert json.loads((run / "pretrain_config.json").read_text())["steps"] == 4
    assert json.loads((run / "summary.json").read_text())["step"] == 4
    final = run / "checkpoints" / "step_00000004" / "state.json"
    elapsed, written = json.loads(final.read_text())["extra"]["elapsed_s"], final.stat().st_mtime_ns
    assert elapsed > 0  # the run's clock
    records = []
    pretrain_encoder(tiny_pretrain(steps=4, checkpoint_every=2), dataset, run, log=records.append)
    assert records[0]["step"] == 4 and "nothing to train" in records[0]["finished"] and "note" not in records[0]
    assert not any("loss" in r for r in records) and final.stat().st_mtime_ns == written
    assert (run / "image_encoder" / "config.json").is_file() and json.loads((run / "summary.json").read_text())["step"] == 4
    records = []  # more steps, but a time limit its earlier seconds already used up: finished too
    pretrain_encoder(tiny_pretrain(steps=8, checkpoint_every=2, time_limit_s=elapsed / 2), dataset, run, log=records.append)
    assert records[0]["note"] == f"resuming with steps 4 -> 8, time_limit_s 0.0 -> {elapsed / 2}" and "finished" in records[0]
    assert json.loads((run / "summary.json").read_text())["step"] == 4


def test_pretraining_lowers_the_loss_on_a_fixed_set(dataset, tmp_path):
    """Many steps on six objects: the late logged loss is below the first (the predictor learns; the test does not
    separate what the encoder reads from the image from what the head learns about where cells lie)."""
    records = []
    pretrain_encoder(tiny_pretrain(steps=60, lr=3e-3, log_every=10, checkpoint_every=100, val_assets=0), dataset,
                     tmp_path / "run", log=records.append)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses


def test_dit_training_from_a_frozen_pretrained_encoder(dataset, tmp_path):
    """`image_encoder_from` + `freeze_image_encoder`: the exported pipeline carries the encoder unchanged."""
    enc = pretrain_encoder(tiny_pretrain(), dataset, tmp_path / "enc", log=lambda r: None)
    recipe = dict(transformer=dict(width=32, num_layers=2, num_heads=4, compression=4), steps=3, batch_size=2,
                  warmup_steps=1, checkpoint_every=2, log_every=1, image_encoder_from=str(enc), freeze_image_encoder=True)
    result = train(dataset, tmp_path / "dit", DiTTrainConfig.from_dict(recipe), vae_dir=dataset / "vae", device="cpu", progress=False)
    from moca3d.pipeline import MoCAPipeline

    pipe = MoCAPipeline.from_pretrained(str(result["pipeline"]))
    before = ImageEncoder.from_pretrained(enc).state_dict()
    for k, v in pipe.image_encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ConfigError, match="image_encoder_from"):
        DiTTrainConfig.from_dict({**recipe, "image_encoder": TINY_ENCODER})
    with pytest.raises(ConfigError, match="not an image encoder folder"):
        train(dataset, tmp_path / "dit2", DiTTrainConfig.from_dict({**recipe, "image_encoder_from": str(tmp_path)}),
              device="cpu", progress=False)


def test_pretrain_encoder_cli(dataset, tmp_path):
    cfg = tiny_pretrain().to_dict()
    (tmp_path / "recipe.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(app, ["pretrain-encoder", str(dataset), "-o", str(tmp_path / "run"),
                                      "--config", str(tmp_path / "recipe.json"), "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "image_encoder" / "config.json").is_file()
    lines = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "done" and lines[-1]["step"] == 2
    printed = result.output.splitlines()  # sentences, as the other training verbs print (log.jsonl keeps the records)
    assert re.fullmatch(r"building the surface grids of \d+ assets \(once\): .*grids.*", printed[0]), printed
    assert re.fullmatch(r"step [12]: loss \d\.\d+, lr [\d.e-]+, \d+ s", printed[1]), printed
    assert re.fullmatch(r"finished at step 2 after \d+\.\d min of training: .*val_assets 1.*", printed[-2]), printed
    with open(tmp_path / "run" / "log.jsonl", "a") as f:  # a kill after logging step 3, before its checkpoint
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    result = CliRunner().invoke(app, ["pretrain-encoder", str(dataset), "-o", str(tmp_path / "run"),
                                      "--config", str(tmp_path / "recipe.json"), "--steps", "3"])
    assert result.exit_code == 0, result.output
    records = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"step": 3, "loss": 1.0} not in records and records[-1]["event"] == "done"  # trimmed to the resumed checkpoint
    bad = CliRunner().invoke(app, ["pretrain-encoder", str(dataset), "-o", str(tmp_path / "x"), "--config", str(tmp_path / "nope.json")])
    assert isinstance(bad.exception, ConfigError) and "config file not found" in str(bad.exception)


def test_grid_eval_benchmark_reports_iou_against_references(dataset, tmp_path):
    """benchmarks/encoder_grid_eval.py on a tiny run: IoUs and F-scores in [0, 1], the GT-cell ceiling near 1."""
    from conftest import load_benchmark

    run = tmp_path / "run"
    pretrain_encoder(tiny_pretrain(grid_resolution=32), dataset, run, log=lambda r: None)
    module = load_benchmark("encoder_grid_eval")
    out = tmp_path / "grid.json"
    summary = module.main([str(dataset), "--run", str(run), "--train-grids", str(run / "grids32.safetensors"), "--split", "train",
                           "--points", "100000", "--json", str(out)])
    assert json.loads(out.read_text())["count"] == 6
    assert summary["f01_gt_cells"] > 0.95  # 32^3 cells, all samples: every centre within 0.055 of the samples in its cell
    rows = json.loads(out.read_text())["assets"]  # the summary is the mean of the per-asset rows
    assert summary["iou"] == pytest.approx(sum(r["iou"] for r in rows) / len(rows))


def test_holdout_split_keeps_every_asset_on_one_side():
    from moca3d.training.pretrain_encoder import holdout_split

    assets = [0, 0, 1, 1, 1, 2, 3, 4, 4, 4]  # pair -> asset (a scene's instances are consecutive pairs)
    train, val = holdout_split(assets, 5, val_assets=1)
    assert val == [7, 8, 9] and train == list(range(7))
    assert holdout_split(assets, 5, val_assets=3) == (train, val)  # at most a fifth of the assets
    train, val = holdout_split(assets, 10, val_assets=2)  # assets 8, 9 have no pairs: nothing held out
    assert val == [] and train == list(range(10))
    assert not set(train) & set(val)


def test_sigterm_checkpoints_the_last_step_and_the_run_resumes(dataset, tmp_path, monkeypatch):
    """A preempted pre-training (SIGTERM) died, losing every step since its last checkpoint; now it stops after the
    step, checkpointed (the CLI exits 143), the handlers and the run's record are given back, and the same command
    resumes to the same encoder as an uninterrupted run. A second job in a run folder being trained is refused."""
    import signal
    import socket

    import moca3d.training.pretrain_encoder as module
    from conftest import preempt_on_call
    from moca3d.training.checkpoints import RUN_LOCK

    config = tmp_path / "recipe.json"
    config.write_text(json.dumps(tiny_pretrain(checkpoint_every=100).to_dict()))  # no checkpoint but the last, unless stopped
    calls = []
    monkeypatch.setattr(module, "draw_queries", preempt_on_call(module.draw_queries, 3, calls))  # SIGTERM in step 3
    stopped = CliRunner().invoke(app, ["pretrain-encoder", str(dataset), "-o", str(tmp_path / "run"), "--config", str(config)])
    assert stopped.exit_code == 143, stopped.output
    assert "interrupted: stopped at step 3 of 6 (SIGTERM): checkpoint saved" in stopped.output
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000003"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not (tmp_path / "run" / RUN_LOCK).exists()
    monkeypatch.undo()
    resumed = CliRunner().invoke(app, ["pretrain-encoder", str(dataset), "-o", str(tmp_path / "run")])
    assert resumed.exit_code == 0, resumed.output
    pretrain_encoder(tiny_pretrain(checkpoint_every=100), dataset, tmp_path / "straight", log=lambda r: None)
    a = ImageEncoder.from_pretrained(tmp_path / "run" / "image_encoder").state_dict()
    b = ImageEncoder.from_pretrained(tmp_path / "straight" / "image_encoder").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    (tmp_path / "run" / RUN_LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))  # alive
    with pytest.raises(ConfigError, match=f"is being trained by process {os.getppid()} on this machine"):
        pretrain_encoder(tiny_pretrain(steps=8), dataset, tmp_path / "run", log=lambda r: None)
