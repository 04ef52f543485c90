"""VecSetVAE: shapes, determinism, save/load, chunked decoding, training loop, resume, latents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from moca3d.errors import ConfigError, InputError
from moca3d.geometry.sampling import farthest_point_indices
from moca3d.convert.triposg import convert_vae_state_dict
from moca3d.models.vae import VecSetVAE, canonical_token_order

TINY = dict(latent_channels=4, num_latents=16, num_attention_heads=2, width_encoder=32, width_decoder=32,
            num_layers_encoder=1, num_layers_decoder=1, embed_frequency=4)


def tiny_vae(seed: int = 0) -> VecSetVAE:
    torch.manual_seed(seed)
    return VecSetVAE(**TINY).eval()


def sphere_surface(n: int, radius: float = 0.5, center=(0.0, 0.0, 0.0), seed: int = 0) -> torch.Tensor:
    """(n, 6) points + outward normals on a sphere."""
    g = torch.Generator().manual_seed(seed)
    normals = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    return torch.cat([torch.tensor(center) + radius * normals, normals], dim=-1)


# ----------------------------------------------------------------------------------------------
# Synthetic dataset in the prepared layout (spheres and boxes with analytic SDFs)
# ----------------------------------------------------------------------------------------------


def _box_sdf_inside(p: np.ndarray, center: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Signed distance of a box, positive inside."""
    q = np.abs(p - center) - half
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)
    return -outside


def make_dataset(root: Path, num_assets: int = 6, points: int = 512, queries: int = 512, seed: int = 0) -> Path:
    """Write manifest.jsonl + assets/<id>/{mesh.glb, samples.npz}: each asset a sphere and a box."""
    from moca3d.geometry.mesh_io import save_glb

    rng = np.random.default_rng(seed)
    (root / "assets").mkdir(parents=True, exist_ok=True)
    lines = []
    for a in range(num_assets):
        asset_id = f"synth_{a:03d}"
        c_s = np.array([-0.4, 0.0, 0.0]) + rng.uniform(-0.1, 0.1, 3)
        r = rng.uniform(0.25, 0.4)
        c_b = np.array([0.45, 0.0, 0.0]) + rng.uniform(-0.1, 0.1, 3)
        half = rng.uniform(0.15, 0.35, 3)
        sphere = trimesh.creation.icosphere(subdivisions=3, radius=r)
        sphere.apply_translation(c_s)
        box = trimesh.creation.box(extents=2 * half)
        box.apply_translation(c_b)
        meshes, names = [sphere, box], ["sphere", "box"]
        surf, qp, qs = [], [], []
        sdfs = [lambda p: r - np.linalg.norm(p - c_s, axis=1), lambda p: _box_sdf_inside(p, c_b, half)]
        for mesh, sdf in zip(meshes, sdfs):
            xyz, face = trimesh.sample.sample_surface(mesh, points, seed=int(rng.integers(1 << 30)))
            surf.append(np.concatenate([xyz, mesh.face_normals[face]], axis=1))
            near = xyz[: queries // 2] + rng.normal(0, 0.02, (queries // 2, 3))
            far = rng.uniform(-1, 1, (queries - queries // 2, 3))
            p = np.concatenate([near, far])
            qp.append(p)
            qs.append(sdf(p))
        d = root / "assets" / asset_id
        d.mkdir(exist_ok=True)
        np.savez(d / "samples.npz", surface=np.stack(surf).astype(np.float32),
                 query_points=np.stack(qp).astype(np.float32), query_sdf=np.stack(qs).astype(np.float32))
        save_glb(d / "mesh.glb", meshes, names)
        split = "val" if a == num_assets - 1 else "train"
        lines.append(json.dumps({"id": asset_id, "split": split, "kind": "object", "category": "synthetic",
                                 "num_components": 2, "names": names}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def test_encode_decode_shapes():
    model = tiny_vae()
    surface = torch.stack([sphere_surface(128, seed=i) for i in range(3)])  # (3, 128, 6)
    posterior = model.encode(surface)
    assert posterior.mean.shape == (3, TINY["num_latents"], TINY["latent_channels"])
    assert posterior.logvar.shape == posterior.mean.shape
    assert posterior.kl().shape == (3,)
    tokens = model.decode_tokens(posterior.mode())
    assert tokens.shape == (3, TINY["num_latents"], TINY["width_decoder"])
    logits = model.query(tokens, torch.rand(3, 50, 3) * 2 - 1)
    assert logits.shape == (3, 50)
    logits2, post2 = model(surface, torch.rand(3, 7, 3), sample_posterior=False)
    assert logits2.shape == (3, 7) and torch.isfinite(logits2).all()
    # sampling: reproducible from its generator, exactly mean + std * (that generator's N(0, I) draw)
    with torch.no_grad():
        z1, z2 = posterior.sample(torch.Generator().manual_seed(4)), posterior.sample(torch.Generator().manual_seed(4))
        noise = ((z1 - posterior.mean) / posterior.std).flatten()
    assert torch.equal(z1, z2) and not torch.equal(z1, posterior.sample(torch.Generator().manual_seed(5)))
    torch.testing.assert_close(noise, torch.randn(noise.shape, generator=torch.Generator().manual_seed(4)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("include_pi", [False, True])
def test_fourier_embedding_is_triposg_channel_order(include_pi):
    """[x_d ; sin(f_k x_d) for d, k ; cos(f_k x_d) for d, k] with f_k = 2^k (times pi), d-major; exact to 1e-6."""
    from moca3d.models.vae import FourierEmbedder

    F_, x = 4, torch.tensor([[0.3, -0.7, 0.05]])
    emb = FourierEmbedder(F_, include_pi=include_pi)
    got = emb(x)[0]
    assert got.shape == (emb.out_dim,) == (3 * (2 * F_ + 1),)
    scale = math.pi if include_pi else 1.0
    angles = [2.0**k * scale * float(x[0, d]) for d in range(3) for k in range(F_)]
    expected = x[0].tolist() + [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


def test_kl_query_and_forward_match_their_definitions():
    model = tiny_vae()
    surface = torch.stack([sphere_surface(128, seed=i) for i in range(2)])  # (2, 128, 6)
    posterior = model.encode(surface)
    mu, logvar = posterior.mean, posterior.logvar
    expected = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).mean((1, 2))  # the mean over L*C entries, not the sum
    torch.testing.assert_close(posterior.kl(), expected, atol=1e-6, rtol=0)
    points = torch.rand(2, 40, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens = model.decode_tokens(posterior.mode())
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # queries are independent of each other: permuting them permutes the logits
        torch.testing.assert_close(model.query(tokens, points[:, perm]), model.query(tokens, points)[:, perm], atol=1e-6, rtol=0)
        logits, _ = model(surface, points, sample_posterior=False)
        torch.testing.assert_close(logits, model.query(tokens, points), atol=1e-6, rtol=0)


def test_bad_inputs_raise_one_line_errors():
    model = tiny_vae()
    with pytest.raises(InputError):
        model.encode(torch.zeros(2, 64, 3))
    with pytest.raises(InputError):
        model.query(torch.zeros(1, 16, 32), torch.zeros(1, 5, 2))
    with pytest.raises(ConfigError):
        VecSetVAE(**{**TINY, "width_encoder": 33})
    with pytest.raises(InputError):
        model.encode(torch.zeros(1, 8, 6))  # fewer points than latents


def test_decoding_is_deterministic_and_encoding_uses_fps():
    model = tiny_vae()
    surface = sphere_surface(256)[None]
    z1, z2 = model.encode(surface).mode(), model.encode(surface).mode()
    assert torch.equal(z1, z2)
    pts = torch.rand(1, 100, 3) * 2 - 1
    assert torch.equal(model.decode(z1, pts), model.decode(z1, pts))
    idx = farthest_point_indices(surface[..., :3], 16)
    assert idx.shape == (1, 16) and len(set(idx[0].tolist())) == 16 and idx[0, 0] == 0
    # The encoder's queries are the FPS points: shuffling every point but the first (FPS's start) changes nothing.
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(255, generator=torch.Generator().manual_seed(0))])
    torch.testing.assert_close(model.encode(surface[:, perm]).mode(), z1, atol=1e-5, rtol=0)


def naive_fps(xyz: np.ndarray, count: int, start: int = 0) -> list[int]:
    """Greedy farthest-point sampling straight from the definition."""
    chosen = [start]
    dist = np.linalg.norm(xyz - xyz[start], axis=1)
    for _ in range(count - 1):
        chosen.append(int(dist.argmax()))
        dist = np.minimum(dist, np.linalg.norm(xyz - xyz[chosen[-1]], axis=1))
    return chosen


def test_fps_backends_match_the_definition():
    xyz = torch.rand(2, 300, 3)
    torch_idx = farthest_point_indices(xyz, 12, backend="torch")
    fps_idx = farthest_point_indices(xyz, 12, backend="fpsample")
    for b in range(2):
        expected = naive_fps(xyz[b].double().numpy(), 12)
        assert torch_idx[b].tolist() == expected
        assert fps_idx[b].tolist() == expected


def test_chunked_decoding_equals_unchunked():
    """Chunking the query points changes nothing beyond float reassociation (atol 1e-6)."""
    model = tiny_vae()
    z = torch.randn(2, TINY["num_latents"], TINY["latent_channels"])
    pts = torch.rand(2, 1000, 3) * 2 - 1
    tokens = model.decode_tokens(z)
    full = model.query(tokens, pts)
    chunked = model.query(tokens, pts, chunk_size=128)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
    field = model.field(z[0], chunk_size=77)
    torch.testing.assert_close(field(pts[0]), full[0], rtol=0, atol=1e-6)


def test_save_load_round_trip_bit_exact(tmp_path):
    model = tiny_vae(seed=3)
    model.save_pretrained(tmp_path / "vae", safe_serialization=True)
    assert (tmp_path / "vae" / "config.json").is_file()
    assert list((tmp_path / "vae").glob("*.safetensors"))
    loaded = VecSetVAE.from_pretrained(str(tmp_path / "vae"), local_files_only=True).eval()
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}
    assert public(loaded.config) == public(model.config)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    surface = sphere_surface(128)[None]
    pts = torch.rand(1, 64, 3)
    assert torch.equal(model(surface, pts, sample_posterior=False)[0], loaded(surface, pts, sample_posterior=False)[0])


class Killed(Exception):
    """A save interrupted midway (as by a kill: nothing after the failing write runs)."""


@pytest.mark.parametrize("partial", [False, True], ids=["before-weights", "half-written-weights"])
def test_vae_folder_is_written_all_or_nothing(tmp_path, monkeypatch, partial):
    """train-vae's vae/ (and every VAE save_pretrained) is loaded on its own: a save killed after config.json, or while
    writing the weights, must leave the earlier VAE as it was or a folder without config.json (a one-line error),
    never one that loads one VAE's config with another's weights (diffusers writes config.json first, in place)."""
    import safetensors.torch

    from moca3d.training.train_vae import load_vae_folder

    real = safetensors.torch.save_file

    def killed(tensors, filename, metadata=None):
        if partial:
            real(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[:500])
        raise Killed

    earlier = tiny_vae(seed=1)
    earlier.save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "notes.txt").write_text("kept")  # the folder's other files are left alone
    later = tiny_vae(seed=2)
    later.register_to_config(scaling_factor=3.0, shift_factor=0.5)  # as train-vae's fitted latent scale
    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    for folder in (tmp_path / "vae", tmp_path / "first"):
        with pytest.raises(Killed):
            later.save_pretrained(folder)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    loaded = load_vae_folder(tmp_path / "vae")
    assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (1.0, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), earlier.state_dict().values()))
    with pytest.raises(InputError, match="config.json missing"):  # an interrupted first save
        load_vae_folder(tmp_path / "first")
    (tmp_path / "vae" / ".saving.stale").mkdir()  # as a killed save leaves its temporary folder
    later.save_pretrained(tmp_path / "vae")
    assert load_vae_folder(tmp_path / "vae").config.scaling_factor == 3.0
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "notes.txt"]


def test_triposg_naming_and_head_layout_conversion():
    """Names follow TripoSG; a per-head interleaved q|k|v layout converts to the same attention."""
    model = tiny_vae()
    keys = set(model.state_dict())
    for name in ["encoder.proj_in.weight", "encoder.blocks.0.attn2.norm_cross.weight", "encoder.blocks.1.attn1.to_q.weight",
                 "encoder.blocks.1.ff.net.0.proj.weight", "encoder.blocks.1.ff.net.2.weight", "encoder.norm_out.weight",
                 "quant.weight", "post_quant.weight", "decoder.blocks.0.attn1.to_out.0.weight",
                 "decoder.blocks.1.attn2.to_k.weight", "decoder.proj_query.weight", "decoder.proj_out.weight"]:
        assert name in keys, name
    # Build a "TripoSG" state dict: interleave each head's rows as [q_h; k_h; v_h] across the three matrices.
    heads, sd = TINY["num_attention_heads"], model.state_dict()
    tripo = dict(sd)
    prefixes = sorted({k.rsplit(".", 2)[0] for k in sd if k.endswith("to_k.weight")})
    assert "encoder.blocks.1.attn1" in prefixes and "decoder.blocks.1.attn2" in prefixes
    for prefix in prefixes:
        names = ["to_q", "to_k", "to_v"] if prefix.endswith("attn1") else ["to_k", "to_v"]
        mats = [sd[f"{prefix}.{n}.weight"] for n in names]
        D = mats[0].shape[0]
        per_head = torch.stack([m.view(heads, D // heads, -1) for m in mats], dim=1)  # (h, n, d, Din)
        fused = per_head.reshape(len(names) * D, -1)
        for i, n in enumerate(names):
            tripo[f"{prefix}.{n}.weight"] = fused[i * D:(i + 1) * D]
    tripo["decoder.proj_out.weight"] = -sd["decoder.proj_out.weight"]
    tripo["decoder.proj_out.bias"] = -sd["decoder.proj_out.bias"]
    back = convert_vae_state_dict(tripo, heads)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


# ----------------------------------------------------------------------------------------------
# Training, resume, latents, reconstruction
# ----------------------------------------------------------------------------------------------


def tiny_train_config(**overrides):
    from moca3d.training.train_vae import VAETrainConfig

    base = dict(model=TINY, steps=4, batch_size=2, num_surface_points=64, num_query_points=64, log_every=1,
                checkpoint_every=2, validate_every=1000, val_assets=1, val_resolution=16, val_coarse_resolution=8,
                metric_points=500, warmup_steps=2)
    base.update(overrides)
    return VAETrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), num_assets=3, points=128, queries=128)


def test_training_reduces_loss_on_a_fixed_batch(dataset):
    from moca3d.training.train_vae import load_split, make_batch, make_optimizer, vae_loss

    cfg = tiny_train_config(lr=3e-3)
    torch.manual_seed(0)
    model = VecSetVAE(**TINY)
    opt = make_optimizer(model, cfg)
    batch = make_batch(load_split(dataset, "train"), cfg, step=0)
    losses = []
    for _ in range(30):
        batch["generator"].manual_seed(0)
        loss, _ = vae_loss(model, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_resume_continues_from_the_same_step_with_identical_state(dataset, tmp_path):
    from safetensors.torch import load_file

    from moca3d.training.checkpoints import latest_checkpoint
    from moca3d.training.train_vae import train_vae

    cfg = tiny_train_config()
    train_vae(dataset, tmp_path / "straight", cfg, progress=False, validate_at_end=False)
    # Interrupted run: stop after 2 steps (the checkpoint at step 2), then resume to 4.
    train_vae(dataset, tmp_path / "resumed", tiny_train_config(steps=2), progress=False, validate_at_end=False)
    ckpt = latest_checkpoint(tmp_path / "resumed")
    assert ckpt.name == "step_00000002"
    with pytest.raises(ConfigError):
        train_vae(dataset, tmp_path / "resumed", cfg, progress=False)  # refuses to overwrite without --resume
    with (tmp_path / "resumed" / "log.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')  # logged after the checkpoint, then killed mid-line
    with pytest.raises(ConfigError, match=r"was started with another recipe \(lr "):
        train_vae(dataset, tmp_path / "resumed", tiny_train_config(lr=0.5), resume=True, progress=False)
    other = make_dataset(tmp_path / "other", num_assets=2, points=128, queries=128)
    with pytest.raises(ConfigError, match=r"resumed was trained on other data \(2 assets\) than .*other gives \(1 asset, other ids\)"
                                          r".* \(a new -o with --init-from .*resumed/vae, written when the run finishes"):  # how to start from its weights
        train_vae(other, tmp_path / "resumed", cfg, resume=True, progress=False)
    train_vae(dataset, tmp_path / "resumed", cfg, resume=True, progress=False, validate_at_end=False)
    steps = [[r["step"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]
             for run in ("resumed", "straight")]
    assert steps[0] == steps[1], "the resumed log holds each step once, as the uninterrupted one"
    a = latest_checkpoint(tmp_path / "straight")
    b = latest_checkpoint(tmp_path / "resumed")
    assert a.name == b.name == "step_00000004"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    state_a, state_b = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
    assert state_a["step"] == state_b["step"] == 4
    assert state_a["optimizer"] == state_b["optimizer"] and state_a["ema"] == state_b["ema"]
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    val = [r["val_query"] for r in log if "val_query" in r]
    assert len(val) == 1 and 0.0 <= val[0]["sign_acc"] <= 1.0 and 0.0 <= val[0]["iou"] <= 1.0
    assert (tmp_path / "straight" / "vae" / "config.json").is_file()
    # the exported VAE carries the latent statistics of its training parts: normalised latents are unit-scale
    from moca3d.training.train_vae import encode_latents, load_split

    final = VecSetVAE.from_pretrained(str(tmp_path / "straight" / "vae"))
    assert final.config.scaling_factor != 1.0 and final.config.shift_factor != 0.0
    z = final.normalize_latents(encode_latents(final.eval(), load_split(dataset, "train").surface, cfg.num_surface_points))
    assert abs(z.mean().item()) < 1e-4 and z.std().item() == pytest.approx(1.0, abs=1e-3)


def test_decoder_finetune_keeps_the_encoder_and_latent_scale(dataset, tmp_path):
    """--init-from + --freeze-encoder: encoder weights, cached latents and scaling factors unchanged; decoder trained."""
    from moca3d.training.train_vae import encode_latents, load_split, train_vae

    with pytest.raises(ConfigError, match="freeze_encoder needs init_from"):
        tiny_train_config(freeze_encoder=True).check()
    train_vae(dataset, tmp_path / "base", tiny_train_config(), progress=False, validate_at_end=False)
    base = VecSetVAE.from_pretrained(str(tmp_path / "base" / "vae"))
    cfg = tiny_train_config(model={}, init_from=str(tmp_path / "base" / "vae"), freeze_encoder=True, lr=3e-3)
    train_vae(dataset, tmp_path / "tuned", cfg, progress=False, validate_at_end=False)
    tuned = VecSetVAE.from_pretrained(str(tmp_path / "tuned" / "vae"))
    assert tuned.config.scaling_factor == base.config.scaling_factor and tuned.config.shift_factor == base.config.shift_factor
    before, after = base.state_dict(), tuned.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    surface = load_split(dataset, "train").surface
    torch.testing.assert_close(encode_latents(tuned.eval(), surface, 64), encode_latents(base.eval(), surface, 64), rtol=0, atol=0)
    from safetensors import safe_open

    from moca3d.training.checkpoints import latest_checkpoint

    with safe_open(str(latest_checkpoint(tmp_path / "tuned") / "model.safetensors"), "pt") as f:  # the frozen encoder is
        assert not any(k.startswith(("encoder.", "quant.")) for k in f.keys())  # init_from's: not stored again
    resumed = train_vae(dataset, tmp_path / "tuned", tiny_train_config(model={}, init_from=str(tmp_path / "base" / "vae"),
                        freeze_encoder=True, lr=3e-3, steps=6), resume=True, progress=False, validate_at_end=False)
    # a recipe's own model block beside init_from was dropped without a word: named now (the base's shape is kept)
    from moca3d.errors import InputWarning

    with pytest.warns(InputWarning, match=rf"the recipe's model settings num_latents 48 \(its: {TINY['num_latents']}\) are not used"):
        train_vae(dataset, tmp_path / "reshaped", tiny_train_config(model={**TINY, "num_latents": 48}, init_from=str(tmp_path / "base" / "vae"),
                  freeze_encoder=True, steps=1), progress=False, validate_at_end=False)
    assert resumed["steps"] == 6 and latest_checkpoint(tmp_path / "tuned").name == "step_00000006"
    again = VecSetVAE.from_pretrained(str(tmp_path / "tuned" / "vae")).state_dict()
    assert all(torch.equal(before[k], again[k]) for k in frozen)


def test_load_split_mixes_assets_prepared_with_different_counts(tmp_path):
    """An asset with fewer surface points / queries sets the count; the others keep matching (point, sdf) subsets."""
    from moca3d.data.dataset import load_samples, read_manifest
    from moca3d.training.train_vae import load_split

    root = make_dataset(tmp_path / "mixed", num_assets=3, points=128, queries=128)
    first = read_manifest(root)[0]["id"]
    full = {e["id"]: load_samples(root, e["id"]) for e in read_manifest(root)}
    small = {k: v[:, :64] if k != "surface" else v[:, :96] for k, v in full[first].items()}
    np.savez(root / "assets" / first / "samples.npz", **small)
    data = load_split(root, "train")
    assert data.surface.shape[1] == 96 and data.query_points.shape[1] == 64
    for row, (asset, comp) in enumerate(zip(data.asset_ids, data.component)):
        src = small if asset == first else full[asset]
        pairs = {tuple(np.round(np.append(p, d), 5)) for p, d in zip(src["query_points"][comp], src["query_sdf"][comp])}
        kept = np.concatenate([data.query_points[row].numpy(), data.query_sdf[row, :, None].numpy()], axis=1)
        assert all(tuple(np.round(k, 5)) in pairs for k in kept)  # subsets of the asset's own samples, still paired


def test_encode_dataset_writes_latents_and_resumes(dataset, tmp_path):
    from safetensors.torch import load_file

    from moca3d.training.checkpoints import read_metadata
    from moca3d.data.dataset import read_manifest
    from moca3d.training.train_vae import encode_dataset

    model = tiny_vae()
    counts = encode_dataset(dataset, model, "tiny", num_points=64, progress=False, overwrite=True)
    entries = read_manifest(dataset)
    assert counts == {"encoded": len(entries), "skipped": 0}
    path = dataset / "assets" / entries[0]["id"] / "latents.safetensors"
    z = load_file(str(path))["latents"]
    assert z.shape == (2, TINY["num_latents"], TINY["latent_channels"]) and z.dtype == torch.float32
    meta = read_metadata(path)
    assert meta["model"] == "tiny" and json.loads(meta["names"]) == ["sphere", "box"]
    assert encode_dataset(dataset, model, "tiny", num_points=64, progress=False) == {"encoded": 0, "skipped": len(entries)}
    # Another model's latents replaced the first one's silently (a run trained on them then refused to resume):
    # refused before anything is written, naming what differs; --overwrite replaces them
    with pytest.raises(InputError, match=rf"{len(entries)} of {len(entries)} assets hold latents made otherwise "
                                         r"\(\w+: model tiny \(now other\)\).*pass --overwrite"):
        encode_dataset(dataset, tiny_vae(seed=1), "other", num_points=64, progress=False)
    assert read_metadata(path)["model"] == "tiny"
    # another folder of the same encoder weights (a decoder-only fine-tune) makes the same latents: kept
    assert encode_dataset(dataset, model, "decoder-tuned", num_points=64, progress=False) == {"encoded": 0, "skipped": len(entries)}
    # train-default (`replace`): another VAE's latents are replaced and counted, its own ones skipped
    other = tiny_vae(seed=1)
    assert encode_dataset(dataset, other, "other-vae", num_points=64, progress=False, replace=True) == {
        "encoded": len(entries), "skipped": 0, "replaced": len(entries)}
    assert encode_dataset(dataset, other, "other-vae", num_points=64, progress=False, replace=True) == {
        "encoded": 0, "skipped": len(entries), "replaced": 0}
    assert encode_dataset(dataset, model, "other", num_points=64, progress=False, overwrite=True)["encoded"] == len(entries)
    # More points than prepared were used silently (as many as there were)
    with pytest.raises(InputError, match=r": 100000 surface points asked \(--points\), the data has \d+ per part"):
        encode_dataset(dataset, model, "more", num_points=100_000, progress=False, overwrite=True)
    # So does the same model at another latent count (a converted VAE's weights are the same at every --num-latents)
    longer = VecSetVAE(**{**TINY, "num_latents": 2 * TINY["num_latents"]}).eval()
    longer.load_state_dict(model.state_dict())
    with pytest.raises(InputError, match=rf": L {TINY['num_latents']} \(now {2 * TINY['num_latents']}\)\)"):
        encode_dataset(dataset, longer, "other", num_points=64, progress=False)
    assert encode_dataset(dataset, longer, "other", num_points=64, progress=False, overwrite=True)["encoded"] == len(entries)
    by_config = load_file(str(path))["latents"]
    assert by_config.shape[1] == 2 * TINY["num_latents"]
    # ... or asked for one (encode-dataset --num-latents): the same latents as the VAE configured for it
    assert encode_dataset(dataset, model, "other", num_points=64, progress=False, overwrite=True)["encoded"] == len(entries)
    assert encode_dataset(dataset, model, "other", num_points=64, progress=False, num_latents=2 * TINY["num_latents"],
                          overwrite=True) == {"encoded": len(entries), "skipped": 0}
    torch.testing.assert_close(load_file(str(path))["latents"], by_config, rtol=0, atol=0)


class SphereFieldVAE(VecSetVAE):
    """A real encoder with a known decoder field (a sphere of radius 0.3 in the canonical frame)."""

    def field(self, z, chunk_size=65536):
        return lambda p: 0.3 - p.norm(dim=-1)


def test_cli_reconstruct_writes_one_node_per_component_in_the_input_frame(dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import moca3d.commands.vae as vae_cmd
    from moca3d.cli import app
    from moca3d.geometry.mesh_io import load_file

    torch.manual_seed(0)
    model = SphereFieldVAE(**TINY).eval()
    model.save_pretrained(tmp_path / "vae", safe_serialization=True)
    real_load = vae_cmd.load_vae

    def load_sphere_vae(folder, device="cpu"):
        real_load(folder, device)  # the real checks: config.json, safetensors, finite weights
        return SphereFieldVAE.from_pretrained(str(folder), local_files_only=True).eval()

    monkeypatch.setattr(vae_cmd, "load_vae", load_sphere_vae)
    # The input is the dataset's canonical asset moved and scaled: the output must follow it back.
    meshes, names = load_file(dataset / "assets" / "synth_000" / "mesh.glb")
    moved = [m.copy().apply_scale(3.0).apply_translation([5.0, 0.0, 0.0]) for m in meshes]
    from moca3d.geometry.mesh_io import save_glb

    save_glb(tmp_path / "in.glb", moved, names)
    runner = CliRunner()
    result = runner.invoke(app, ["reconstruct", str(tmp_path / "in.glb"), "-o", str(tmp_path / "out.glb"), "--model",
                                 str(tmp_path / "vae"), "--resolution", "32", "--points", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out, out_names = load_file(tmp_path / "out.glb")
    assert sorted(out_names) == sorted(names) and all(m.is_watertight for m in out)
    # Canonical radius 0.3 maps back to 0.3 / scale around the input's box centre.
    lo = np.min([m.bounds[0] for m in moved], axis=0)
    hi = np.max([m.bounds[1] for m in moved], axis=0)
    scale = 2.0 / (hi - lo).max()
    for part in out:  # every part: a sphere of radius 0.3 / scale centred on the input's box (1% of the canonical frame)
        assert np.linalg.norm(part.vertices.mean(0) - (lo + hi) / 2) < 0.01 / scale
        radius = np.linalg.norm(part.vertices - (lo + hi) / 2, axis=1)
        assert abs(radius.mean() - 0.3 / scale) < 0.01 / scale and radius.std() < 0.01 / scale
    # A triangle budget for all parts: each sphere decimated to its share, still closed and the same sphere.
    budget = 60 * len(names)
    assert sum(len(m.faces) for m in out) > 2 * budget
    result = runner.invoke(app, ["reconstruct", str(tmp_path / "in.glb"), "-o", str(tmp_path / "light.glb"), "--model",
                                 str(tmp_path / "vae"), "--resolution", "32", "--points", "64", "--device", "cpu",
                                 "--faces", str(budget)])
    assert result.exit_code == 0, result.output
    light, _ = load_file(tmp_path / "light.glb")
    assert sum(len(m.faces) for m in light) <= budget and all(m.is_watertight for m in light)
    for part in light:
        radius = np.linalg.norm(part.vertices - (lo + hi) / 2, axis=1)
        assert abs(radius.mean() - 0.3 / scale) < 0.02 / scale
    few = runner.invoke(app, ["reconstruct", str(tmp_path / "in.glb"), "-o", str(tmp_path / "few.glb"), "--model",
                              str(tmp_path / "nowhere"), "--faces", "20"])  # refused before any model loads
    assert isinstance(few.exception, ConfigError) and f"--faces 20 is too few for {len(names)} components" in str(few.exception)
    bad = runner.invoke(app, ["reconstruct", str(tmp_path / "in.glb"), "-o", str(tmp_path / "out.ply"), "--model",
                              str(tmp_path / "vae")])
    assert isinstance(bad.exception, InputError) and "output must be a .glb or .obj file" in str(bad.exception)
    missing = runner.invoke(app, ["reconstruct", str(tmp_path / "in.glb"), "-o", str(tmp_path / "o.glb"), "--model",
                                  str(tmp_path / "nowhere")])
    assert isinstance(missing.exception, InputError)


@pytest.mark.parametrize("suffix", [".glb", ".obj"])
def test_cli_reconstruct_keeps_empty_components_in_place_and_records_how_it_was_made(tmp_path, monkeypatch, suffix):
    """The output left empty components out (the input's empty node, and a part decoded empty), warned about one of
    the two, and held no record: `moca3d info` said it was not written by moca3d."""
    from typer.testing import CliRunner

    import moca3d.training.train_vae as train_vae
    from moca3d.cli import app
    from moca3d.commands.info import describe
    from moca3d.evaluation import read_prediction
    from moca3d.geometry.mesh_io import save_glb

    SphereFieldVAE(**TINY).eval().save_pretrained(tmp_path / "vae", safe_serialization=True)
    monkeypatch.setattr("moca3d.commands.vae.load_vae",
                        lambda folder, device="cpu": SphereFieldVAE.from_pretrained(str(folder), local_files_only=True).eval())
    real = train_vae.reconstruct_components

    def decode_b_empty(parts, names, *args, **kwargs):  # the VAE loses part "b"
        meshes = real(parts, names, *args, **kwargs)
        return [trimesh.Trimesh() if name == "b" else mesh for mesh, name in zip(meshes, names)]

    monkeypatch.setattr(train_vae, "reconstruct_components", decode_b_empty)
    parts = [trimesh.creation.icosphere(radius=0.4).apply_translation([x, 0, 0]) for x in (-1.0, 0.0, 1.0)]
    save_glb(tmp_path / "in.glb", [parts[0], trimesh.Trimesh(), parts[1], parts[2]], ["a", "hole", "b", "c"],
             metadata={"verb": "generate"})  # a generation with an empty part
    out = tmp_path / f"out{suffix}"
    result = CliRunner().invoke(app, ["reconstruct", str(tmp_path / "in.glb"), "-o", str(out), "--model", str(tmp_path / "vae"),
                                      "--resolution", "32", "--points", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "warning: 2 of 4 components have no surface, kept as empty: hole (empty in the input), b" in result.output
    meshes, names = read_prediction(out)
    assert names == ["a", "hole", "b", "c"] and [len(m.faces) > 0 for m in meshes] == [True, False, False, True]
    settings = describe(out)["settings"]
    assert {k: settings[k] for k in ("verb", "model", "mesh", "components", "resolution", "points")} == {
        "verb": "reconstruct", "model": str(tmp_path / "vae"), "mesh": "in.glb", "components": 4, "resolution": 32, "points": 64}


def test_config_rejects_unknown_keys():
    from moca3d.training.train_vae import VAETrainConfig

    with pytest.raises(ConfigError):
        VAETrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError):
        VAETrainConfig.from_dict({"steps": 0})


def test_cli_bad_points_and_missing_data_are_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from moca3d.cli import app
    from moca3d.geometry.mesh_io import save_glb

    tiny_vae().save_pretrained(tmp_path / "vae", safe_serialization=True)
    save_glb(tmp_path / "in.glb", [trimesh.creation.box()], ["box"])
    runner = CliRunner()
    for points in ("0", "-1", "15"):  # fewer than the VAE's 16 latent tokens
        result = runner.invoke(app, ["reconstruct", str(tmp_path / "in.glb"), "-o", str(tmp_path / "out.glb"), "--model",
                                     str(tmp_path / "vae"), "--points", points, "--device", "cpu"])
        assert isinstance(result.exception, ConfigError), result.output
        assert f"--points must be at least the VAE's 16 latent tokens, got {points}" in str(result.exception)
    assert not (tmp_path / "out.glb").exists()
    # a missing dataset is reported before the run folder is created
    result = runner.invoke(app, ["train-vae", str(tmp_path / "nothere"), "-o", str(tmp_path / "run"), "--device", "cpu"])
    assert isinstance(result.exception, InputError) and "no manifest.jsonl" in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_cli_vae_verbs_check_their_options_first(tmp_path, monkeypatch):
    """Bad options stop with one line naming the option before any model or data is read. They used to surface as a
    bare ValueError (encode-dataset --batch-size 0), a message about an option the verb lacks (reconstruct --resolution 96:
    'coarse_resolution 32'), a misleading hint (cache-latents --max-parts 0: 'run encode-dataset'), an odd error after
    the whole reconstruction (an output under a file), or nothing (train-vae --threads -3)."""
    from typer.testing import CliRunner

    from moca3d.cli import app
    from moca3d.defaults import RESOLUTION_RULE
    from moca3d.geometry.mesh_io import save_glb

    tiny_vae().save_pretrained(tmp_path / "vae")
    save_glb(tmp_path / "in.glb", [trimesh.creation.box()], ["box"])
    data, vae, mesh = str(tmp_path / "nothere"), str(tmp_path / "vae"), str(tmp_path / "in.glb")
    cases = [
        (["encode-dataset", data, "--model", vae, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["encode-dataset", data, "--model", vae, "--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
        (["reconstruct", mesh, "-o", str(tmp_path / "o.glb"), "--model", vae, "--resolution", "17"],
         f"--resolution must be {RESOLUTION_RULE}, got 17"),
        (["eval-vae", data, "--model", vae, "--resolution", "48"], f"--resolution must be {RESOLUTION_RULE}, got 48"),
        (["reconstruct", mesh, "-o", f"{mesh}/o.glb", "--model", vae], f"{mesh} is a file, not a folder"),
        (["cache-latents", data, "-o", str(tmp_path / "c.safetensors"), "--max-parts", "0"], "--max-parts must be >= 1, got 0"),
        (["cache-latents", data, "-o", str(tmp_path)], "is a folder: give a file path"),
        (["train-vae", data, "-o", str(tmp_path / "run"), "--threads", "-3"], "--threads must be >= 0 (0: torch's default), got -3"),
    ]
    runner = CliRunner()
    for args, message in cases:
        result = runner.invoke(app, args + (["--device", "cpu"] if args[0] != "cache-latents" else []))
        assert isinstance(result.exception, ConfigError) and message in str(result.exception), (args, result.exception)
    # every resolution of the rule reconstructs: a dense first grid of 32 cells where it allows, then doublings
    grids = {}

    def reconstruct(parts, names, model, points, extract, **kwargs):
        grids[extract.resolution] = extract.coarse_resolution
        return [trimesh.creation.box() for _ in parts]

    monkeypatch.setattr("moca3d.training.train_vae.reconstruct_components", reconstruct)
    for resolution in (16, 32, 64, 96, 256):
        result = runner.invoke(app, ["reconstruct", mesh, "-o", str(tmp_path / "o.glb"), "--model", vae, "--resolution",
                                     str(resolution), "--points", "64", "--device", "cpu"])
        assert result.exit_code == 0, result.output
    assert grids == {16: 16, 32: 32, 64: 32, 96: 48, 256: 64}


def test_posterior_starts_nearly_deterministic():
    """A std ~1 posterior at init drowns the small means and the decoder learns to ignore z (collapse)."""
    model = tiny_vae()
    posterior = model.encode(sphere_surface(128)[None])
    assert posterior.std.max() < 0.05
    assert posterior.mean.abs().mean() > 5 * posterior.std.mean()


def test_cli_eval_vae_reports_fscores(dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import moca3d.commands.vae as vae_cmd
    from moca3d.cli import app

    torch.manual_seed(0)
    SphereFieldVAE(**TINY).save_pretrained(tmp_path / "vae", safe_serialization=True)
    monkeypatch.setattr(vae_cmd, "load_vae", lambda folder, device="cpu": SphereFieldVAE.from_pretrained(
        str(folder), local_files_only=True).eval())
    result = CliRunner().invoke(app, ["eval-vae", str(dataset), "--model", str(tmp_path / "vae"), "--assets", "1",
                                      "--resolution", "32", "--points", "64", "--device", "cpu",
                                      "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_assets"] == 1 and metrics["num_parts"] == 2
    for key in ("asset_fscore@0.05", "asset_fscore@0.1", "part_fscore@0.05", "part_normalized_fscore@0.1"):
        assert 0.0 <= metrics[key] <= 1.0
    # Both parts decode to a radius-0.3 sphere at the origin, which only partly matches either part.
    assert 0.0 < metrics["part_fscore@0.1"] < 0.9
    (asset,) = metrics["assets"]  # each asset's scores; their mean is the asset mean
    assert asset["num_parts"] == 2 and asset["fscore@0.1"] == pytest.approx(metrics["asset_fscore@0.1"])
    assert not any(line.startswith("assets:") for line in result.output.splitlines())
    settings = metrics["settings"]  # the metric points (not the encoder's --points) and the frames, named
    assert settings["points"] == 64 and settings["metric_points"] == settings["protocol"]["num_points"] > 64
    assert "parts_normalized" in settings["protocol"]["frame"] and "not squared" in settings["protocol"]["chamfer"]
    printed = CliRunner().invoke(app, ["eval-vae", str(dataset), "--model", str(tmp_path / "vae"), "--assets", "1",
                                       "--resolution", "32", "--points", "64", "--device", "cpu", "--json", "-"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout) == metrics  # the JSON alone, nothing else on stdout


def test_builtin_defaults_equal_the_small_recipe():
    """`moca3d train-vae` without --config trains what configs/vae_small.json says (threads aside)."""
    from moca3d.training.train_vae import VAETrainConfig

    recipe = VAETrainConfig.from_json(Path(__file__).parents[1] / "configs" / "vae_small.json").to_dict()
    builtin = VAETrainConfig().to_dict()
    recipe_model, builtin_model = recipe.pop("model"), builtin.pop("model")
    recipe.pop("num_threads"), builtin.pop("num_threads")
    assert recipe == builtin
    full = VecSetVAE(**builtin_model).config
    assert all(full[k] == v for k, v in recipe_model.items())


def test_inside_weight_scales_only_the_inside_sign_terms(dataset):
    """BCE with inside_weight w: all-outside batches are unchanged, all-inside ones scale by w exactly."""
    from moca3d.training.train_vae import load_split, make_batch, vae_loss

    model = tiny_vae()
    batch = make_batch(load_split(dataset, "train"), tiny_train_config(), step=0)
    for sign, expected_ratio in ((-1.0, 1.0), (1.0, 3.0)):
        batch["sdf"] = sign * batch["sdf"].abs().clamp(min=1e-3)
        stats = []
        for weight in (1.0, 3.0):
            batch["generator"].manual_seed(0)
            stats.append(vae_loss(model, batch, tiny_train_config(inside_weight=weight))[1]["sign"])
        assert stats[1] == pytest.approx(expected_ratio * stats[0], rel=1e-5)
    with pytest.raises(ConfigError):
        tiny_train_config(inside_weight=0.0)


def test_vae_loss_terms_equal_their_formulas(dataset):
    """With the decoder's logits fixed, each term is its per-query formula: mean |l - clamp(sdf / trunc, -1, 1)|,
    mean of BCE(sharpness * l, sdf > 0) with inside queries weighted, and the posterior's KL; rel 1e-5."""
    from moca3d.training.train_vae import load_split, make_batch, vae_loss

    model = tiny_vae()
    cfg = tiny_train_config(inside_weight=2.0, sign_weight=0.5, sign_sharpness=10.0, kl_weight=0.01)
    batch = make_batch(load_split(dataset, "train"), cfg, step=0)
    sdf = batch["sdf"].double()
    logits = torch.randn(sdf.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.7
    model.query = lambda tokens, points: logits.to(tokens.dtype)
    batch["generator"].manual_seed(0)
    loss, stats = vae_loss(model, batch, cfg)
    trunc = model.config.truncation
    l1, bce, n = 0.0, 0.0, logits.numel()
    for l, d in zip(logits.flatten().tolist(), sdf.flatten().tolist()):
        l1 += abs(l - max(-1.0, min(1.0, d / trunc)))
        x, inside = 10.0 * l, d > 0
        bce += 2.0 * math.log1p(math.exp(-x)) if inside else math.log1p(math.exp(x))  # -log sigmoid(x) / -log(1 - sigmoid(x))
    assert (sdf > 0).any() and (sdf < 0).any()  # both sign branches are exercised
    assert stats["sdf"] == pytest.approx(l1 / n, rel=1e-5)
    assert stats["sign"] == pytest.approx(bce / n, rel=1e-5)
    batch["generator"].manual_seed(0)  # the same FPS start as inside vae_loss
    qidx = farthest_point_indices(batch["surface"][..., :3], model.config.num_latents, random_start=True, generator=batch["generator"])
    with torch.no_grad():
        kl = float(model.encode(batch["surface"], query_indices=qidx).kl().mean())
    assert stats["kl"] == pytest.approx(kl, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(l1 / n + 0.5 * bce / n + 0.01 * kl, rel=1e-5)


def test_free_space_queries_are_exactly_labelled_outside():
    """Kept free-space points lie outside the part, at least one truncation from its surface; near ones are masked."""
    from moca3d.geometry.inside import signed_distance
    from moca3d.training.train_vae import free_space_queries

    parts = [trimesh.creation.box((0.4, 0.2, 0.6)), trimesh.creation.icosphere(2, 0.3)]
    parts[1].apply_translation((0.5, -0.4, 0.1))
    surface = torch.stack([torch.from_numpy(np.asarray(m.sample(2000, seed=k), dtype=np.float32)) for k, m in enumerate(parts)])
    surface = torch.cat([surface, torch.zeros_like(surface)], -1)  # (2, P, 6): normals unused
    g = torch.Generator().manual_seed(0)
    points, sdf, weight = free_space_queries(surface, 4000, 1.05, 0.1, 0.02, g)
    assert points.shape == (2, 4000, 3) and sdf.shape == weight.shape == (2, 4000)
    assert points.abs().max() <= 1.05 and set(weight.unique().tolist()) <= {0.0, 1.0}
    for k, mesh in enumerate(parts):
        kept = weight[k] > 0
        assert 0.5 < kept.float().mean() < 1.0  # most of the domain is far from a small part, not all of it
        true = torch.from_numpy(signed_distance(mesh, points[k][kept].numpy())).float()  # exact, > 0 inside
        assert (true < 0).all() and (-true >= 0.1 - 1e-5).all()  # outside, beyond the truncation
        assert (sdf[k][kept] >= true + 1e-5).all() and (sdf[k][kept] <= -0.1).all()  # a bound on |sdf| whose clamp is exact
        lo, hi = torch.tensor(mesh.bounds, dtype=torch.float32) + torch.tensor([[-0.02], [0.02]])  # the true box, padded
        to_box = torch.maximum(lo - points[k][~kept], points[k][~kept] - hi).clamp(min=0).norm(dim=-1)
        assert (to_box < 0.1).all()  # masked points are the near ones (the sampled box lies inside the true one)


def test_free_space_queries_extend_the_loss_and_off_changes_nothing(dataset):
    """free_space_queries = 0 replays the old batches exactly; > 0 adds outside queries, all masked = the old loss."""
    from moca3d.training.train_vae import load_split, make_batch, vae_loss

    data = load_split(dataset, "train")
    plain, extra = make_batch(data, tiny_train_config(), 0), make_batch(data, tiny_train_config(free_space_queries=32), 0)
    assert "free" not in plain
    for k in ("points", "sdf", "surface"):
        assert torch.equal(plain[k], extra[k])
    fp, fs, fw = extra["free"]
    assert fp.shape == (2, 32, 3) and (fs <= -0.1).all()
    model = tiny_vae()
    losses = []
    for batch in (plain, extra):
        batch["generator"].manual_seed(0)
        losses.append(vae_loss(model, batch, tiny_train_config(free_space_queries=32))[0].item())
    assert losses[1] != pytest.approx(losses[0], rel=1e-5)
    extra["free"] = (fp, fs, torch.zeros_like(fw))  # every free-space query masked: the plain loss again
    extra["generator"].manual_seed(0)
    assert vae_loss(model, extra, tiny_train_config(free_space_queries=32))[0].item() == pytest.approx(losses[0], rel=1e-5)
    with pytest.raises(ConfigError, match="free-space"):
        tiny_train_config(free_space_queries=-1)


def test_free_space_mining_keeps_the_candidates_decoded_most_inside():
    """hardest_free_space returns, per component, the top-`count` decoded logits among the unmasked candidates."""
    from moca3d.training.train_vae import hardest_free_space

    model = tiny_vae()
    z = torch.randn(3, TINY["num_latents"], TINY["latent_channels"])
    points = torch.rand(3, 50, 3) * 2 - 1
    sdf, weight = -0.1 - torch.rand(3, 50), (torch.rand(3, 50) > 0.3).float()
    kp, ks, kw = hardest_free_space(model, model.decode_tokens(z), (points, sdf, weight), 8)
    assert kp.shape == (3, 8, 3) and ks.shape == kw.shape == (3, 8) and (kw == 1).all()
    with torch.no_grad():
        logits = model.decode(z, points)  # (3, 50)
    for b in range(3):
        valid = logits[b][weight[b] == 1]
        expected = valid.topk(8).values
        with torch.no_grad():
            got = model.decode(z[b:b + 1], kp[b:b + 1])[0]
        torch.testing.assert_close(got.sort(descending=True).values, expected, rtol=1e-5, atol=1e-5)
        for p, s_ in zip(kp[b], ks[b]):  # each kept point keeps its own label
            i = (points[b] == p).all(-1).nonzero()[0, 0]
            assert s_ == sdf[b, i]
    assert hardest_free_space(model, model.decode_tokens(z), (points, sdf, weight), 50)[0] is points  # no mining without spare candidates


def test_latent_normalization_round_trip_and_fit(tmp_path):
    """fit_latent_statistics makes the normalised latents zero-mean, unit-std; the factors survive save/load."""
    model = tiny_vae()
    z = 3.0 * torch.randn(10, 16, 4) - 1.5
    assert torch.equal(model.normalize_latents(z), z)  # defaults: identity
    shift, scale = model.fit_latent_statistics(z)
    n = model.normalize_latents(z)
    assert abs(n.mean().item()) < 1e-5 and n.std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(model.denormalize_latents(n), z, atol=1e-5)
    model.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = VecSetVAE.from_pretrained(str(tmp_path / "vae"))
    assert (loaded.config.shift_factor, loaded.config.scaling_factor) == (shift, scale)
    with pytest.raises(ConfigError):
        VecSetVAE(**TINY, scaling_factor=0.0)


def test_pipeline_decodes_the_denormalised_latents(monkeypatch):
    """The transformer samples normalised latents; the pipeline hands the VAE field the raw VAE latents."""
    from moca3d.pipeline import MoCAPipeline
    from moca3d.training.train_dit import DiTTrainConfig, build_models

    vae = tiny_vae()
    raw = 3.0 * torch.randn(2, TINY["num_latents"], TINY["latent_channels"]) + 1.0  # (N, L, C)
    vae.fit_latent_statistics(raw)
    cfg = DiTTrainConfig.from_dict(dict(transformer=dict(width=32, num_layers=2, num_heads=4, compression=4),
                                        image_encoder=dict(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4)))
    models = build_models(cfg, (TINY["num_latents"], TINY["latent_channels"]))
    pipe = MoCAPipeline(vae, models.transformer, models.image_encoder)
    received = []
    field = vae.field
    monkeypatch.setattr(vae, "field", lambda z, **kw: received.append(z.clone()) or field(z, **kw))
    meshes = pipe.decode_latents(vae.normalize_latents(raw), resolution=16)
    assert len(meshes) == 2
    assert torch.allclose(torch.cat(received), raw, atol=1e-5)


def test_packaged_reconstruction_vae_shares_the_builtin_encoder():
    """weights/vae (free-space decoder) encodes exactly as the built-in pipeline's VAE; only the decoder differs."""
    from moca3d.commands.vae import PACKAGED_VAE
    from moca3d.pipeline import DEFAULT_MODEL_DIR

    packaged, builtin = (VecSetVAE.from_pretrained(str(folder)) for folder in (PACKAGED_VAE, DEFAULT_MODEL_DIR / "vae"))
    assert packaged.config.scaling_factor == builtin.config.scaling_factor
    assert packaged.config.shift_factor == builtin.config.shift_factor
    a, b = packaged.state_dict(), builtin.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith(("decoder.", "post_quant.")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))


# ----------------------------------------------------------------------------------------------
# Canonical token order
# ----------------------------------------------------------------------------------------------


def test_canonical_order_is_a_permutation_that_ignores_input_order_and_box():
    """The order depends on the point set alone, in its own box: the same points, shuffled, moved and
    stretched per axis, give the same token sequence."""
    g = torch.Generator().manual_seed(0)
    xyz = torch.rand(3, 32, 3, generator=g) * torch.tensor([1.0, 0.1, 0.5])  # a flat set among them
    order = canonical_token_order(xyz)
    assert torch.equal(order.sort(dim=1).values, torch.arange(32).expand(3, 32))
    shuffle = torch.randperm(32, generator=g)
    moved = xyz[:, shuffle] * torch.tensor([2.0, 3.0, 0.5]) + torch.tensor([0.3, -0.7, 0.1])
    tokens = torch.gather(xyz, 1, order[..., None].expand(-1, -1, 3))
    again = torch.gather(xyz[:, shuffle], 1, canonical_token_order(moved)[..., None].expand(-1, -1, 3))
    torch.testing.assert_close(again, tokens, atol=0, rtol=0)


def test_canonical_token_order_permutes_the_fps_latents():
    """Reordering queries permutes the encoder's tokens and leaves the decoded field unchanged (tolerance 1e-5)."""
    model = tiny_vae()
    surface = torch.stack([sphere_surface(256, seed=i) for i in range(2)])
    fps = model.encode(surface).mode()  # (2, L, C)
    canonical = model.encode(surface, token_order="canonical").mode()
    L = fps.shape[1]
    match = torch.cdist(canonical, fps).argmin(dim=-1)  # each canonical token's FPS twin
    assert all(sorted(row.tolist()) == list(range(L)) for row in match)
    torch.testing.assert_close(canonical, torch.gather(fps, 1, match[..., None].expand_as(fps)), atol=1e-5, rtol=0)
    assert not torch.equal(canonical, fps)
    pts = torch.rand(2, 50, 3) * 2 - 1
    torch.testing.assert_close(model.decode(canonical, pts), model.decode(fps, pts), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="token_order"):
        model.encode(surface, token_order="sorted")


def test_encode_dataset_records_the_token_order(dataset, tmp_path):
    import shutil

    from moca3d.data.dataset import load_cached_latents
    from moca3d.data.dataset import read_manifest
    from moca3d.training.train_vae import encode_dataset, encoder_id

    dataset = Path(shutil.copytree(dataset, tmp_path / "data"))  # the module's dataset keeps its FPS latents
    model = tiny_vae()
    entries = read_manifest(dataset)
    encode_dataset(dataset, model, "tiny", num_points=64, progress=False, overwrite=True)
    path = dataset / "assets" / entries[0]["id"] / "latents.safetensors"
    fps, made = load_cached_latents(path)
    assert made == {"token_order": "fps", "encoder": encoder_id(model)}
    # same model and points, another order: not skipped; replaced with --overwrite
    with pytest.raises(InputError, match=r"order fps \(now canonical\)"):
        encode_dataset(dataset, model, "tiny", num_points=64, progress=False, token_order="canonical")
    counts = encode_dataset(dataset, model, "tiny", num_points=64, progress=False, token_order="canonical", overwrite=True)
    assert counts == {"encoded": len(entries), "skipped": 0}
    canonical, made = load_cached_latents(path)
    assert made["token_order"] == "canonical" and not torch.equal(canonical, fps)
    torch.testing.assert_close(canonical.sort(dim=1).values, fps.sort(dim=1).values, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="token_order"):
        encode_dataset(dataset, model, "tiny", num_points=64, progress=False, token_order="morton")


def test_training_with_more_surface_points_than_prepared_exports(dataset, tmp_path):
    """A recipe asking more surface points than prepared trains on what there is and still writes vae/ (a check on
    --points once refused it after the last step, at the latent scale fit)."""
    from moca3d.training.train_vae import train_vae

    train_vae(dataset, tmp_path / "run", tiny_train_config(steps=2, num_surface_points=1024), progress=False)
    assert (tmp_path / "run" / "vae" / "config.json").is_file()


def test_sigterm_checkpoints_the_vae_step_and_resume_goes_on(dataset, tmp_path, monkeypatch):
    """train-vae died on SIGTERM with nothing saved since its last checkpoint; now the step is checkpointed."""
    import signal

    import moca3d.training.train_vae as train_vae_module
    from moca3d.training.checkpoints import latest_checkpoint
    from moca3d.training.stop import TrainingStopped

    from conftest import preempt_on_call

    calls = []
    monkeypatch.setattr(train_vae_module, "make_batch", preempt_on_call(train_vae_module.make_batch, 2, calls))  # in step 2
    cfg = tiny_train_config(steps=4, checkpoint_every=100)
    with pytest.raises(TrainingStopped, match=r"stopped at step 2 of 4 \(SIGTERM\): checkpoint saved"):
        train_vae_module.train_vae(dataset, tmp_path / "run", cfg, progress=False, validate_at_end=False)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    summary = train_vae_module.train_vae(dataset, tmp_path / "run", cfg, resume=True, progress=False, validate_at_end=False)
    assert summary["trained_steps"] == 2 and len(calls) == 4


def test_train_vae_no_validate_skips_the_final_reconstruction(dataset, tmp_path, monkeypatch):
    """A trial run of a few seconds spent minutes reconstructing its val assets, and nothing on the CLI skipped it."""
    import json as json_module

    from typer.testing import CliRunner

    import moca3d.training.train_vae as train_vae_module
    from moca3d.cli import app

    def no_validation(*args, **kwargs):
        raise AssertionError("validated")

    monkeypatch.setattr(train_vae_module, "validate", no_validation)
    (tmp_path / "recipe.json").write_text(json_module.dumps(tiny_train_config(steps=2).to_dict()))
    result = CliRunner().invoke(app, ["train-vae", str(dataset), "-o", str(tmp_path / "run"), "--config",
                                      str(tmp_path / "recipe.json"), "--no-validate", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output and "  val " not in result.output  # the final reconstruction's lines
    assert "train-vae:" not in result.stderr  # no progress line in 2 quick steps
    assert (tmp_path / "run" / "vae" / "config.json").is_file()


def test_train_vae_refuses_a_live_run_before_touching_its_files(dataset, tmp_path):
    """A second train-vae in a folder another live process trains loaded its checkpoint and cut the live run's log
    back to that checkpoint (steps lost from log.jsonl) before refusing; now it refuses first, as train does."""
    import socket
    import subprocess
    import sys

    from moca3d.training.checkpoints import RUN_LOCK
    from moca3d.training.train_vae import train_vae

    run = tmp_path / "run"
    train_vae(dataset, run, tiny_train_config(steps=2), device="cpu", progress=False, validate_at_end=False)
    with open(run / "log.jsonl", "a") as log:  # the live job's steps after its newest checkpoint
        log.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    before = (run / "log.jsonl").read_bytes()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / RUN_LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
        with pytest.raises(ConfigError, match=f"being trained by process {other.pid} on this machine"):
            train_vae(dataset, run, tiny_train_config(steps=4), resume=True, device="cpu", progress=False)
    finally:
        other.kill()
        other.wait()
    assert (run / "log.jsonl").read_bytes() == before


def test_training_without_a_val_split_says_it_validates_nothing(dataset, tmp_path):
    """train-vae on a dataset without val assets skipped validation without a word (no val loss, no reconstruction
    scores in the log); one warning now names the way to get one. With a val asset: no warning."""
    import shutil
    import warnings

    from moca3d.errors import InputWarning
    from moca3d.training.train_vae import train_vae

    for splits in (["train", "train", "train"], ["train", "train", "val"]):
        data = Path(shutil.copytree(dataset, tmp_path / "-".join(splits)))
        lines = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
        (data / "manifest.jsonl").write_text("".join(json.dumps({**r, "split": s}) + "\n" for r, s in zip(lines, splits)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_vae(data, tmp_path / f"run-{splits[-1]}", tiny_train_config(steps=1, warmup_steps=0), progress=False,
                      validate_at_end=False)
        said = [str(w.message) for w in caught if issubclass(w.category, InputWarning)]
        expected = [f"{data} has no val split: the run logs no validation"] if splits[-1] == "train" else []
        assert [m[:len(e)] for m, e in zip(said, expected)] == expected and len(said) == len(expected), said
