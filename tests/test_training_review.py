"""Training inputs that used to train wrongly, fail late or fail with a stack trace (a review of the training paths)."""

import os
import shutil
import stat

import pytest
import torch
from conftest import preempt_on_call, tiny_dit_recipe

from moca3d.errors import CheckpointError, ConfigError, InputError
from moca3d.training.train_dit import train


def test_nan_in_cached_latents_names_the_asset(object_dataset, tmp_path):
    from safetensors.torch import load_file, save_file

    root, vae_dir = object_dataset
    data = tmp_path / "data"
    shutil.copytree(root, data)
    path = next(data.glob("assets/*/latents.safetensors"))
    tensors = load_file(str(path))
    tensors["latents"][0, 0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"token_order": "fps"})
    with pytest.raises(InputError, match=f"{path.parent.name}.*NaN or Inf"):
        train(data, tmp_path / "run", tiny_dit_recipe(), vae_dir=vae_dir, device="cpu", progress=False)


def test_a_corrupt_or_foreign_cache_file_is_one_line(object_dataset, tmp_path):
    root, vae_dir = object_dataset
    for name, data in (("cut.safetensors", b"\x40\x00\x00"), ("render.png", (root / "manifest.jsonl").read_bytes())):
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(InputError, match="not a readable latent cache"):
            train(bad, tmp_path / f"run_{name}", tiny_dit_recipe(), vae_dir=vae_dir, device="cpu", progress=False)


def test_validation_without_a_val_split_is_refused_before_training(object_dataset, tmp_path):
    """Refused before training, with the way out; a run too short to reach its first validation needs no val split
    (a 2-step trial of a LoRA recipe, validate_every 5000, was refused)."""
    root, vae_dir = object_dataset  # every asset in train
    with pytest.raises(InputError, match="'val' split.*validate_every 1 validates on them .set it to 0 to train without"):
        train(root, tmp_path / "run", tiny_dit_recipe(validate_every=1), vae_dir=vae_dir, device="cpu", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    result = train(root, tmp_path / "short", tiny_dit_recipe(validate_every=5000), vae_dir=vae_dir, device="cpu", progress=False)
    assert result["steps"] == 2


def test_a_warm_up_longer_than_the_run_is_warned_about(object_dataset, tmp_path):
    """--steps 200 under a recipe's warmup_steps 500 trained at a fraction of lr throughout, silently."""
    from moca3d.errors import InputWarning

    root, vae_dir = object_dataset
    with pytest.warns(InputWarning, match="warmup_steps 5 > steps 2: the learning rate never reaches lr 0.003"):
        train(root, tmp_path / "run", tiny_dit_recipe(warmup_steps=5), vae_dir=vae_dir, device="cpu", progress=False)


def test_a_latent_length_set_by_the_recipe_is_named_as_the_cause(object_dataset, object_pipeline, tmp_path):
    """'encode the data with its VAE' sent a user whose data was encoded with that VAE round in a loop: the recipe's
    transformer num_latents asked for another length."""
    root, _ = object_dataset
    recipe = tiny_dit_recipe(init_from=str(object_pipeline), transformer={"num_latents": 32})
    with pytest.raises(ConfigError, match="the recipe's transformer num_latents 32 asks for another latent set"):
        train(root, tmp_path / "run", recipe, device="cpu", progress=False)


def test_resume_refuses_another_vae_and_a_refused_resume_records_nothing(object_dataset, tmp_path):
    """Checkpoints record the VAE's fingerprint: another VAE (another latent scale) is refused; the refused resume
    leaves train_config.json as it was. A damaged newest checkpoint says how to resume from the one before. Written
    files are readable by others (0644), as every file the project writes."""
    from moca3d.models.vae import VecSetVAE

    root, vae_dir = object_dataset
    run = tmp_path / "run"
    train(root, run, tiny_dit_recipe(), vae_dir=vae_dir, device="cpu", progress=False)
    recorded = (run / "train_config.json").read_text()
    other = tmp_path / "other_vae"
    vae = VecSetVAE.from_pretrained(vae_dir)
    with torch.no_grad():
        next(vae.parameters()).add_(0.5)
    vae.save_pretrained(other)
    with pytest.raises(ConfigError, match="another VAE"):
        train(root, run, tiny_dit_recipe(steps=3), vae_dir=other, device="cpu", progress=False)
    assert (run / "train_config.json").read_text() == recorded  # steps 2 -> 3 not recorded by the refused resume
    newest = sorted((run / "checkpoints").iterdir())[-1]
    assert stat.S_IMODE(os.stat(newest / "model.safetensors").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(newest).st_mode) == 0o755
    (newest / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match=f"delete {newest} to resume from the checkpoint before it"):
        train(root, run, tiny_dit_recipe(steps=3), vae_dir=vae_dir, device="cpu", progress=False)


def test_assets_over_max_components_are_named_not_silently_dropped(object_dataset, tmp_path):
    """An asset of 40 parts under max_components 32 was dropped without a word, and when it was the only one the error
    said to run encode-dataset (its latents existed). The six assets have 3 to 10 parts."""
    from moca3d.errors import InputWarning

    root, vae_dir = object_dataset
    with pytest.raises(InputError, match=r"no 'train' assets with cached latents; 6 'train' assets have more than max_components 2 "
                                         r"parts .*raise the recipe's max_components"):
        train(root, tmp_path / "none", tiny_dit_recipe(max_components=2), vae_dir=vae_dir, device="cpu", progress=False)
    with pytest.warns(InputWarning, match="2 'train' assets have more than max_components 8 parts .*; they are left out"):
        train(root, tmp_path / "some", tiny_dit_recipe(max_components=8, steps=1), vae_dir=vae_dir, device="cpu", progress=False)


def test_mixed_latent_lengths_are_one_line(object_dataset, tmp_path):
    """An interrupted re-encode at another --num-latents left latents of two lengths: a raw torch error mid-training."""
    from safetensors.torch import load_file, save_file

    root, vae_dir = object_dataset
    data = tmp_path / "data"
    shutil.copytree(root, data)
    path = sorted(data.glob("assets/*/latents.safetensors"))[0]
    tensors = load_file(str(path))
    tensors["latents"] = torch.cat([tensors["latents"], tensors["latents"]], dim=1)  # twice the tokens
    save_file(tensors, str(path), metadata={"token_order": "fps"})
    with pytest.raises(InputError, match=r"cached latents of \d+ and \d+ tokens are mixed .*encode-dataset --overwrite"):
        train(data, tmp_path / "run", tiny_dit_recipe(), vae_dir=vae_dir, device="cpu", progress=False)


def test_missing_latents_and_too_many_parts_are_both_named(object_dataset, tmp_path):
    root, vae_dir = object_dataset
    data = tmp_path / "data"
    shutil.copytree(root, data)
    for path in data.glob("assets/*/latents.safetensors"):
        path.unlink()
    with pytest.raises(InputError, match=r"run `moca3d encode-dataset` first.; 2 'train' assets have more than max_components 8"):
        train(data, tmp_path / "run", tiny_dit_recipe(max_components=8), vae_dir=vae_dir, device="cpu", progress=False)


def test_a_latent_cache_names_its_assets_over_max_components(object_dataset, tmp_path):
    from moca3d.errors import InputWarning
    from moca3d.training.train_dit import LatentDataset

    root, _ = object_dataset
    cache = LatentDataset(root, "train", 32).save_cache(tmp_path / "cache.safetensors")
    with pytest.warns(InputWarning, match="2 cached assets have more than max_components 8 parts .*; they are left out"):
        assert len(LatentDataset.from_cache(cache, max_components=8, image_size=32)) == 4
    with pytest.raises(InputError, match="no assets with at most 2 parts; 6 cached assets have more than max_components 2"):
        LatentDataset.from_cache(cache, max_components=2, image_size=32)


def test_sigterm_checkpoints_its_step_and_the_run_resumes_with_one_log(object_dataset, tmp_path, monkeypatch):
    """A preempted job (SIGTERM) or a Ctrl+C ended training at once, saving nothing since the last checkpoint; now the
    current step is checkpointed and the same call resumes from it; the log keeps each step once; a fresh run
    (resume=False) over checkpoints is refused (it deleted them as it checkpointed)."""
    import json
    import signal

    import moca3d.training.train_dit as train_dit
    from moca3d.training.stop import TrainingStopped

    root, vae_dir = object_dataset
    recipe = tiny_dit_recipe(steps=6, checkpoint_every=100)  # no checkpoint but the last one, unless stopped
    calls = []
    monkeypatch.setattr(train_dit, "training_loss", preempt_on_call(train_dit.training_loss, 3, calls))  # SIGTERM in step 3
    with pytest.raises(TrainingStopped, match=r"stopped at step 3 of 6 \(SIGTERM\): checkpoint saved"):
        train(root, tmp_path / "run", recipe, vae_dir=vae_dir, device="cpu", progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000003"]
    assert not (tmp_path / "run" / ".training").exists()  # its record released: a reused process id cannot block a resume
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(root, tmp_path / "run", recipe, vae_dir=vae_dir, device="cpu", progress=False, resume=False)
    result = train(root, tmp_path / "run", recipe, vae_dir=vae_dir, device="cpu", progress=False)
    assert result["trained_steps"] == 3 and len(calls) == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # each step once, across the stop


def test_a_damaged_state_file_says_the_way_out_and_a_missing_one_is_named(object_dataset, tmp_path):
    import warnings

    from moca3d.errors import InputWarning
    from moca3d.training.checkpoints import latest_checkpoint

    root, vae_dir = object_dataset
    train(root, tmp_path / "run", tiny_dit_recipe(steps=2), vae_dir=vae_dir, device="cpu", progress=False)
    newest = tmp_path / "run" / "checkpoints" / "step_00000002"
    (newest / "state.json").write_text('{"step": 2, "ext')  # cut short
    with pytest.raises(CheckpointError, match="corrupt JSON .*delete .*step_00000002 to resume from the checkpoint before it"):
        train(root, tmp_path / "run", tiny_dit_recipe(steps=3), vae_dir=vae_dir, device="cpu", progress=False)
    (newest / "state.json").unlink()  # skipped silently before
    with pytest.warns(InputWarning, match="step_00000002 left out .*resuming from step_00000001"):
        assert latest_checkpoint(tmp_path / "run").name == "step_00000001"
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        shutil.rmtree(newest)
        latest_checkpoint(tmp_path / "run")


def test_a_run_folder_trained_by_another_live_process_is_refused(object_dataset, tmp_path):
    """Two jobs in one run folder (a requeued job beside the preempted one still running) overwrote each other's
    checkpoints; a record of a live process of this machine now refuses the second, a dead one's is taken over."""
    import json
    import socket
    import subprocess
    import sys

    from moca3d.training.checkpoints import RUN_LOCK

    root, vae_dir = object_dataset
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / RUN_LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
        with pytest.raises(ConfigError, match=f"being trained by process {other.pid} on this machine"):
            train(root, run, tiny_dit_recipe(), vae_dir=vae_dir, device="cpu", progress=False)
    finally:
        other.kill()
        other.wait()
    train(root, run, tiny_dit_recipe(), vae_dir=vae_dir, device="cpu", progress=False)  # its process is gone: taken over
    assert not (run / RUN_LOCK).exists()  # released at the end
