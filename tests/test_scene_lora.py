"""Scene LoRA adapter folders: a `train-scene` run with a transformer LoRA rank writes OUT/lora, which folds into the object
pipeline it was fine-tuned from as that run's scene pipeline (`MoCAPipeline.from_pretrained(base, lora=...)`, the --lora of
generate-scene / evaluate-scenes, demo --scene-lora), and wrong pairings are refused in one line."""

import json
import shutil
import socket

import pytest
import torch
from safetensors import safe_open
from test_scene import TINY_ENCODER, TINY_TRANSFORMER, _visible_scene, scene_recipe, scenes  # noqa: F401 (a fixture)
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.commands.info import describe
from moca3d.errors import CheckpointError
from moca3d.models.image_encoder import ImageEncoder
from moca3d.models.lora import add_lora, has_lora, merge_lora, read_adapter_config, save_adapter
from moca3d.models.transformer import PRIOR_FREE_MODULES
from moca3d.pipeline import MoCAPipeline
from moca3d.training.checkpoints import frozen_fingerprint
from moca3d.training.train_dit import (DiTTrainConfig, adapter_config, build_models, build_scene_models, export_pipeline,
                                       scene_adapter_parts, train)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lora_run(scenes, tmp_path_factory):
    """A scene run with transformer and encoder LoRA, a layout embedding the base lacks and a cloned widening: its folder."""
    root, obj = scenes
    run = tmp_path_factory.mktemp("scene_lora")
    train(root, run, scene_recipe(obj, steps=1, transformer_lora_rank=2, lr=1e-2, widen_init="clone", transformer={"layout_features": 8}),
          device="cpu", progress=False)
    return run


def _same_scene_model(applied: MoCAPipeline, exported: MoCAPipeline, folder, n) -> None:
    """The two pipelines hold the same weights and give the same conditions, layouts and velocities (fp32, 1e-6)."""
    assert applied.is_scene_model and not has_lora(applied.transformer) and not has_lora(applied.image_encoder)
    for part in ("transformer", "image_encoder"):  # the same architecture (diffusers' private keys aside: where it was read from)
        mine, theirs = getattr(applied, part).config, getattr(exported, part).config
        assert {k: v for k, v in mine.items() if not k.startswith("_")} == {k: v for k, v in theirs.items() if not k.startswith("_")}
    for part in ("transformer", "image_encoder"):
        mine, theirs = getattr(applied, part).state_dict(), getattr(exported, part).state_dict()
        assert mine.keys() == theirs.keys()
        for k, v in mine.items():
            torch.testing.assert_close(v, theirs[k], atol=1e-6, rtol=1e-5, msg=f"adapter on its base != export at {part}.{k}")
    cond, layout = applied.scene_condition(folder / "render.png", folder / "mask.png")
    cond_e, layout_e = exported.scene_condition(folder / "render.png", folder / "mask.png")
    torch.testing.assert_close(cond, cond_e, atol=1e-6, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, n, 16, 4, generator=g), torch.rand(1, generator=g)
    ids = exported.transformer.sample_ids(1, n, g)
    with torch.no_grad():
        velocity = exported.transformer(x, t, cond_e, ids=ids, layout=layout_e)
        torch.testing.assert_close(applied.transformer(x, t, cond, ids=ids, layout=layout), velocity, atol=1e-6, rtol=1e-5)
    assert velocity.abs().max() > 1e-3  # a trained output layer: the comparison sees the weights


def test_a_scene_lora_run_writes_an_adapter_that_folds_into_its_object_base(scenes, lora_run, tmp_path):
    root, obj = scenes
    adapter = lora_run / "lora"
    config = read_adapter_config(adapter, "scene")
    assert config["image_encoder"]["widen_init"] == "clone" and config["image_encoder"]["train_full"] == ["patch_embed"]
    assert config["transformer_overrides"] == {"layout_features": 8} and config["base"] == str(obj)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("transformer.") and ".lora_B." in k for k in keys)
    assert any(k.startswith("image_encoder.") and ".lora_A." in k for k in keys)
    assert {"image_encoder.patch_embed.weight", "transformer.layout_embed.linear_2.weight"} <= keys  # trained in full
    assert not any("base_layer" in k for k in keys)  # the frozen base stays the base's
    folder, n = _visible_scene(root)
    applied = MoCAPipeline.from_pretrained(obj, lora=adapter)
    exported = MoCAPipeline.from_pretrained(lora_run / "pipeline")
    _same_scene_model(applied, exported, folder, n)
    assert applied.source == {"model": str(obj), "lora": str(adapter)}
    model_bytes = sum(p.stat().st_size for part in ("transformer", "image_encoder") for p in (lora_run / "pipeline" / part).glob("*.safetensors"))
    assert (adapter / "adapter_model.safetensors").stat().st_size < model_bytes

    # refusals, each one line: the scene pipeline itself as the base, another object pipeline of the same architecture
    with pytest.raises(CheckpointError, match=r"fine-tuned from a 3-channel image encoder .*takes 7 channels"):
        MoCAPipeline.from_pretrained(lora_run / "pipeline", lora=adapter)
    torch.manual_seed(5)
    other = export_pipeline(tmp_path / "other", build_models(DiTTrainConfig.from_dict(dict(transformer=TINY_TRANSFORMER, image_encoder=TINY_ENCODER)),
                                                             (16, 4)), obj / "vae")
    with pytest.raises(CheckpointError, match="trained on other base weights"):
        MoCAPipeline.from_pretrained(other, lora=adapter)
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    from moca3d.training.checkpoints import atomic_save_tensors, load_tensors

    tensors = load_tensors(broken / "adapter_model.safetensors")
    atomic_save_tensors({k: v for k, v in tensors.items() if k != "image_encoder.patch_embed.weight"}, broken / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit .*trained tensors missing \(e.g. 'image_encoder.patch_embed.weight'\)"):
        MoCAPipeline.from_pretrained(obj, lora=broken)
    del config["image_encoder"]["widen_init"]
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"not a moca3d LoRA adapter \(no image_encoder.widen_init\)"):
        MoCAPipeline.from_pretrained(obj, lora=broken)


def test_a_scene_adapter_holds_an_encoder_that_was_not_its_bases_whole(scenes, tmp_path):
    """image_encoder_from (e.g. a scene-pre-trained, 7-channel encoder), its projection frozen: the adapter carries that
    encoder (it is not in the object base), and still folds into the object base as the run's pipeline would export. The
    run's export steps (`train`'s end), on models "trained" by hand: seconds fewer than a run."""
    root, obj = scenes
    torch.manual_seed(3)
    ImageEncoder(**TINY_ENCODER, in_channels=7).save_pretrained(tmp_path / "encoder")
    cfg = scene_recipe(obj, transformer_lora_rank=2, image_encoder_from=str(tmp_path / "encoder"), train_projection=False)
    model = build_scene_models(cfg, (16, 4))
    add_lora(model.transformer, 2, train_full=PRIOR_FREE_MODULES)
    frozen = frozen_fingerprint(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # lora_B (zero at injection) and the parts trained in full, away from their start
                p.add_(torch.randn_like(p), alpha=0.05)
    folder = save_adapter(tmp_path / "lora", model, adapter_config(cfg, model, frozen), whole=scene_adapter_parts(cfg))
    merge_lora(model)
    exported = export_pipeline(tmp_path / "pipeline", model, obj / "vae")
    spec = read_adapter_config(folder)["image_encoder"]
    assert spec["widen_init"] is None and spec["train_full"] == [] and spec["config"]["in_channels"] == 7
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert "image_encoder.patch_embed.weight" in f.keys()  # frozen, but not the base's: held whole
    scene, n = _visible_scene(root)
    _same_scene_model(MoCAPipeline.from_pretrained(obj, lora=folder), MoCAPipeline.from_pretrained(exported), scene, n)


def test_scene_verbs_take_a_scene_adapter_and_refuse_an_object_one(scenes, lora_run, tmp_path, monkeypatch):
    root, obj = scenes
    adapter = lora_run / "lora"
    folder, n = _visible_scene(root)
    runner = CliRunner()
    glb = tmp_path / "scene.glb"
    common = ["--steps", "1", "--resolution", "16", "--device", "cpu"]
    res = runner.invoke(app, ["generate-scene", str(folder / "render.png"), "--masks", str(folder / "mask.png"), "-o", str(glb),
                              "--model", str(obj), "--lora", str(adapter), *common])
    assert res.exit_code == 0, res.output
    record = describe(glb)
    assert record["settings"]["model"] == str(obj) and record["settings"]["lora"] == str(adapter)
    assert sum(name.startswith("instance_") for name in record["components"]) == n
    report = tmp_path / "eval.json"
    res = runner.invoke(app, ["evaluate-scenes", str(root), "--split", "train", "--count", "1", "--metric-points", "500",
                              "--model", str(obj), "--lora", str(adapter), "--json", str(report), *common])
    assert res.exit_code == 0, res.output
    evaluated = json.loads(report.read_text())
    assert evaluated["model"] == str(obj) and evaluated["lora"] == str(adapter) and evaluated["count"] == 1

    info = describe(adapter)
    assert info["kind"] == "LoRA adapter" and info["task"] == "scenes (image + instance masks)"
    assert info["image_encoder"]["rank"] == 2 and info["image_encoder"]["widen_init"] == "clone"
    text = runner.invoke(app, ["info", str(adapter)]).output
    assert "task: scenes (image + instance masks)" in text and "image encoder: LoRA rank 2" in text and "widened to 7 channels (clone)" in text

    # an object adapter where a scene one is expected, and the other way round: refused before any model loads
    plain = tmp_path / "object_lora"
    shutil.copytree(adapter, plain)
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in ("condition", "image_encoder")}))
    import moca3d.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "_check_finite", lambda *a: pytest.fail("a model loaded before the adapter was checked"))
    res = runner.invoke(app, ["generate-scene", str(folder / "render.png"), "--masks", str(folder / "mask.png"), "-o", str(glb),
                              "--model", str(obj), "--lora", str(plain), *common])
    assert isinstance(res.exception, CheckpointError)
    assert "a LoRA adapter for objects (OUT/lora of `moca3d train --lora-rank`); this needs one for scenes (OUT/lora of `moca3d train-scene --lora-rank`)" in str(res.exception)
    res = runner.invoke(app, ["evaluate-scenes", str(root), "--model", str(obj), "--lora", str(plain), *common])
    assert isinstance(res.exception, CheckpointError) and "this needs one for scenes" in str(res.exception)

    from moca3d import app as demo_app

    seen = []
    monkeypatch.setattr(demo_app, "launch", lambda *args, **kwargs: seen.append(kwargs))
    monkeypatch.setattr(demo_app, "resolve_model", lambda model: model)
    res = runner.invoke(app, ["demo", "--model", str(obj), "--scene-lora", str(adapter), "--port", str(_free_port())])
    assert res.exception is None and seen[0]["scene_lora"] == adapter
    for args, message in ((["--lora", str(adapter)], "a LoRA adapter for scenes"), (["--scene-lora", str(plain)], "this needs one for scenes"),
                          (["--scene-lora", str(adapter), "--no-scenes"], "--scene-lora and --no-scenes contradict each other")):
        res = runner.invoke(app, ["demo", "--model", str(obj), *args, "--port", str(_free_port())])
        assert message in str(res.exception) and len(seen) == 1, args


def test_the_demo_scene_tab_serves_the_scene_adapter_on_its_base(scenes, lora_run, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from moca3d import app as demo_app

    root, obj = scenes
    handlers, make = [], demo_app.DemoGenerator
    monkeypatch.setattr(demo_app, "DemoGenerator", lambda *args, **kwargs: handlers.append(make(*args, **kwargs)) or handlers[-1])
    demo_app.build_app(obj, device="cpu", scene_model_path=obj, scene_lora=lora_run / "lora", output_dir=tmp_path)
    scene = handlers[0].scene_pipeline
    assert scene.is_scene_model and scene.source["lora"] == str(lora_run / "lora") and not handlers[0].pipeline.is_scene_model
    exported = MoCAPipeline.from_pretrained(lora_run / "pipeline").image_encoder.state_dict()
    for k, v in scene.image_encoder.state_dict().items():
        torch.testing.assert_close(v, exported[k], atol=1e-6, rtol=1e-5, msg=k)
