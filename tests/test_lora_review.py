"""Transformer LoRA fine-tuning, reviewed: older runs still resume, the CLI keeps the encoder frozen, and the paths
tests/test_lora.py leaves out (other transformer configs, autocast, gradient checkpointing, dropout, older EMA
checkpoints, resume, validation, two processes)."""

import json
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_dit_recipe

from moca3d.models.lora import add_lora, has_lora, is_lora_parameter, merge_lora, within
from moca3d.models.transformer import PRIOR_FREE_MODULES, MoCATransformer
from moca3d.pipeline import MoCAPipeline
from moca3d.training.checkpoints import EMA
from moca3d.training.train_dit import DiTTrainConfig, LatentDataset, build_models, step_draws, train, training_loss

TINY = dict(in_channels=4, num_latents=16, width=32, num_layers=2, num_heads=4, cond_dim=24, compression=4)
LORA_KEYS = ("transformer_lora_rank", "transformer_lora_alpha", "transformer_lora_dropout")


def _inputs(seed=0, B=2, N=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, 16, 4, generator=g), torch.rand(B, generator=g), torch.randn(B, 5, 24, generator=g),
            torch.ones(B, N, dtype=torch.bool), torch.stack([torch.randperm(50, generator=g)[:N] for _ in range(B)]))


def _run(model, inputs):
    x, t, cond, mask, ids = inputs
    return model(x, t, cond, component_mask=mask, ids=ids, routing_seeds=torch.tensor([11, 12]))


def _model(**kw):
    torch.manual_seed(0)
    model = MoCATransformer(**{**TINY, **kw}).eval()
    for p in model.parameters():  # a "trained" prior: nothing zero-initialised
        torch.nn.init.normal_(p, std=0.1)
    return model


def _nonzero_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    return model






def _lora(object_pipeline, **kw):
    return tiny_dit_recipe(**{**dict(init_from=object_pipeline, transformer_lora_rank=2, freeze_image_encoder=True, transformer={},
                             image_encoder={}), **kw})


# ---------------------------------------------------------------------------------------------- found in review


def test_run_recorded_before_the_lora_keys_resumes(object_dataset, tmp_path):
    """A run recorded before the transformer_lora_* keys existed resumes: a key the recipe gained since, at its default,
    is no change (it was refused as 'transformer_lora_dropout null -> 0.0')."""
    root, vae_dir = object_dataset
    run = tmp_path / "old"
    train(root, run, tiny_dit_recipe(steps=1), vae_dir=vae_dir, device="cpu", progress=False)
    recorded = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({k: v for k, v in recorded.items() if k not in LORA_KEYS}))
    resumed = train(root, run, tiny_dit_recipe(steps=2), vae_dir=vae_dir, device="cpu", progress=False)
    assert resumed["trained_steps"] == 1


def test_cli_lora_rank_keeps_the_image_encoder_frozen(object_dataset, object_pipeline, tmp_path):
    """`moca3d train --init-from P --lora-rank R` keeps the image encoder frozen (DINOv2-L for a converted TripoSG, ~0.3 B
    parameters, would otherwise train in full with its gradients, AdamW moments and EMA)."""
    from typer.testing import CliRunner

    from moca3d.cli import app

    root, _ = object_dataset
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(root), "-o", str(run), "--init-from", object_pipeline, "--lora-rank", "2",
                                      "--steps", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    before = MoCAPipeline.from_pretrained(object_pipeline).image_encoder.state_dict()
    after = MoCAPipeline.from_pretrained(run / "pipeline").image_encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"--lora-rank trained the image encoder in full ({len(changed)} of {len(before)} tensors moved)"


# ---------------------------------------------------------------------------------------------- coverage


def test_prior_free_modules_cover_every_parameter_the_converter_initialises():
    """Every tensor moca3d.convert.triposg.init_new_parameters creates (what TripoSG lacks) trains in full."""
    from moca3d.convert.triposg import init_new_parameters

    for mode in ("moc", "dense"):
        config = dict(width=32, num_heads=4, num_latents=16, compression=4, num_layers=4, global_blocks="even",
                      attention_mode=mode)
        new = init_new_parameters(config, {})
        assert new and all(within(k, PRIOR_FREE_MODULES) for k in new), sorted(k for k in new if not within(k, PRIOR_FREE_MODULES))
        model = add_lora(_model(**config), 2, train_full=PRIOR_FREE_MODULES)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(new) <= trainable


@pytest.mark.parametrize("kw", [dict(attention_mode="dense"), dict(attention_mode="none"), dict(token_positions=True),
                                dict(long_skips=True, num_layers=3), dict(timestep_mode="token")])
def test_lora_identity_and_gradients_across_transformer_configs(kw):
    """Injection is the identity and every trainable tensor gets a gradient (no router in dense / none)."""
    model = _model(**kw)
    before = _run(model, _inputs())
    add_lora(model, 2, train_full=PRIOR_FREE_MODULES)
    assert torch.equal(_run(model, _inputs()), before)
    _run(model.train(), _inputs()).square().mean().backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if kw.get("token_positions"):
        assert model.token_embedding.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_forward_backward_under_autocast(dtype):
    model = add_lora(_model(), 2, dropout=0.1, train_full=PRIOR_FREE_MODULES).train()
    with torch.autocast("cpu", dtype=dtype):
        out = _run(model, _inputs())
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradient_checkpointing_with_lora_gives_the_same_gradients(dropout):
    grads = []
    for checkpointing in (False, True):
        model = _nonzero_b(add_lora(_model(), 2, dropout=dropout, train_full=PRIOR_FREE_MODULES)).train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(5)  # the same dropout masks (the recomputation restores the RNG)
        _run(model, _inputs()).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-7, rtol=1e-6, msg=name)


def test_merge_in_train_mode_with_dropout_equals_the_adapted_eval_output():
    """train() merges a deepcopy still in train mode: the merge ignores dropout."""
    model = _nonzero_b(add_lora(_model(), 2, dropout=0.5, train_full=PRIOR_FREE_MODULES))
    adapted = _run(model.eval(), _inputs())
    model.train()
    assert merge_lora(model) > 0 and not has_lora(model)
    torch.testing.assert_close(_run(model.eval(), _inputs()), adapted, atol=1e-6, rtol=1e-5)


def test_ema_loads_an_older_checkpoint_that_averaged_every_tensor():
    """A checkpoint written before the EMA skipped frozen tensors has more keys: they are ignored, the rest loads."""
    model = _model()
    model.packer.requires_grad_(False)  # e.g. a frozen encoder in an older full fine-tune
    ema = EMA(model, decay=0.5)
    old = {k: v.clone() + 1.0 for k, v in model.state_dict().items() if v.is_floating_point()}  # the old, full shadow
    ema.load(old, {"decay": 0.5, "warmup": 10, "num_updates": 7})
    assert ema.num_updates == 7 and not any(k.startswith("packer.") for k in ema.state_dict())
    assert all(torch.equal(v, old[k]) for k, v in ema.state_dict().items())


def test_lora_resume_with_dropout_and_checkpointing_equals_an_uninterrupted_run(object_dataset, object_pipeline, tmp_path):
    """Exact (torch.equal): LoRA dropout is the training step's only draw from the global RNG, which the checkpoint keeps."""
    root, _ = object_dataset
    kw = dict(transformer_lora_dropout=0.3, gradient_checkpointing=True)
    run = tmp_path / "resumed"
    train(root, run, _lora(object_pipeline, steps=2, **kw), device="cpu", progress=False)
    a = train(root, run, _lora(object_pipeline, steps=3, **kw), device="cpu", progress=False)
    b = train(root, tmp_path / "straight", _lora(object_pipeline, steps=3, **kw), device="cpu", progress=False)
    sa = MoCAPipeline.from_pretrained(a["pipeline"]).transformer.state_dict()
    sb = MoCAPipeline.from_pretrained(b["pipeline"]).transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lora_validation_and_attention_mode_override(object_dataset, object_pipeline, tmp_path):
    """validate_every with LoRA (the EMA copy is merged before sampling) and a moc prior fine-tuned as dense."""
    root, _ = object_dataset
    data = tmp_path / "data"
    shutil.copytree(root, data)
    records = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    for record in records[4:]:
        record["split"] = "val"
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = train(data, tmp_path / "run", _lora(object_pipeline, validate_every=2, val_assets=1, val_steps=2, val_resolution=16,
                                                  transformer={"attention_mode": "dense"}), device="cpu", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert any("val_count" in r and r["val_count"] == 1 for r in log)
    pipe = MoCAPipeline.from_pretrained(result["pipeline"])
    assert pipe.transformer.config.attention_mode == "dense" and not has_lora(pipe.transformer)
    assert not any("router" in k or is_lora_parameter(k) for k in pipe.transformer.state_dict())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora_setup(root, object_pipeline):
    from moca3d.models.vae import VecSetVAE

    cfg = DiTTrainConfig.from_dict(dict(init_from=object_pipeline, transformer_lora_rank=2, freeze_image_encoder=True, batch_size=4))
    data = LatentDataset(root, "train", 32)
    vae = VecSetVAE.from_pretrained(f"{object_pipeline}/vae")
    data.latents = [vae.normalize_latents(z) for z in data.latents]
    torch.manual_seed(cfg.seed)
    model = build_models(cfg, tuple(data.latents[0].shape[1:]))
    add_lora(model.transformer, 2, train_full=PRIOR_FREE_MODULES)
    return cfg, data, model


def _lora_steps(model, cfg, data, rows, steps=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(steps):
        optimizer.zero_grad()
        training_loss(model, data, step_draws(cfg, step, len(data), cfg.batch_size), rows, "cpu").backward()
        optimizer.step()


def _ddp_lora_worker(rank, world, port, root, object_pipeline, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg, data, model = _lora_setup(root, object_pipeline)
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # frozen base layers: not in DDP's buckets
    local = cfg.batch_size // world
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):  # several steps: DDP checks every trainable tensor took part in the previous one
        optimizer.zero_grad()
        training_loss(ddp, data, step_draws(cfg, step, len(data), cfg.batch_size), slice(rank * local, (rank + 1) * local),
                      "cpu").backward()
        optimizer.step()
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, result_path)
    dist.barrier()
    os._exit(0)  # as tests/test_pipeline.py: no gloo teardown


def test_two_process_lora_training_matches_one_process(object_dataset, object_pipeline, tmp_path):
    root, _ = object_dataset
    result = tmp_path / "ddp.pt"
    mp.spawn(_ddp_lora_worker, args=(2, _free_port(), str(root), object_pipeline, str(result)), nprocs=2, join=True)
    ddp = torch.load(result)
    cfg, data, model = _lora_setup(str(root), object_pipeline)
    _lora_steps(model, cfg, data, slice(0, 4))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(ddp) == set(trained) and any(is_lora_parameter(n) for n in ddp)
    for name, p in trained.items():
        torch.testing.assert_close(ddp[name], p.detach(), atol=1e-5, rtol=1e-4, msg=name)


def test_a_lora_fine_tune_freezes_the_image_encoder_by_recipe_key_and_flag_alike(object_pipeline):
    """--lora-rank froze the image encoder, the recipe key transformer_lora_rank alone trained it in full: one rule now
    (frozen unless the recipe says freeze_image_encoder false)."""
    lora = dict(init_from=object_pipeline, transformer_lora_rank=2)
    assert DiTTrainConfig.from_dict(lora).freeze_image_encoder is True
    assert DiTTrainConfig.from_dict({**lora, "freeze_image_encoder": False}).freeze_image_encoder is False
    assert DiTTrainConfig.from_dict(dict(init_from=object_pipeline)).freeze_image_encoder is False  # a full fine-tune trains it
    assert DiTTrainConfig.from_dict({**lora, "condition": "scene"}).freeze_image_encoder is False  # scenes: the encoder's LoRA
    assert DiTTrainConfig.from_dict({}).to_dict()["freeze_image_encoder"] is False  # recorded resolved
