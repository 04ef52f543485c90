"""`moca3d train-default` runs every stage of a recipe end to end (the smoke recipe: seconds on a CPU)."""

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.models.image_encoder import ImageEncoder
from moca3d.models.vae import VecSetVAE
from moca3d.pipeline import MoCAPipeline

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.json"


def test_smoke_recipe_runs_every_stage(tmp_path):
    """prepare -> VAE -> decoder fine-tune -> latents -> DiT -> continued DiT -> a new DiT on that encoder."""
    work = tmp_path / "work"
    result = CliRunner().invoke(app, ["train-default", "--work", str(work), "--recipe", str(SMOKE),
                                      "--workers", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for stage in ("[1/4]", "[2/4]", "[2c/4]", "[3/4]", "[3b/4]", "[4/4]", "[4b/4]"):
        assert stage in result.output
    # the DiT started from the pre-trained encoder: its width (48) is not the DiT recipe's own (64)
    pretrained = ImageEncoder.from_pretrained(str(work / "encoder" / "image_encoder"))
    assert pretrained.config.width == 48 == MoCAPipeline.from_pretrained(str(work / "dit" / "pipeline")).image_encoder.config.width
    assert json.loads((work / "dit" / "train_config.json").read_text())["image_encoder_from"] == str(work / "encoder" / "image_encoder")
    pipe = MoCAPipeline.from_pretrained(str(work / "dit_continue" / "pipeline"))
    first, tuned = (VecSetVAE.from_pretrained(str(work / run / "vae")) for run in ("vae", "vae_finetune"))
    shipped = pipe.vae.state_dict()
    for k, v in tuned.state_dict().items():  # the pipeline decodes with the fine-tuned decoder ...
        assert torch.equal(shipped[k], v), k
    for k, v in first.state_dict().items():  # ... behind the first VAE's encoder, whose latents the DiT learned
        if k.startswith(("encoder.", "quant.")):
            assert torch.equal(shipped[k], v), k
    assert any(not torch.equal(shipped[k], v) for k, v in first.state_dict().items() if k.startswith("decoder."))
    stage1 = MoCAPipeline.from_pretrained(str(work / "dit" / "pipeline")).transformer.state_dict()
    assert any(not torch.equal(stage1[k], v) for k, v in pipe.transformer.state_dict().items())  # trained further
    # the last stage: a new transformer (configs/dit_smoke_grow.json: width 48, 3 blocks) on the continued encoder
    grown = MoCAPipeline.from_pretrained(str(work / "dit_continue2" / "pipeline"))
    assert (grown.transformer.config.width, grown.transformer.config.num_layers) == (48, 3)
    assert "a new transformer on the image encoder" in result.output
    config = json.loads((work / "dit_continue2" / "train_config.json").read_text())
    assert config["image_encoder_from"] == str(work / "dit_continue" / "pipeline" / "image_encoder") and not config["init_from"]
