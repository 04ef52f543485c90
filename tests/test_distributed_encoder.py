"""`moca3d pretrain-encoder` launched as two processes (gloo on the CPU, as `accelerate launch` / torchrun would start them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.multiprocessing as mp
from test_distributed import _free_port, _launched
from test_pretrain_encoder import TINY_ENCODER, tiny_pretrain

from moca3d.models.image_encoder import ImageEncoder
from moca3d.training.checkpoints import latest_checkpoint
from moca3d.training.pretrain_encoder import pretrain_encoder


def recipe(**kw):
    """Four steps of four images, checkpoints at 2 and 4; every step logged."""
    return tiny_pretrain(**{"steps": 4, "batch_size": 4, "log_every": 1, "checkpoint_every": 2, **kw})


def _worker(rank, world, port, root, out, results):
    """One process of a `moca3d pretrain-encoder` launch (the CLI): its output, the batch rows its model saw and its
    final weights saved for the test; then a launch whose batch the processes do not divide."""
    _launched(rank, world, port)
    from typer.testing import CliRunner

    from moca3d.cli import app
    from moca3d.training import pretrain_encoder as module

    built, rows = [], []
    build, forward = module.build_predictor, module.GridPredictor.forward
    module.build_predictor = lambda cfg: built.append(build(cfg)) or built[-1]

    def counting(self, images, points):
        rows.append(images.shape[0])
        return forward(self, images, points)

    module.GridPredictor.forward = counting
    results = Path(results)
    (results / f"recipe{rank}.json").write_text(json.dumps(recipe().to_dict()))
    run = CliRunner().invoke(app, ["pretrain-encoder", root, "-o", out, "--config", str(results / f"recipe{rank}.json")])
    torch.save(built[0].image_encoder.state_dict(), results / f"encoder{rank}.pt")
    (results / f"odd{rank}.json").write_text(json.dumps(recipe(batch_size=3).to_dict()))
    odd = CliRunner().invoke(app, ["pretrain-encoder", root, "-o", str(results / "odd"), "--config", str(results / f"odd{rank}.json")])
    (results / f"rank{rank}.json").write_text(json.dumps({"exit": run.exit_code, "output": run.output, "rows": rows,
                                                          "error": repr(run.exception), "odd": str(odd.exception)}))


def test_two_processes_pretrain_one_encoder_on_their_shares_of_each_batch(object_dataset, tmp_path):
    """Each process encodes half of every global batch; averaged gradients keep both on the same weights, those of
    the one-process run (the global batch and its queries do not depend on the process count); only the first process
    logs, checkpoints, writes the encoder and prints. A resume under one process continues the same run."""
    root = object_dataset[0]
    out = tmp_path / "run"
    mp.spawn(_worker, args=(2, _free_port(), str(root), str(out), str(tmp_path)), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["exit"] == second["exit"] == 0, (first["error"], second["error"])
    assert first["rows"] == second["rows"] == [2] * 4  # 2 of the 4 images of each step, on each process
    assert "image encoder:" in first["output"] and "step 1: loss " in first["output"]  # the first process reports
    assert "image encoder:" not in second["output"] and "step 1:" not in second["output"]  # (its stderr: a warning of accelerate's)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # one line a step: the first process's alone
    assert logged[-1]["event"] == "done" and logged[-1]["processes"] == 2
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert first["odd"] == second["odd"] == "batch_size 3 must be divisible by the 2 processes"  # one line, on each
    assert not (tmp_path / "odd").exists() or latest_checkpoint(tmp_path / "odd") is None

    a, b = (torch.load(tmp_path / f"encoder{r}.pt") for r in (0, 1))
    exported = ImageEncoder.from_pretrained(out / "image_encoder").state_dict()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=0, msg=f"the processes disagree on {name}")
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)
    alone = tmp_path / "alone"  # one process, the same recipe: the same run up to float rounding
    pretrain_encoder(recipe(), root, alone, log=lambda r: None)
    one = ImageEncoder.from_pretrained(alone / "image_encoder").state_dict()
    assert any(not torch.equal(one[k], v) for k, v in ImageEncoder(**TINY_ENCODER).state_dict().items())  # it trained
    for name, value in a.items():
        torch.testing.assert_close(one[name], value, rtol=0, atol=1e-5, msg=name)
    resumed = tmp_path / "resumed"  # the two-process run cut after step 2, resumed by one process
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "image_encoder")
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    records = []
    pretrain_encoder(recipe(), root, resumed, log=records.append)
    assert records[0] == {"event": "resume", "step": 2}
    again = ImageEncoder.from_pretrained(resumed / "image_encoder").state_dict()
    for name, value in a.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=1e-5, msg=name)
