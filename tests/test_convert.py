"""Conversion of TripoSG / PartCrafter folders: written key layout, strictness, and N = 1 equality.

The checkpoints are built here from a written description of the released layout (tiny width),
and the reference output is a hand-written re-computation of TripoSG's layer arithmetic that
shares no code with moca3d:

  * fused attention: q = x Wq^T, k = x Wk^T, v = x Wv^T; cat([q, k, v], -1) viewed (T, H, 3d) and
    split into q, k, v per head (cross-attention: q plain, cat([k, v]) viewed (M, H, 2d));
  * RMSNorm(d, eps 1e-6) on q and k; softmax(q k^T / sqrt d) v; to_out.0;
  * pre-LayerNorm (eps 1e-5) blocks: self-attn, cross-attn, exact-GELU FFN (4D);
  * timestep: [sin | cos](1000 t * 10000^(-j / (D/2))) -> linear_1 (4D) -> GELU -> linear_2, prepended;
  * blocks > layers // 2 pop: x = skip_norm(skip_linear(cat([skip, x]))); blocks < layers // 2 push;
  * out = proj_out(norm_out(x))[:, 1:] predicts Z_0 - eps (moca3d: eps - Z_0, the negation).
"""

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from moca3d.convert import convert_partcrafter, convert_triposg, load_partcrafter_transformer, load_triposg_transformer
from moca3d.convert.triposg import GATE_INIT_LOGIT, load_triposg_vae
from moca3d.errors import CheckpointError, ConfigError, InputError

D, H, LAYERS, C, DC = 16, 2, 5, 4, 8  # width, heads, blocks, latent channels, condition width
L, M = 8, 5  # latent tokens, condition tokens
DH = D // H
PARTS = 4  # PartCrafter max_num_parts
GLOBAL_IDS = [0, 2, 4]


# ----------------------------------------------------------------------------------------------
# Written description of the released layouts
# ----------------------------------------------------------------------------------------------


def triposg_dit_description(part_embedding=False):
    """Key -> shape of TripoSG's DiT (and PartCrafter's, with part_embedding)."""
    keys = {"proj_in.weight": (D, C), "proj_in.bias": (D,),
            "time_proj.linear_1.weight": (4 * D, D), "time_proj.linear_1.bias": (4 * D,),
            "time_proj.linear_2.weight": (D, 4 * D), "time_proj.linear_2.bias": (D,)}
    if part_embedding:
        keys["part_embedding.weight"] = (PARTS, D)
    for i in range(LAYERS):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2", "norm3"):
            keys[b + n + ".weight"] = (D,)
            keys[b + n + ".bias"] = (D,)
        for a, kv in (("attn1", D), ("attn2", DC)):
            keys.update({b + a + ".to_q.weight": (D, D), b + a + ".to_k.weight": (D, kv), b + a + ".to_v.weight": (D, kv),
                         b + a + ".to_out.0.weight": (D, D), b + a + ".to_out.0.bias": (D,),
                         b + a + ".norm_q.weight": (DH,), b + a + ".norm_k.weight": (DH,)})
        keys.update({b + "ff.net.0.proj.weight": (4 * D, D), b + "ff.net.0.proj.bias": (4 * D,),
                     b + "ff.net.2.weight": (D, 4 * D), b + "ff.net.2.bias": (D,)})
        if i > LAYERS // 2:
            keys.update({b + "skip_linear.weight": (D, 2 * D), b + "skip_linear.bias": (D,),
                         b + "skip_norm.weight": (D,), b + "skip_norm.bias": (D,)})
    keys.update({"norm_out.weight": (D,), "norm_out.bias": (D,), "proj_out.weight": (C, D), "proj_out.bias": (C,)})
    return keys


VAE = dict(in_channels=3, latent_channels=4, num_attention_heads=2, width_encoder=16, width_decoder=16,
           num_layers_encoder=1, num_layers_decoder=1, embedding_type="frequency", embed_frequency=2, embed_include_pi=False)


def triposg_vae_description():
    """Key -> shape of TripoSG's VAE at the VAE config above (xyz Fourier 2 freqs + input, + normals)."""
    We, Wd, Cz = VAE["width_encoder"], VAE["width_decoder"], VAE["latent_channels"]
    emb = 3 * (2 * VAE["embed_frequency"] + 1)

    def block(p, W, self_attn):
        a, n = ("attn1", "norm1") if self_attn else ("attn2", "norm2")
        k = {f"{p}.{n}.weight": (W,), f"{p}.{n}.bias": (W,), f"{p}.{a}.to_q.weight": (W, W), f"{p}.{a}.to_k.weight": (W, W),
             f"{p}.{a}.to_v.weight": (W, W), f"{p}.{a}.to_out.0.weight": (W, W), f"{p}.{a}.to_out.0.bias": (W,),
             f"{p}.norm3.weight": (W,), f"{p}.norm3.bias": (W,), f"{p}.ff.net.0.proj.weight": (4 * W, W),
             f"{p}.ff.net.0.proj.bias": (4 * W,), f"{p}.ff.net.2.weight": (W, 4 * W), f"{p}.ff.net.2.bias": (W,)}
        if not self_attn:
            k.update({f"{p}.{a}.norm_cross.weight": (W,), f"{p}.{a}.norm_cross.bias": (W,)})
        return k

    keys = {"encoder.proj_in.weight": (We, emb + 3), "encoder.proj_in.bias": (We,)}
    keys.update(block("encoder.blocks.0", We, False))
    keys.update(block("encoder.blocks.1", We, True))
    keys.update({"encoder.norm_out.weight": (We,), "encoder.norm_out.bias": (We,),
                 "quant.weight": (2 * Cz, We), "quant.bias": (2 * Cz,), "post_quant.weight": (Wd, Cz), "post_quant.bias": (Wd,)})
    keys.update(block("decoder.blocks.0", Wd, True))
    keys.update(block("decoder.blocks.1", Wd, False))
    keys.update({"decoder.proj_query.weight": (Wd, emb), "decoder.proj_query.bias": (Wd,),
                 "decoder.norm_out.weight": (Wd,), "decoder.norm_out.bias": (Wd,),
                 "decoder.proj_out.weight": (1, Wd), "decoder.proj_out.bias": (1,)})
    return keys


def random_state(description, seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in description.items():
        if "norm" in k and k.endswith("weight"):  # LayerNorm / RMSNorm gains around 1
            state[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[k] = 0.3 * torch.randn(shape, generator=g)
    return state


def write_model(folder, state, config):
    folder.mkdir(parents=True)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def write_dino(folder):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=56, patch_size=14)
    Dinov2Model(cfg).save_pretrained(folder)


def triposg_config():
    return {"_class_name": "TripoSGDiTModel", "num_attention_heads": H, "width": D, "in_channels": C,
            "num_layers": LAYERS, "cross_attention_dim": DC}


def partcrafter_config():
    cfg = triposg_config()
    cfg.update(_class_name="PartCrafterDiTModel", max_num_parts=PARTS, enable_part_embedding=True,
               global_attn_block_ids=GLOBAL_IDS)
    return cfg


def write_release(root, partcrafter=False):
    """A folder laid out like the released ones: transformer/, vae/, scheduler/, image_encoder_dinov2/."""
    cfg = partcrafter_config() if partcrafter else triposg_config()
    dit = random_state(triposg_dit_description(partcrafter), seed=1)
    write_model(root / "transformer", dit, cfg)
    write_model(root / "vae", random_state(triposg_vae_description(), seed=2), {"_class_name": "TripoSGVAEModel", **VAE})
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "RectifiedFlowScheduler", "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}))
    write_dino(root / "image_encoder_dinov2")
    (root / "model_index.json").write_text(json.dumps({"image_encoder_dinov2": ["transformers", "Dinov2Model"]}))
    return dit, cfg


# ----------------------------------------------------------------------------------------------
# Hand-written TripoSG / PartCrafter forward
# ----------------------------------------------------------------------------------------------


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rms_norm(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def attend(q, k, v):
    """q (R, H, T, d), k/v (R, H, S, d) -> (R, H, T, d), explicit softmax."""
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def heads(t, n):
    """(R, T, H * n * d) -> (R, H, T, n * d)."""
    R, T, _ = t.shape
    return t.view(R, T, H, -1).transpose(1, 2)


def reference_forward(sd, latents, t1000, cond, num_parts=1, global_ids=(), part_ids=None):
    """TripoSG (or PartCrafter, with global_ids / part_ids) on rows = objects x parts: (R, L, C) -> (R, L, C)."""
    R = latents.shape[0]
    lin = lambda x, p: x @ sd[p + ".weight"].T + (sd[p + ".bias"] if p + ".bias" in sd else 0)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(D // 2) / (D // 2))
    args = t1000[:, None] * freqs[None]
    temb = lin(torch.nn.functional.gelu(lin(torch.cat([args.sin(), args.cos()], -1), "time_proj.linear_1")), "time_proj.linear_2")
    x = torch.cat([temb[:, None], lin(latents, "proj_in")], dim=1)  # (R, T, D)
    if part_ids is not None:
        x = x + sd["part_embedding.weight"][part_ids][:, None]
    T = x.shape[1]
    skips = []
    for i in range(LAYERS):
        b = f"blocks.{i}."
        if i > LAYERS // 2:
            x = lin(torch.cat([skips.pop(), x], -1), b + "skip_linear")
            x = layer_norm(x, sd[b + "skip_norm.weight"], sd[b + "skip_norm.bias"])
        # self-attention, fused q/k/v split per head
        h = layer_norm(x, sd[b + "norm1.weight"], sd[b + "norm1.bias"])
        qkv = heads(torch.cat([lin(h, b + "attn1.to_q"), lin(h, b + "attn1.to_k"), lin(h, b + "attn1.to_v")], -1), 3)
        q, k, v = qkv.split(DH, dim=-1)  # (R, H, T, d)
        q, k = rms_norm(q, sd[b + "attn1.norm_q.weight"]), rms_norm(k, sd[b + "attn1.norm_k.weight"])
        if i in global_ids:  # every part sees all tokens of all parts of its object
            n = num_parts
            k = k.reshape(R // n, n, H, T, DH).transpose(1, 2).reshape(R // n, H, n * T, DH).repeat_interleave(n, 0)
            v = v.reshape(R // n, n, H, T, DH).transpose(1, 2).reshape(R // n, H, n * T, DH).repeat_interleave(n, 0)
        o = attend(q, k, v).transpose(1, 2).reshape(R, T, D)
        x = x + lin(o, b + "attn1.to_out.0")
        # cross-attention: plain q, fused k/v split per head
        h = layer_norm(x, sd[b + "norm2.weight"], sd[b + "norm2.bias"])
        q = rms_norm(heads(lin(h, b + "attn2.to_q"), 1), sd[b + "attn2.norm_q.weight"])
        kv = heads(torch.cat([lin(cond, b + "attn2.to_k"), lin(cond, b + "attn2.to_v")], -1), 2)
        k, v = kv.split(DH, dim=-1)
        k = rms_norm(k, sd[b + "attn2.norm_k.weight"])
        x = x + lin(attend(q, k, v).transpose(1, 2).reshape(R, T, D), b + "attn2.to_out.0")
        h = layer_norm(x, sd[b + "norm3.weight"], sd[b + "norm3.bias"])
        x = x + lin(torch.nn.functional.gelu(lin(h, b + "ff.net.0.proj")), b + "ff.net.2")
        if i < LAYERS // 2:
            skips.append(x)
    x = layer_norm(x, sd["norm_out.weight"], sd["norm_out.bias"])[:, -L:]
    return lin(x, "proj_out")


def inputs(rows, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, L, C, generator=g), torch.rand(1, generator=g).expand(rows), torch.randn(1, M, DC, generator=g)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_triposg_n1_equals_reference(tmp_path):
    dit, cfg = write_release(tmp_path / "src")
    model = load_triposg_transformer(tmp_path / "src" / "transformer", num_latents=L, compression=4)
    assert model.config.timestep_mode == "token" and model.config.long_skips and model.config.num_layers == LAYERS
    lat, t, cond = inputs(1)
    with torch.no_grad():
        ours = model(lat[None], t[:1], cond)[0]  # (1, L, C): N = 1
        ref = reference_forward(dit, lat, 1000 * t[:1], cond)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, -ref, rtol=1e-4, atol=1e-5)  # eps - Z_0 = -(Z_0 - eps)


def test_triposg_global_blocks_start_near_prior(tmp_path):
    write_release(tmp_path / "src")
    model = load_triposg_transformer(tmp_path / "src" / "transformer", num_latents=L, compression=4)
    assert model.id_embedding.weight.abs().sum() == 0
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(2, 5, D, generator=g)
    for i in model.global_indices:
        gate = model.blocks[i].attn1.router.importance(anchors)  # (B, H, N, N)
        off = ~torch.eye(5, dtype=torch.bool)
        torch.testing.assert_close(gate[..., off], torch.full_like(gate[..., off], torch.sigmoid(torch.tensor(GATE_INIT_LOGIT)).item()))
    lat, t, cond = inputs(3)
    with torch.no_grad():  # N > 1 runs; every component's output is finite
        assert torch.isfinite(model(lat[None], t[:1], cond)).all()


def test_partcrafter_dense_equals_reference(tmp_path):
    dit, cfg = write_release(tmp_path / "src", partcrafter=True)
    model = load_partcrafter_transformer(tmp_path / "src" / "transformer", num_latents=L, compression=4)
    assert model.config.attention_mode == "dense" and model.global_indices == GLOBAL_IDS
    torch.testing.assert_close(model.id_embedding.weight, dit["part_embedding.weight"])
    n = 3
    lat, t, cond = inputs(n)
    with torch.no_grad():
        ours = model(lat[None], t[:1], cond)[0]  # (N, L, C), ids 0..N-1
        ref = reference_forward(dit, lat, 1000 * t, cond, num_parts=n, global_ids=GLOBAL_IDS, part_ids=torch.arange(n))
    torch.testing.assert_close(ours, -ref, rtol=1e-4, atol=1e-5)


def test_vae_every_key_mapped_with_per_head_split(tmp_path):
    state = random_state(triposg_vae_description(), seed=2)
    write_model(tmp_path / "vae", state, VAE)
    vae = load_triposg_vae(tmp_path / "vae", num_latents=L)
    ours = vae.state_dict()
    assert set(ours) == set(state)
    for k, v in state.items():
        assert ours[k].shape == v.shape, k
    # head h of q is rows [h*3d, h*3d + d) of cat([q, k, v]) (self) / of k in cat([k, v]) (cross)
    Wd, d = VAE["width_decoder"], VAE["width_decoder"] // VAE["num_attention_heads"]
    fused = torch.cat([state[f"decoder.blocks.0.attn1.to_{n}.weight"] for n in "qkv"])
    for h in range(VAE["num_attention_heads"]):
        torch.testing.assert_close(ours["decoder.blocks.0.attn1.to_k.weight"][h * d:(h + 1) * d], fused[h * 3 * d + d:h * 3 * d + 2 * d])
    fused = torch.cat([state[f"decoder.blocks.1.attn2.to_{n}.weight"] for n in "kv"])
    for h in range(VAE["num_attention_heads"]):
        torch.testing.assert_close(ours["decoder.blocks.1.attn2.to_v.weight"][h * d:(h + 1) * d], fused[h * 2 * d + d:h * 2 * d + 2 * d])
    torch.testing.assert_close(ours["decoder.blocks.1.attn2.to_q.weight"], state["decoder.blocks.1.attn2.to_q.weight"])
    torch.testing.assert_close(ours["decoder.proj_out.weight"], -state["decoder.proj_out.weight"])
    assert Wd == ours["post_quant.weight"].shape[0]


def test_convert_cli_writes_pipeline_folder(tmp_path):
    from typer.testing import CliRunner

    from moca3d.cli import app
    from moca3d.models.transformer import MoCATransformer

    dit, _ = write_release(tmp_path / "src")
    res = CliRunner().invoke(app, ["convert", "triposg", str(tmp_path / "src"), str(tmp_path / "dst"),
                                   "--num-latents", str(L), "--compression", "4"])
    assert res.exit_code == 0, res.output
    for sub in ("transformer", "vae", "scheduler", "image_encoder"):
        assert (tmp_path / "dst" / sub).is_dir()
    index = json.loads((tmp_path / "dst" / "model_index.json").read_text())
    assert index["image_encoder"] == ["transformers", "Dinov2Model"]
    model = MoCATransformer.from_pretrained(tmp_path / "dst" / "transformer").eval()
    lat, t, cond = inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(model(lat[None], t[:1], cond)[0], -reference_forward(dit, lat, 1000 * t[:1], cond), rtol=1e-4, atol=1e-5)

    # the converted folder is a complete pipeline: DINOv2 conditioning, generation, GLB
    from PIL import Image

    from moca3d.pipeline import MoCAPipeline

    pipe = MoCAPipeline.from_pretrained(tmp_path / "dst")
    image = Image.new("RGB", (64, 48), (255, 255, 255))
    image.paste((200, 30, 30), (20, 10, 40, 40))
    cond = pipe.encode_image(image)
    assert cond.shape == (1, pipe.image_encoder.num_tokens, pipe.image_encoder.out_dim)
    with pytest.raises(InputError, match="the image has no foreground"):  # as the built-in encoder and the CLI refuse it
        pipe.encode_image(Image.new("RGB", (64, 48), (255, 255, 255)))
    out = pipe(image, num_parts=2, steps=1, resolution=16, show_progress=False)
    assert len(out.meshes) == 2 and out.latents.shape[0] == 2
    pipe.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["image_encoder"] == ["transformers", "Dinov2Model"]
    MoCAPipeline.from_pretrained(tmp_path / "again")
    from safetensors.torch import load_file, save_file

    # a DINOv2 tensor stored as integers is refused as the small encoder's is (its names lack the wrapper's "model.")
    (weights,) = (tmp_path / "again" / "image_encoder").glob("*.safetensors")
    tensors = load_file(weights)
    name = sorted(k for k in tensors if k.endswith("query.weight"))[0]
    save_file({**tensors, name: tensors[name].to(torch.int32)}, str(weights))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is stored as I32, not floating point"):
        MoCAPipeline.from_pretrained(tmp_path / "again")


def test_converted_pipeline_runs_offloaded_and_loads_without_transformers_bars(tmp_path, capfd):
    """--offload crashed on a converted pipeline ("Cannot copy out of meta tensor": DINOv2's pixels were sent to its
    offloaded, meta weights' device); loading and saving printed transformers' own "Loading weights" bars."""
    from PIL import Image

    from moca3d.pipeline import MoCAPipeline

    from moca3d.convert.triposg import convert_triposg

    write_release(tmp_path / "src")
    convert_triposg(tmp_path / "src", tmp_path / "dst", num_latents=L, compression=4)
    capfd.readouterr()
    plain = MoCAPipeline.from_pretrained(tmp_path / "dst")
    plain.save_pretrained(tmp_path / "again")
    quiet = capfd.readouterr()
    assert "Loading weights" not in quiet.err + quiet.out and "Writing model shards" not in quiet.err + quiet.out
    image = Image.new("RGB", (64, 48), (255, 255, 255))
    image.paste((200, 30, 30), (20, 10, 40, 40))
    settings = dict(num_parts=2, steps=1, resolution=16, seed=0, show_progress=False)
    expected = plain(image, **settings).latents
    offloaded = MoCAPipeline.from_pretrained(tmp_path / "dst").enable_sequential_cpu_offload("cpu")
    assert next(offloaded.image_encoder.parameters()).device.type == "meta"
    torch.testing.assert_close(offloaded(image, **settings).latents, expected, atol=1e-5, rtol=0)


def test_convert_partcrafter_bf16(tmp_path):
    write_release(tmp_path / "src", partcrafter=True)
    dst = convert_partcrafter(tmp_path / "src", tmp_path / "dst", num_latents=L, compression=4, dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(str(dst / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("proj_in.weight").dtype == torch.bfloat16


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("blocks.3.skip_linear.weight"), "key 'blocks.3.skip_linear.weight' missing"),
    (lambda sd: sd.__setitem__("blocks.1.attn2.to_k.weight", torch.zeros(D, D)), "key 'blocks.1.attn2.to_k.weight' has shape [16, 16], expected [16, 8]"),
    (lambda sd: sd.__setitem__("blocks.0.extra.weight", torch.zeros(1)), "unexpected key 'blocks.0.extra.weight'"),
])
def test_wrong_checkpoint_names_first_bad_key(tmp_path, damage, message):
    state = random_state(triposg_dit_description(), seed=1)
    damage(state)
    write_model(tmp_path / "transformer", state, triposg_config())
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_triposg_transformer(tmp_path / "transformer", num_latents=L, compression=4)


@pytest.mark.parametrize("args, message", [
    (["--compression", "0"], "--num-latents (2048) must be a positive multiple of --compression (0)"),
    (["--num-latents", "100", "--compression", "8"], "--num-latents (100) must be a positive multiple of --compression (8)"),
])
def test_convert_options_are_checked_before_reading_weights(tmp_path, args, message):
    from typer.testing import CliRunner

    from moca3d.cli import app

    for verb in ("triposg", "partcrafter"):
        res = CliRunner().invoke(app, ["convert", verb, str(tmp_path / "nowhere"), str(tmp_path / "dst")] + args)
        assert isinstance(res.exception, ConfigError) and message in str(res.exception), res.output
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(app, ["convert", "triposg", str(tmp_path / "nowhere"), str(tmp_path / "file")])
    assert isinstance(res.exception, ConfigError) and "is a file, not a folder" in str(res.exception)


def test_partcrafter_block_range_must_be_a_pair():
    from moca3d.convert.partcrafter import global_block_ids

    assert global_block_ids({"global_attn_block_id_range": [2, 4]}) == [2, 3, 4]
    with pytest.raises(CheckpointError, match="global_attn_block_id_range must be \\[first, last\\], got 5"):
        global_block_ids({"global_attn_block_id_range": 5})


def test_wrong_folder_errors(tmp_path):
    write_release(tmp_path / "src", partcrafter=True)
    with pytest.raises(CheckpointError, match="PartCrafter transformer"):
        convert_triposg(tmp_path / "src", tmp_path / "dst", num_latents=L, compression=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="subfolder 'transformer/'"):
        convert_triposg(tmp_path / "empty", tmp_path / "dst2")
    assert not (tmp_path / "dst2").exists()


def test_corrupt_weight_and_index_files_are_named(tmp_path):
    write_release(tmp_path / "src")
    weights = tmp_path / "src" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted download
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: unreadable safetensors file, truncated or corrupt")):
        load_triposg_transformer(weights.parent, num_latents=L, compression=4)
    shard_index = weights.parent / "diffusion_pytorch_model.safetensors.index.json"
    shard_index.write_text('{"weight_map": {"proj_in.weight": ')
    with pytest.raises(CheckpointError, match=re.escape(f"{shard_index}: not valid JSON")):
        load_triposg_transformer(weights.parent, num_latents=L, compression=4)
    shard_index.write_text('{"weight_map": ["a.safetensors"]}')
    with pytest.raises(CheckpointError, match="'weight_map' must map tensor names to shard file names"):
        load_triposg_transformer(weights.parent, num_latents=L, compression=4)
    shard_index.write_text('{"weight_map": {"proj_in.weight": "../../elsewhere.safetensors"}}')
    with pytest.raises(CheckpointError, match="shard '../../elsewhere.safetensors' is outside the folder"):
        load_triposg_transformer(weights.parent, num_latents=L, compression=4)
    model_index = tmp_path / "src" / "model_index.json"
    model_index.write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(f"{model_index}: not valid JSON")):
        convert_triposg(tmp_path / "src", tmp_path / "dst", num_latents=L, compression=4)
    model_index.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=re.escape(f"{model_index}: expected a JSON object, got list")):
        convert_triposg(tmp_path / "src", tmp_path / "dst", num_latents=L, compression=4)
    assert not (tmp_path / "dst").exists()


class Killed(Exception):
    """A conversion interrupted midway (as by a kill: nothing after the failing write runs)."""


@pytest.mark.parametrize("write, call", [("weights", 1), ("weights", 2), ("copytree", 1)],
                         ids=["transformer-weights", "vae-weights", "image-encoder-copy"])
def test_interrupted_reconversion_never_leaves_a_complete_looking_folder(tmp_path, monkeypatch, write, call):
    """Converting again into an earlier conversion's folder and dying midway: the folder must not load as a pipeline
    (its model_index.json is gone until the end), its vae/ (loaded alone: `encode-dataset --model DST/vae`) is the
    earlier VAE or the new one, never one's config with the other's weights; converting again completes it."""
    import safetensors.torch

    from moca3d.convert import triposg
    from moca3d.pipeline import MoCAPipeline
    from moca3d.training.train_vae import load_vae_folder

    write_release(tmp_path / "a")
    write_release(tmp_path / "b")  # another release: other VAE weights
    save_file(random_state(triposg_vae_description(), seed=3), str(tmp_path / "b" / "vae" / "diffusion_pytorch_model.safetensors"))
    dst = convert_triposg(tmp_path / "a", tmp_path / "dst", num_latents=L, compression=4)
    vaes = {L: load_triposg_vae(tmp_path / "a" / "vae", L), 2 * L: load_triposg_vae(tmp_path / "b" / "vae", 2 * L)}

    writes = {"weights": (safetensors.torch, "save_file"), "copytree": (triposg.shutil, "copytree")}
    module, name = writes[write]
    real, calls = getattr(module, name), []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dies)
    with pytest.raises(Killed):
        convert_triposg(tmp_path / "b", dst, num_latents=2 * L, compression=8)
    monkeypatch.setattr(module, name, real)
    with pytest.raises(CheckpointError, match="model_index.json missing"):
        MoCAPipeline.from_pretrained(dst)
    vae = load_vae_folder(dst / "vae")
    expected = vaes[vae.config.num_latents]
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), expected.state_dict().values()))
    convert_triposg(tmp_path / "b", dst, num_latents=2 * L, compression=8)
    pipe = MoCAPipeline.from_pretrained(dst)
    assert pipe.vae.config.num_latents == 2 * L
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), vaes[2 * L].state_dict().values()))


def test_finetune_moca_from_a_converted_triposg(tmp_path):
    """Object fine-tuning from a converted folder: DINOv2 stays frozen, the transformer trains, a pipeline comes out."""
    from moca3d.data.prepare import PrepareConfig, prepare, procedural_jobs
    from moca3d.geometry.inside import QueryConfig
    from moca3d.geometry.render import RenderConfig
    from moca3d.geometry.sampling import SurfaceSamplingConfig
    from moca3d.models.vae import VecSetVAE
    from moca3d.pipeline import MoCAPipeline
    from moca3d.training.train_dit import DiTTrainConfig, train
    from moca3d.training.train_vae import encode_dataset

    write_release(tmp_path / "src")
    pipe_dir = convert_triposg(tmp_path / "src", tmp_path / "pipe", num_latents=L, compression=4)
    data = tmp_path / "data"
    cfg = PrepareConfig(surface=SurfaceSamplingConfig(num_points=256), queries=QueryConfig(num_queries=64),
                        render=RenderConfig(size=48, supersample=1), val_fraction=0.0, test_fraction=0.0)
    prepare(procedural_jobs("objects", 3, seed=5), data, cfg, workers=1, progress=False)
    encode_dataset(data, VecSetVAE.from_pretrained(pipe_dir / "vae"), "converted", num_points=256, progress=False)
    recipe = DiTTrainConfig.from_dict(dict(init_from=str(pipe_dir), freeze_image_encoder=True, steps=2, batch_size=2,
                                           warmup_steps=1, checkpoint_every=2, log_every=1, lr=1e-3))
    result = train(data, tmp_path / "run", recipe, device="cpu", progress=False)
    before, after = MoCAPipeline.from_pretrained(pipe_dir), MoCAPipeline.from_pretrained(result["pipeline"])
    for (k, v), (_, w) in zip(before.image_encoder.state_dict().items(), after.image_encoder.state_dict().items()):
        assert torch.equal(v, w), f"frozen encoder weight {k} changed"
    changed = [k for (k, v), (_, w) in zip(before.transformer.state_dict().items(), after.transformer.state_dict().items()) if not torch.equal(v, w)]
    assert changed, "the transformer did not train"


def test_latent_length_stage_change_keeps_weights(tmp_path):
    """The L = 512 -> 1024 stage: overriding num_latents repeats the compressed queries, everything else loads."""
    from moca3d.training.train_dit import DiTTrainConfig, load_transformer

    write_release(tmp_path / "src")
    pipe_dir = convert_triposg(tmp_path / "src", tmp_path / "pipe", num_latents=L, compression=4)
    base = load_transformer(pipe_dir, DiTTrainConfig(), None)
    longer = load_transformer(pipe_dir, DiTTrainConfig(transformer={"num_latents": 2 * L}), (2 * L, base.config.in_channels))
    q0, q1 = base.packer.queries, longer.packer.queries
    assert q1.shape[0] == 2 * (q0.shape[0] - 1) + 1
    torch.testing.assert_close(q1[:-1:2], q0[:-1])
    torch.testing.assert_close(q1[-1], q0[-1])
    torch.testing.assert_close(longer.proj_in.weight, base.proj_in.weight)
    with pytest.raises(ConfigError, match=r"no longer loads: .* of another shape \(e.g. '"):  # one line naming a tensor
        load_transformer(pipe_dir, DiTTrainConfig(transformer={"width": 2 * base.config.width}), None)


# ----------------------------------------------------------------------------------------------
# Review: what a user converting a real release hits
# ----------------------------------------------------------------------------------------------


def poison(path, key, value=float("nan")):
    """Rewrite one safetensors file with `key`'s first element set to `value`."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    state[key].view(-1)[0] = value
    save_file(state, str(path))


@pytest.mark.parametrize("sub, key", [("transformer", "blocks.2.norm1.weight"), ("vae", "decoder.proj_out.weight"),
                                      ("image_encoder_dinov2", None)])
def test_non_finite_source_is_refused_before_anything_is_written(tmp_path, sub, key):
    """A NaN anywhere in the release stops the conversion naming file and tensor; no folder that later refuses to load."""
    write_release(tmp_path / "src")
    weights = next((tmp_path / "src" / sub).glob("*.safetensors"))
    if key is None:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            key = next(k for k in f.keys() if f.get_slice(k).get_dtype().startswith("F"))
    poison(weights, key)
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: tensor '{key}' contains NaN/Inf")):
        convert_triposg(tmp_path / "src", tmp_path / "dst", num_latents=L, compression=4)
    assert not (tmp_path / "dst").exists()


def test_release_without_dino_weights_is_refused(tmp_path):
    """An interrupted download of image_encoder_dinov2/ (config only) must not give a 'converted' folder that cannot load."""
    write_release(tmp_path / "src")
    for path in (tmp_path / "src" / "image_encoder_dinov2").glob("*.safetensors"):
        path.unlink()
    with pytest.raises(CheckpointError, match="image_encoder_dinov2: no .safetensors weights"):
        convert_triposg(tmp_path / "src", tmp_path / "dst", num_latents=L, compression=4)
    assert not (tmp_path / "dst").exists()


def test_half_precision_source_without_dtype_gives_one_dtype(tmp_path):
    """dtype=None keeps the source's dtype for every tensor, the fresh MoCA ones included: the model runs as loaded."""
    state = {k: v.half() for k, v in random_state(triposg_dit_description(), seed=1).items()}
    write_model(tmp_path / "transformer", state, triposg_config())
    model = load_triposg_transformer(tmp_path / "transformer", num_latents=L, compression=4)
    assert {p.dtype for p in model.state_dict().values()} == {torch.float16}
    vae_state = {k: v.bfloat16() for k, v in random_state(triposg_vae_description(), seed=2).items()}
    write_model(tmp_path / "vae", vae_state, VAE)
    assert {p.dtype for p in load_triposg_vae(tmp_path / "vae", L).state_dict().values()} == {torch.bfloat16}
    mixed = dict(state, **{"proj_in.weight": state["proj_in.weight"].float()})  # mixed source: float32 throughout
    write_model(tmp_path / "mixed", mixed, triposg_config())
    model = load_triposg_transformer(tmp_path / "mixed", num_latents=L, compression=4)
    assert {p.dtype for p in model.state_dict().values()} == {torch.float32}


def test_cast_that_overflows_float16_is_refused(tmp_path):
    state = random_state(triposg_dit_description(), seed=1)
    state["blocks.1.ff.net.2.weight"][0, 0] = 1e6  # finite in float32, inf in float16
    write_model(tmp_path / "transformer", state, triposg_config())
    with pytest.raises(CheckpointError, match="'blocks.1.ff.net.2.weight' overflows float16; convert to bf16 or fp32"):
        load_triposg_transformer(tmp_path / "transformer", num_latents=L, compression=4, dtype=torch.float16)
    model = load_triposg_transformer(tmp_path / "transformer", num_latents=L, compression=4, dtype=torch.bfloat16)
    assert torch.isfinite(model.blocks[1].ff.net[2].weight).all()


@pytest.mark.parametrize("dst", [".", "..", "../.."], ids=["dst-is-src", "src-is-dst-transformer", "src-inside-dst-vae"])
def test_destination_that_would_overwrite_the_source_is_refused(tmp_path, dst):
    """Converting into the release folder itself (or over it) would replace its transformer/ with MoCA weights."""
    root = {".": tmp_path / "src", "..": tmp_path / "out" / "transformer", "../..": tmp_path / "out" / "vae" / "TripoSG"}[dst]
    write_release(root)
    before = (root / "transformer" / "config.json").read_text()
    with pytest.raises(ConfigError, match="would overwrite SRC"):
        convert_triposg(root, root / dst, num_latents=L, compression=4)
    assert (root / "transformer" / "config.json").read_text() == before
    assert (root / "model_index.json").is_file()
    convert_triposg(root, root / "moca", num_latents=L, compression=4)  # a folder inside SRC is fine


def test_global_blocks_are_checked_before_reading_weights(tmp_path):
    """A typo in --global-blocks (or an index past the source's depth) fails before a 6 GB checkpoint is read."""
    from typer.testing import CliRunner

    from moca3d.cli import app

    write_model(tmp_path / "transformer", {"x": torch.zeros(1)}, triposg_config())  # weights that would fail to map
    for blocks, message in (("evn", "got 'evn'"), ([0, LAYERS], f"out of range for {LAYERS} layers")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_triposg_transformer(tmp_path / "transformer", num_latents=L, compression=4, global_blocks=blocks)
    res = CliRunner().invoke(app, ["convert", "triposg", str(tmp_path / "nowhere"), str(tmp_path / "dst"), "--global-blocks", "evn"])
    assert isinstance(res.exception, ConfigError) and "--global-blocks must be one of even, odd, all, none, got 'evn'" in str(res.exception)


def test_wrong_converter_names_the_right_verb(tmp_path):
    write_model(tmp_path / "transformer", random_state(triposg_dit_description(), seed=1), triposg_config())
    with pytest.raises(CheckpointError, match="this is a TripoSG transformer; use `moca3d convert triposg`"):
        load_partcrafter_transformer(tmp_path / "transformer", num_latents=L, compression=4)
    cfg = dict(partcrafter_config(), global_attn_block_id_range=[0, 2])
    del cfg["global_attn_block_ids"], cfg["enable_part_embedding"], cfg["_class_name"]
    write_model(tmp_path / "pc", random_state(triposg_dit_description(True), seed=1), cfg)
    with pytest.raises(CheckpointError, match="this is a PartCrafter transformer"):
        load_triposg_transformer(tmp_path / "pc", num_latents=L, compression=4)


def test_sharded_transformer_loads_like_one_file(tmp_path):
    """diffusers' sharded layout (*.safetensors.index.json + shards) gives the same model as the single file."""
    state = random_state(triposg_dit_description(), seed=1)
    write_model(tmp_path / "one", state, triposg_config())
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(triposg_config()))
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    one = load_triposg_transformer(tmp_path / "one", num_latents=L, compression=4).state_dict()
    sharded = load_triposg_transformer(folder, num_latents=L, compression=4).state_dict()
    assert one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)


def test_a_key_in_two_shards_is_refused(tmp_path):
    """A shard that repeats another's tensor would silently replace it: the key and both shards are named instead."""
    from moca3d.convert.common import read_safetensors_folder

    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"a.weight": torch.zeros(2), "b.weight": torch.zeros(3)}, str(tmp_path / first))
    save_file({"b.weight": torch.ones(3), "c.weight": torch.ones(1)}, str(tmp_path / second))
    index = {"weight_map": {"a.weight": first, "b.weight": second, "c.weight": second}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        read_safetensors_folder(tmp_path)
    assert str(info.value) == (f"{tmp_path}: key 'b.weight' is in two shards, {first} and {second}; "
                               "expected each tensor in one shard")
    save_file({"c.weight": torch.ones(1)}, str(tmp_path / second))  # each tensor once: read as one state dict
    assert sorted(read_safetensors_folder(tmp_path)) == ["a.weight", "b.weight", "c.weight"]
