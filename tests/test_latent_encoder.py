"""Cached latents record the VAE encoder that made them; a transformer is trained only with a VAE of that encoder
(it trained and exported with any --vae: a pipeline whose VAE decodes latents it never made)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_dit_recipe
from moca3d.errors import ConfigError, InputError
from moca3d.models.vae import VecSetVAE
from moca3d.training.checkpoints import read_metadata
from moca3d.training.train_dit import LatentDataset, train
from moca3d.training.train_vae import encoder_id


def changed_vae(vae_dir, folder, module: str):
    """`vae_dir`'s VAE with one module's first weight shifted, saved in `folder`."""
    vae = VecSetVAE.from_pretrained(vae_dir)
    with torch.no_grad():
        next(getattr(vae, module).parameters()).add_(0.25)
    vae.save_pretrained(folder)
    return folder


def test_training_refuses_a_vae_of_another_encoder_and_takes_a_decoder_fine_tune(object_dataset, tmp_path):
    root, vae_dir = object_dataset
    recorded = read_metadata(next(root.glob("assets/*/latents.safetensors")))["encoder"]
    assert recorded == encoder_id(VecSetVAE.from_pretrained(vae_dir))
    other = changed_vae(vae_dir, tmp_path / "other", "encoder")
    with pytest.raises(ConfigError, match=rf"its latents were encoded by another VAE encoder \({recorded}\) than {other}'s"):
        train(root, tmp_path / "run", tiny_dit_recipe(steps=1), vae_dir=other, device="cpu", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    cache = LatentDataset(root, "train", 32).save_cache(tmp_path / "cache.safetensors")  # the record travels with a cache
    assert read_metadata(cache)["encoder"] == recorded
    with pytest.raises(ConfigError, match="encoded by another VAE encoder"):
        train(cache, tmp_path / "run", tiny_dit_recipe(steps=1), vae_dir=other, device="cpu", progress=False)
    tuned = changed_vae(vae_dir, tmp_path / "tuned", "decoder")  # a decoder fine-tune: the same latents
    assert train(root, tmp_path / "run", tiny_dit_recipe(steps=1), vae_dir=tuned, device="cpu", progress=False)["steps"] == 1


def test_latents_of_two_encoders_are_refused_and_unrecorded_ones_are_not_checked(object_dataset, tmp_path):
    root, vae_dir = object_dataset
    data = tmp_path / "data"
    shutil.copytree(root, data)
    first, second = sorted(data.glob("assets/*/latents.safetensors"))[:2]
    tensors, meta = load_file(str(first)), read_metadata(first)
    save_file(tensors, str(first), metadata={**meta, "encoder": "sha256:0000000000000000"})  # a re-encode cut short
    with pytest.raises(InputError, match="cached latents of 2 different VAE encoders are mixed"):
        LatentDataset(data, "train", 32)
    for path in data.glob("assets/*/latents.safetensors"):  # written before the record: trained as before
        tensors, meta = load_file(str(path)), read_metadata(path)
        save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if k != "encoder"})
    assert LatentDataset(data, "train", 32).encoder is None
    other = changed_vae(vae_dir, tmp_path / "other", "encoder")
    assert train(data, tmp_path / "run", tiny_dit_recipe(steps=1), vae_dir=other, device="cpu", progress=False)["steps"] == 1


def test_a_refused_cache_says_to_write_the_cache_again(object_dataset, tmp_path):
    root, vae_dir = object_dataset
    cache = LatentDataset(root, "train", 32).save_cache(tmp_path / "cache.safetensors")
    other = changed_vae(vae_dir, tmp_path / "other", "encoder")
    with pytest.raises(ConfigError, match=r"re-encode its dataset .* and write the cache again \(`moca3d cache-latents`\)"):
        train(cache, tmp_path / "run", tiny_dit_recipe(steps=1), vae_dir=other, device="cpu", progress=False)
