"""LoRA fine-tuning of the MoCA transformer (moca3d.models.lora): identity at injection, exact merge, what trains."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from conftest import tiny_dit_recipe

from moca3d.errors import CheckpointError, ConfigError
from moca3d.models.lora import add_lora, has_lora, is_lora_parameter, merge_lora, trainable_summary, within
from moca3d.models.transformer import PRIOR_FREE_MODULES, MoCATransformer
from moca3d.pipeline import MoCAPipeline
from moca3d.training.checkpoints import EMA, latest_checkpoint
from moca3d.training.train_dit import DiTTrainConfig, train

TINY = dict(in_channels=4, num_latents=16, width=32, num_layers=2, num_heads=4, cond_dim=24, compression=4, token_positions=True)


def _inputs(B=2, N=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 16, 4, generator=g)
    t = torch.rand(B, generator=g)
    cond = torch.randn(B, 5, 24, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 2] = False  # a padded component
    ids = torch.stack([torch.randperm(50, generator=g)[:N] for _ in range(B)])
    return x, t, cond, mask, ids


def _run(model, inputs, seeds=(11, 12)):
    x, t, cond, mask, ids = inputs
    return model(x, t, cond, component_mask=mask, ids=ids, routing_seeds=torch.tensor(seeds))


def _model(seed=0):
    torch.manual_seed(seed)
    model = MoCATransformer(**TINY).eval()
    for p in model.parameters():  # a "trained" prior: no zero output projection, no zero-init anything
        torch.nn.init.normal_(p, std=0.1) if p.ndim else None
    return model


def test_within_matches_paths_and_their_tails():
    assert within("blocks.0.attn1.router.to_q", ["router"])
    assert within("blocks.0.attn1.router.to_q.weight", ["attn1.router"])
    assert within("token_embedding", ["token_embedding"])
    assert not within("blocks.0.attn1.to_q", ["router", "attn2"])
    assert not within("blocks.0.attn1.routerx", ["router"])


def test_injection_keeps_the_output_and_freezes_the_prior_layers():
    model = _model()
    inputs = _inputs()
    before = _run(model, inputs)
    add_lora(model, rank=2, train_full=PRIOR_FREE_MODULES)
    torch.testing.assert_close(_run(model, inputs), before, atol=0, rtol=0)  # lora_B starts at zero: exactly the same
    for name, param in model.named_parameters():
        free = within(name, PRIOR_FREE_MODULES)
        assert param.requires_grad == (is_lora_parameter(name) or free), name
        assert not (free and is_lora_parameter(name)), f"{name}: a module trained in full has no adapter"
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert "blocks.0.attn1.to_q" in wrapped and "blocks.1.ff.net.2" in wrapped and "proj_out" in wrapped
    assert not any("router" in n or "packer" in n for n in wrapped)
    trained, total = trainable_summary(model)
    assert 0 < trained < total


def test_training_moves_only_adapters_and_free_modules_and_merges_exactly():
    """A few steps, then the merged model gives the adapted output (fp32, 1e-5) and saves as a plain transformer;
    each adapted weight moved by a matrix of rank <= r, every other frozen tensor not at all."""
    rank = 2
    model = _model()
    prior = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=rank, train_full=PRIOR_FREE_MODULES)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        out = _run(model.train(), _inputs(seed=step))
        opt.zero_grad()
        out.square().mean().backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad), "frozen weights got gradients"
        opt.step()
    model.eval()
    inputs = _inputs(seed=9)
    adapted = _run(model, inputs)
    assert merge_lora(model) > 0 and not has_lora(model)
    torch.testing.assert_close(_run(model, inputs), adapted, atol=1e-5, rtol=1e-5)
    merged = model.state_dict()
    assert set(merged) == set(prior)  # plain names: loads into a fresh transformer
    fresh = MoCATransformer(**TINY)
    fresh.load_state_dict(merged, strict=True)
    low_rank = 0
    for key, old in prior.items():
        delta = merged[key] - old
        if within(key, PRIOR_FREE_MODULES):
            continue
        if key.endswith(".weight") and old.ndim == 2:  # an adapted layer: W + (alpha / r) B A
            s = torch.linalg.svdvals(delta)
            if s[0] > 1e-4:  # well above fp32 rounding of the merge (~1e-8 here)
                assert s[rank] < 1e-3 * s[0], f"{key} moved by more than rank {rank}"
                low_rank += 1
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), f"{key} is frozen but changed"
    assert low_rank >= 4
    assert any(not torch.equal(merged[k], prior[k]) for k in prior if "router" in k), "the router did not train"
    assert any(not torch.equal(merged[k], prior[k]) for k in prior if k.endswith("attn1.to_q.weight")), "no adapter trained"


def test_ema_skips_frozen_parameters_and_copies_the_rest():
    model = _model()
    add_lora(model, rank=2, train_full=PRIOR_FREE_MODULES)
    ema = EMA(model, decay=0.5)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and not frozen & set(ema.state_dict()) and trainable <= set(ema.state_dict())
    target = add_lora(_model(seed=1), rank=2, train_full=PRIOR_FREE_MODULES)  # other weights everywhere
    ema.copy_to(target)  # the averages (here still the model's) and the frozen prior weights as they are
    source = dict(model.named_parameters())
    for name, param in target.named_parameters():
        assert torch.equal(param, source[name]), name


@pytest.mark.parametrize("recipe, message", [
    (dict(transformer_lora_rank=4), "transformer_lora_rank fine-tunes a trained transformer: give init_from"),
    (dict(transformer_lora_rank=-1, init_from="p"), r"transformer_lora_rank must be >= 0 \(0: full fine-tuning\), got -1"),
    (dict(transformer_lora_rank=4, init_from="p", transformer_lora_alpha=0), "transformer_lora_alpha must be positive"),
    (dict(transformer_lora_rank=4, init_from="p", transformer_lora_dropout=1.0), r"transformer_lora_dropout must be in \[0, 1\)"),
])
def test_lora_recipe_values_are_checked(recipe, message):
    with pytest.raises(ConfigError, match=message):
        DiTTrainConfig.from_dict(recipe)






def test_lora_fine_tune_trains_resumes_and_exports_a_plain_pipeline(object_dataset, object_pipeline, tmp_path, capsys):
    root, _ = object_dataset
    lora = dict(init_from=object_pipeline, transformer_lora_rank=2, freeze_image_encoder=True, transformer={})
    run = tmp_path / "lora"
    capsys.readouterr()
    train(root, run, tiny_dit_recipe(steps=2, **lora), device="cpu", progress=False)
    said = capsys.readouterr().out
    assert "training " in said and "parameters (" in said
    with safe_open(str(latest_checkpoint(run) / "model.safetensors"), "pt") as f:  # the checkpoint keeps the adapters
        assert any(".lora_A." in k for k in f.keys())  # but not the frozen base: a resume reloads it from init_from
        assert not any(k.endswith("base_layer.weight") or k.startswith("image_encoder.") for k in f.keys())
    with safe_open(str(latest_checkpoint(run) / "ema.safetensors"), "pt") as f:  # and averages no frozen weight
        assert not any(k.endswith("attn1.to_q.base_layer.weight") for k in f.keys())
    resumed = train(root, run, tiny_dit_recipe(steps=3, **lora), device="cpu", progress=False)
    assert resumed["trained_steps"] == 1
    straight = train(root, tmp_path / "straight", tiny_dit_recipe(steps=3, **lora), device="cpu", progress=False)
    a, b = MoCAPipeline.from_pretrained(resumed["pipeline"]), MoCAPipeline.from_pretrained(straight["pipeline"])
    base = MoCAPipeline.from_pretrained(object_pipeline)
    assert not has_lora(a.transformer) and set(a.transformer.state_dict()) == set(base.transformer.state_dict())
    for (k, v), (_, w) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=1e-5, msg=f"resumed != straight at {k}")
    moved = [k for k, v in a.transformer.state_dict().items() if not torch.equal(v, base.transformer.state_dict()[k])]
    assert any("attn1.to_q" in k for k in moved) and any("router" in k for k in moved)
    frozen = [k for k in base.transformer.state_dict() if "norm" in k and not within(k, PRIOR_FREE_MODULES)]
    assert frozen and not set(frozen) & set(moved), "a frozen prior tensor changed"
    for k, v in base.image_encoder.state_dict().items():
        assert torch.equal(v, a.image_encoder.state_dict()[k]), f"frozen encoder tensor {k} changed"
    image = next((root / "assets").iterdir()) / "render.png"
    out = a(image, num_parts=2, steps=2, seed=0, resolution=16, show_progress=False)
    assert len(out.meshes) == 2

    # OUT/lora: the adapter alone, folded into its base at load, is the exported pipeline
    with safe_open(str(Path(resumed["lora"]) / "adapter_model.safetensors"), "pt") as f:
        assert any(".lora_B." in k for k in f.keys()) and not any("base_layer" in k or k.startswith("image_encoder.") for k in f.keys())
    applied = MoCAPipeline.from_pretrained(object_pipeline, lora=resumed["lora"])
    for part in ("transformer", "image_encoder"):
        mine, exported = getattr(applied, part).state_dict(), getattr(a, part).state_dict()
        assert mine.keys() == exported.keys()
        for k, v in mine.items():
            torch.testing.assert_close(v, exported[k], atol=1e-6, rtol=1e-5, msg=f"adapter on its base != export at {k}")
    with pytest.raises(CheckpointError, match="trained on other base weights") as refused:
        MoCAPipeline.from_pretrained(straight["pipeline"], lora=resumed["lora"])  # the same architecture, other weights
    assert str(refused.value).endswith(f"trained on other base weights ({object_pipeline}), not on {straight['pipeline']}: pass that "
                                       f"pipeline, --model {object_pipeline}")  # the base as an absolute path, named once
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder"):
        MoCAPipeline.from_pretrained(object_pipeline, lora=resumed["pipeline"])


def test_train_cli_fine_tunes_with_lora_from_a_pipeline(object_dataset, object_pipeline, tmp_path):
    from typer.testing import CliRunner

    from moca3d.cli import app

    root, vae_dir = object_dataset
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(root), "-o", str(run), "--init-from", object_pipeline, "--lora-rank", "2", "--steps", "1",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "train_config.json").read_text())["transformer_lora_rank"] == 2
    assert not has_lora(MoCAPipeline.from_pretrained(run / "pipeline").transformer)
    image, glb = next((root / "assets").iterdir()) / "render.png", tmp_path / "parts.glb"
    result = runner.invoke(app, ["generate", str(image), "--model", object_pipeline, "--lora", str(run / "lora"), "--parts", "2",
                                 "--steps", "2", "--resolution", "16", "--device", "cpu", "-o", str(glb)])
    assert result.exit_code == 0, result.output
    assert glb.is_file()
    result = runner.invoke(app, ["train", str(root), "-o", str(tmp_path / "x"), "--vae", str(vae_dir), "--lora-rank", "2"])
    assert isinstance(result.exception, ConfigError)  # moca3d.cli.main prints it as one line
    assert "transformer_lora_rank fine-tunes a trained transformer: give init_from" in str(result.exception)


def test_a_wrong_adapter_folder_is_refused_before_the_base_model_loads(tmp_path, monkeypatch):
    """--lora with a typo, a pipeline folder or a half-written adapter: one line, before gigabytes of base load."""
    import moca3d.pipeline as pipeline_module

    def loaded(*args, **kwargs):
        raise AssertionError("the base pipeline was loaded before its adapter folder was checked")

    monkeypatch.setattr(pipeline_module, "_check_finite", loaded)  # runs after each component of the base loads
    with pytest.raises(CheckpointError, match="no such LoRA adapter folder"):
        MoCAPipeline.from_pretrained(None, lora=tmp_path / "typo")
    folder = tmp_path / "lora"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"not a LoRA adapter folder \(adapter_config.json missing\)"):
        MoCAPipeline.from_pretrained(None, lora=folder)
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        MoCAPipeline.from_pretrained(None, lora=folder)
    config = {"rank": 2, "alpha": 2, "target_modules": [], "train_full": [], "base_fingerprint": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors missing beside adapter_config.json"):
        MoCAPipeline.from_pretrained(None, lora=folder)
