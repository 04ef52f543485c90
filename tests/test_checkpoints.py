"""Checkpoints: safetensors round trip, resume state, NaN refusal, atomic writes, EMA."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from moca3d.errors import CheckpointError
from moca3d.training import checkpoints as ck


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def train_steps(model, opt, ema, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)


def test_round_trip_restores_model_optimizer_ema_rng_and_step(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = ck.EMA(model, decay=0.9)
    train_steps(model, opt, ema, 3, seed=1)
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    path = ck.save_checkpoint(tmp_path, 3, model, opt, ema, extra={"elapsed_s": 1.5})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    train_steps(model, opt, ema, 2, seed=2)  # continue the original
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = make_model(seed=99)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ema2 = ck.EMA(model2, decay=0.5)
    state = ck.load_checkpoint(ck.latest_checkpoint(tmp_path), model2, opt2, ema2)
    assert state.step == 3 and state.extra == {"elapsed_s": 1.5} and state.path == path
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert ema2.num_updates == 3 and ema2.decay == 0.9
    train_steps(model2, opt2, ema2, 2, seed=2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k
    for k, v in ema2.shadow.items():
        assert torch.equal(v, ema.shadow[k])


def test_files_are_safetensors_and_json_only(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    train_steps(model, opt, ck.EMA(model), 1, seed=0)
    path = ck.save_checkpoint(tmp_path, 1, model, opt, ck.EMA(model))
    names = sorted(p.name for p in path.iterdir())
    assert names == ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    json.loads((path / "state.json").read_text())
    for p in path.glob("*.safetensors"):
        raw = p.read_bytes()
        header = int.from_bytes(raw[:8], "little")  # safetensors: u64 header size, then a JSON header
        assert raw[8:9] == b"{" and json.loads(raw[8:8 + header]) is not None
        assert not raw.startswith(b"PK")  # not a torch.save zip archive


def test_nan_checkpoint_is_refused_with_one_line_error(tmp_path):
    model = make_model()
    good = ck.save_checkpoint(tmp_path, 1, model)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError) as err:
        ck.save_checkpoint(tmp_path, 2, model)
    assert "\n" not in str(err.value) and "NaN" in str(err.value)
    assert ck.latest_checkpoint(tmp_path) == good  # nothing half-written
    # A file poisoned on disk is refused at load time too.
    from safetensors.torch import save_file

    bad = {k: v.clone() for k, v in make_model().state_dict().items()}
    bad["2.bias"][0] = float("inf")
    save_file(bad, str(good / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        ck.load_checkpoint(good, make_model())
    assert "\n" not in str(err.value) and "2.bias" in str(err.value)


def test_interrupted_write_leaves_no_corrupt_file(tmp_path, monkeypatch):
    model = make_model()
    first = ck.save_checkpoint(tmp_path, 1, model)
    # A crash in the middle of writing a tensor file (after some bytes hit the disk).
    real_save = ck.save_file

    def crashing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ck, "save_file", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, model)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save_tensors({"w": torch.ones(2)}, first / "model.safetensors")
    monkeypatch.setattr(ck, "save_file", real_save)
    assert ck.latest_checkpoint(tmp_path) == first
    leftovers = [p.name for p in (tmp_path / ck.CHECKPOINT_DIR).iterdir()]
    assert leftovers == ["step_00000001"]
    assert sorted(p.name for p in first.iterdir() if p.name.endswith(".tmp")) == []
    ck.load_checkpoint(first, make_model())  # the old file is intact and loads
    killed = tmp_path / ck.CHECKPOINT_DIR / ".step_00000002.x1y2.tmp"
    killed.mkdir()  # what a SIGKILL during a save leaves (no `finally` runs): swept by the next save
    (killed / "model.safetensors").write_bytes(b"partial")
    ck.save_checkpoint(tmp_path, 2, model)
    assert sorted(p.name for p in (tmp_path / ck.CHECKPOINT_DIR).iterdir()) == ["step_00000001", "step_00000002"]


def test_keep_last_and_missing_checkpoint(tmp_path):
    model = make_model()
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, model, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    with pytest.raises(CheckpointError):
        ck.load_checkpoint(tmp_path / "nowhere", model)
    with pytest.raises(CheckpointError):
        ck.load_checkpoint(ck.latest_checkpoint(tmp_path), nn.Linear(3, 3))


def test_a_removal_cut_by_a_kill_is_cleared_by_the_next_save(tmp_path, monkeypatch):
    """Old checkpoints are removed file by file: a kill midway left a step folder without state.json, which no later
    save removed (it is no complete checkpoint), gigabytes each. Such older debris goes at the next save, and a removal
    renames the folder out of the step names first."""
    model = make_model()
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, step, model, keep_last=1)
    debris = ck.checkpoint_dir(tmp_path, 1)  # as a kill during its removal left it
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"partial")
    removed = []
    monkeypatch.setattr(ck.shutil, "rmtree", lambda path, ignore_errors=False: removed.append(Path(path).name))
    ck.save_checkpoint(tmp_path, 3, model, keep_last=1)
    assert ".step_00000001.tmp" in removed and ".step_00000002.tmp" in removed  # renamed first, then deleted
    monkeypatch.undo()
    ck.save_checkpoint(tmp_path, 4, model, keep_last=1)
    assert sorted(p.name for p in (tmp_path / ck.CHECKPOINT_DIR).iterdir()) == ["step_00000004"]


def test_saved_model_weights_are_readable_by_others(tmp_path):
    """diffusers wrote diffusion_pytorch_model.safetensors 0600 (a temporary file's mode) beside a 0644 config.json."""
    import os

    from moca3d.models.vae import VecSetVAE

    VecSetVAE().save_pretrained(tmp_path / "vae")  # the defaults: small
    assert {p.name: oct(os.stat(p).st_mode & 0o777) for p in (tmp_path / "vae").iterdir()} == {
        "config.json": "0o644", "diffusion_pytorch_model.safetensors": "0o644"}


def test_a_checkpoint_of_another_model_names_what_does_not_fit(tmp_path):
    path = ck.save_checkpoint(tmp_path, 1, make_model())
    wider = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 2))  # 5 tensors of another shape
    with pytest.raises(CheckpointError) as err:
        ck.load_checkpoint(path, wider)
    message = str(err.value)
    assert "\n" not in message and "5 of another shape (e.g. '0.weight': (8, 4), the model has (16, 4))" in message
    deeper = nn.Sequential(*make_model(), nn.Linear(2, 2))  # the checkpoint lacks the last layer's 2 tensors
    with pytest.raises(CheckpointError, match=r"2 tensors missing \(e.g. '3.bias'\)"):
        ck.load_checkpoint(path, deeper)
    assert ck.state_dict_mismatch(make_model(), make_model(1).state_dict()) == ""
    assert ck.state_dict_mismatch(nn.Linear(4, 8), make_model().state_dict()) == \
        "2 tensors missing (e.g. 'bias'); 6 tensors unexpected (e.g. '0.bias')"


def test_ema_of_a_partly_frozen_model_copies_the_frozen_weights_into_a_fresh_one(tmp_path):
    """Frozen parameters are neither averaged nor saved, yet copy_to fills a fresh model completely (a decoder fine-tune
    exported into a new VAE kept a random encoder when they were left out)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    ema = ck.EMA(model, decay=0.5, warmup=1)
    assert set(ema.state_dict()) == {"1.weight", "1.bias"}
    with torch.no_grad():
        model[1].weight.add_(1.0)
    model.to(torch.float64)  # the model moves (as onto a GPU): the frozen weights are read where they are now
    ema.update(model)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(torch.float64)
    ema.copy_to(fresh)
    assert torch.equal(fresh[0].weight, model[0].weight) and torch.equal(fresh[0].bias, model[0].bias)
    torch.testing.assert_close(fresh[1].weight, model[1].weight - 0.5)
    ck.save_checkpoint(tmp_path, 1, model, ema=ema)
    again = ck.EMA(model, decay=0.5, warmup=1)
    ck.load_checkpoint(ck.latest_checkpoint(tmp_path), model, ema=again)
    assert again.state_dict().keys() == ema.state_dict().keys()


def test_ema_average_and_warmup():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ck.EMA(model, decay=0.9, warmup=1)
    assert ema.current_decay() == pytest.approx(0.9)  # (1 + 0) / (1 + 0) = 1 is capped at decay
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.1))
    target = nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.full((1, 2), 0.1))
    # the warm-up: decay (1 + n) / (warmup + n) after n updates, capped at `decay`
    slow = ck.EMA(model, decay=0.99, warmup=10)
    for n in range(6):
        assert slow.current_decay() == pytest.approx(min(0.99, (1 + n) / (10 + n)), rel=1e-12)
        slow.update(model)
    assert slow.num_updates == 6


def partly_frozen(seed=0):
    """A model whose first layer is a frozen 'base' (as after LoRA injection or a frozen encoder)."""
    model = make_model(seed)
    model[0].requires_grad_(False)
    return model


def test_frozen_parameters_are_fingerprinted_not_stored_and_a_resume_restores_the_whole_model(tmp_path):
    """With `frozen`, model.safetensors holds only what trains (and buffers); a resume onto a model rebuilt with the
    same base restores every tensor exactly, and training continues as the original does."""
    model = partly_frozen()
    fingerprint = ck.frozen_fingerprint(model)
    assert fingerprint["tensors"] == 2 and ck.frozen_fingerprint(make_model()) is None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ema = ck.EMA(model, decay=0.9)
    train_steps(model, opt, ema, 3, seed=1)
    path = ck.save_checkpoint(tmp_path, 3, model, opt, ema, frozen=fingerprint)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {"1.weight", "1.bias", "2.weight", "2.bias"}
    assert json.loads((path / "state.json").read_text())["frozen"] == fingerprint
    train_steps(model, opt, ema, 2, seed=2)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    rebuilt = partly_frozen()  # the base comes back from its source (here: the same seed); the rest is overwritten
    with torch.no_grad():
        rebuilt[2].weight.mul_(-3.0)
    opt2 = torch.optim.AdamW([p for p in rebuilt.parameters() if p.requires_grad], lr=1e-2)
    ema2 = ck.EMA(rebuilt, decay=0.9)
    ck.load_checkpoint(path, rebuilt, opt2, ema2)
    train_steps(rebuilt, opt2, ema2, 2, seed=2)
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_a_resume_onto_other_frozen_weights_is_refused(tmp_path):
    """A checkpoint without its frozen tensors loads only into a model whose frozen weights are the run's, bit for bit."""
    model = partly_frozen()
    path = ck.save_checkpoint(tmp_path, 1, model, frozen=ck.frozen_fingerprint(model))
    other_base = partly_frozen()
    with torch.no_grad():
        other_base[0].weight[0, 0] += 1e-6
    with pytest.raises(CheckpointError, match="frozen weights differ"):
        ck.load_checkpoint(path, other_base)
    with pytest.raises(CheckpointError, match="no frozen tensors"):
        ck.load_checkpoint(path, make_model())  # everything trains here: the base would stay whatever it was
    ck.load_checkpoint(path, partly_frozen())
    with pytest.raises(CheckpointError, match="frozen parameters"):  # a stale fingerprint is not written
        ck.save_checkpoint(tmp_path, 2, make_model(), frozen=ck.frozen_fingerprint(model))


def test_a_tied_frozen_parameter_is_left_out_under_each_of_its_names(tmp_path):
    """A frozen parameter shared by two layers (tied weights) is one tensor of the base: no name of it is stored,
    and a resume fills both from the rebuilt model."""
    def tied(seed=0):
        model = partly_frozen(seed)
        model.append(torch.nn.Linear(*reversed(model[0].weight.shape)))
        model[3].weight = model[0].weight  # the same frozen Parameter under '0.weight' and '3.weight'
        return model

    model = tied()
    path = ck.save_checkpoint(tmp_path, 1, model, frozen=ck.frozen_fingerprint(model))
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {"1.weight", "1.bias", "2.weight", "2.bias", "3.bias"}
    rebuilt = tied()
    ck.load_checkpoint(path, rebuilt)
    assert rebuilt[3].weight is rebuilt[0].weight
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
