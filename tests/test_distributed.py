"""Training launched as two processes (gloo on the CPU, as `accelerate launch` / torchrun would start them)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from test_vae import make_dataset, tiny_train_config

from moca3d.models.vae import VecSetVAE
from moca3d.training.checkpoints import EMA, latest_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched(rank, world, port):
    """The environment a launcher sets for process `rank`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def _worker(rank, world, port, root, out, weights):
    """One process of a train_vae launch."""
    _launched(rank, world, port)
    from moca3d.training.train_vae import train_vae

    copy_to = EMA.copy_to

    def keep_final(self, model):  # each process's final (EMA) weights, for the test to compare
        copy_to(self, model)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, weights.format(rank=rank))

    EMA.copy_to = keep_final
    train_vae(root, out, tiny_train_config(steps=4, batch_size=4), progress=False, validate_at_end=False)


def test_two_processes_train_one_model_on_their_shares_of_each_batch(tmp_path):
    """Each process takes half of every global batch (other rows, other noise); averaged gradients keep both on the
    same weights; only the first process writes checkpoints, logs and the VAE."""
    root = make_dataset(tmp_path / "data", num_assets=4, points=128, queries=128)
    out, weights = tmp_path / "run", str(tmp_path / "final{rank}.pt")
    mp.spawn(_worker, args=(2, _free_port(), str(root), str(out), weights), nprocs=2, join=True)
    first, second = torch.load(weights.format(rank=0)), torch.load(weights.format(rank=1))
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=1e-6, msg=f"the processes disagree on {name}")
    exported = VecSetVAE.from_pretrained(str(out / "vae")).state_dict()
    for name, value in first.items():  # the export holds those weights (its latent scale buffers fitted afterwards)
        if not name.endswith(("shift_factor", "scaling_factor")):
            torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)
    assert latest_checkpoint(out).name == "step_00000004"
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # one line a step: the first process's alone
    assert json.loads((out / "summary.json").read_text())["processes"] == 2


def _dit_worker(rank, world, port, root, vae_dir, out, results):
    """One process of a DiT training launch; its result dict saved for the test."""
    _launched(rank, world, port)
    from conftest import tiny_dit_recipe

    from moca3d.training.train_dit import train

    result = train(root, out, tiny_dit_recipe(steps=3, batch_size=4), vae_dir=vae_dir, device="cpu", progress=False)
    (Path(results) / f"rank{rank}.json").write_text(json.dumps(result))


def test_two_processes_train_the_transformer_and_the_first_exports(object_dataset, tmp_path):
    """The DiT trainer under a launcher: both processes train the 3 steps, only the first exports and reports."""
    root, vae_dir = object_dataset
    out = tmp_path / "run"
    mp.spawn(_dit_worker, args=(2, _free_port(), str(root), str(vae_dir), str(out), str(tmp_path)), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["processes"] == second["processes"] == 2 and first["trained_steps"] == second["trained_steps"] == 3
    assert first["final_loss"] == second["final_loss"]  # the processes' mean, on both
    assert "writer" not in first and second["writer"] is False and "pipeline" not in second
    assert Path(first["pipeline"]) == out / "pipeline" and (out / "pipeline" / "model_index.json").is_file()
    assert latest_checkpoint(out).name == "step_00000003"


def _timed_dit_worker(rank, world, port, root, vae_dir, out, weights):
    """One process of a DiT launch under a time limit, on a trainer clock that ticks 3x faster on the second process."""
    _launched(rank, world, port)
    import itertools
    import types

    from conftest import tiny_dit_recipe

    from moca3d.training import train_dit
    from moca3d.training.checkpoints import EMA

    ticks = itertools.count()
    tick = 0.05 * (3 if rank == 1 else 1)  # seconds per reading: as many steps on any machine, the clocks 3x apart
    train_dit.time = types.SimpleNamespace(time=lambda: tick * next(ticks))
    update, trained = EMA.update, []

    def keep_model(self, model):  # the live (unwrapped) model after each optimizer step
        update(self, model)
        trained[:] = [model]

    EMA.update = keep_model
    recipe = tiny_dit_recipe(steps=100_000, batch_size=2, warmup_steps=0, time_limit_s=3.0, checkpoint_every=100_000, log_every=100_000)
    result = train_dit.train(root, out, recipe, vae_dir=vae_dir, device="cpu", progress=False)
    torch.save({k: v.clone() for k, v in trained[0].state_dict().items()}, weights.format(rank=rank))
    Path(weights.format(rank=rank)).with_suffix(".json").write_text(json.dumps(result["trained_steps"]))


def test_two_processes_under_a_time_limit_share_one_clock(object_dataset, tmp_path):
    """The LR follows the elapsed share of the time limit: read from one clock (the processes' latest), both replicas
    take the same learning rates and stop at the same step, so they end on the same weights (1e-6) though one
    process's clock runs 3x fast."""
    root, vae_dir = object_dataset
    weights = str(tmp_path / "final{rank}.pt")
    mp.spawn(_timed_dit_worker, args=(2, _free_port(), str(root), str(vae_dir), str(tmp_path / "run"), weights), nprocs=2, join=True)
    steps = [json.loads(Path(weights.format(rank=r)).with_suffix(".json").read_text()) for r in (0, 1)]
    assert steps[0] == steps[1] > 1
    first, second = torch.load(weights.format(rank=0)), torch.load(weights.format(rank=1))
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=1e-6, msg=f"the processes disagree on {name}")
