"""MoCATransformer and rectified flow: shapes, padding, equivariance, CFG, overfitting, save/load.

Tolerances: fp32 CPU; outputs agree to 1e-5 absolute unless stated.
"""

import pytest
import torch

from moca3d import flow
from moca3d.errors import ConfigError, InputError
from moca3d.models.transformer import MoCATransformer

ATOL = 1e-5
TINY = dict(in_channels=8, num_latents=32, width=64, num_layers=4, num_heads=4, cond_dim=24, compression=8)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = MoCATransformer(**{**TINY, **kw}).eval()
    torch.nn.init.normal_(m.proj_out.weight, std=0.1)  # the zero init would make every output 0
    return m


def inputs(B=2, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, 32, 8, generator=g), torch.rand(B, generator=g), torch.randn(B, 6, 24, generator=g)


@pytest.mark.parametrize("mode", ["moc", "dense", "none"])
@pytest.mark.parametrize("timestep_mode", ["add", "token"])
def test_shapes_and_padding(mode, timestep_mode):
    m = tiny_model(attention_mode=mode, timestep_mode=timestep_mode)
    x, t, c = inputs(B=2, N=6)
    ids = m.sample_ids(2, 6, torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 3:] = False
    with torch.no_grad():
        y = m(x, t, c, component_mask=mask, ids=ids)
        assert y.shape == x.shape
        assert torch.all(y[0, 3:] == 0)
        alone = m(x[:1, :3], t[:1], c[:1], ids=ids[:1, :3])
        garbage = x.clone()
        garbage[0, 3:] = 100 * torch.randn_like(garbage[0, 3:])
        y2 = m(garbage, t, c, component_mask=mask, ids=ids)
    torch.testing.assert_close(y[0, :3], alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(y2[0, :3], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"long_skips": True, "num_layers": 5}, {"attention_mode": "dense"}, {"timestep_mode": "token"},
                                {"gate": "value", "router": "softmax"}, {"multihead_routing": False, "unselected": "drop"}])
def test_permutation_equivariance_given_ids(kw):
    m = tiny_model(**kw)
    x, t, c = inputs(N=7)
    ids = m.sample_ids(2, 7, torch.Generator().manual_seed(2))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = m(x, t, c, ids=ids)
        y_perm = m(x[:, perm], t, c, ids=ids[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm], atol=ATOL, rtol=0)


def test_per_component_condition_for_scenes():
    m = tiny_model()
    x, t, c = inputs(N=4)
    per = c[:, None].expand(2, 4, 6, 24).contiguous()
    ids = m.sample_ids(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, per, ids=ids), m(x, t, c, ids=ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["moc", "dense"])
def test_distinct_per_component_conditions_stay_with_their_components(mode):
    m = tiny_model(attention_mode=mode)
    x, t, _ = inputs(N=4)
    per = torch.randn(2, 4, 6, 24, generator=torch.Generator().manual_seed(3))  # (B, N, M, D): one condition each
    ids = m.sample_ids(2, 4, torch.Generator().manual_seed(1))
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        y = m(x, t, per, ids=ids)
        torch.testing.assert_close(m(x[:, perm], t, per[:, perm], ids=ids[:, perm]), y[:, perm], atol=ATOL, rtol=0)
        other = per.clone()
        other[:, 1] = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(4))
        assert (m(x, t, other, ids=ids)[:, 1] - y[:, 1]).abs().max() > 1e-3  # component 1 reads its own condition


def test_without_global_attention_a_component_sees_only_its_own_condition():
    m = tiny_model(attention_mode="none")
    x, t, _ = inputs(N=4)
    per = torch.randn(2, 4, 6, 24, generator=torch.Generator().manual_seed(3))
    ids = m.sample_ids(2, 4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x, t, per, ids=ids)
        for i in range(4):  # component i alone, with a shared condition equal to its own, gives the same output
            torch.testing.assert_close(m(x[:, i : i + 1], t, per[:, i], ids=ids[:, i : i + 1])[:, 0], y[:, i], atol=ATOL, rtol=0)


def test_global_blocks_follow_their_setting():
    """even / odd / all / none / a list choose which blocks run MoC (global) attention; the others are local."""
    from moca3d.attention import LocalAttention, MoCAttention
    from moca3d.models.transformer import global_block_indices

    assert global_block_indices(5, "even") == [0, 2, 4] and global_block_indices(5, "odd") == [1, 3]
    assert global_block_indices(3, "all") == [0, 1, 2] and global_block_indices(3, "none") == []
    assert global_block_indices(6, [4, 1]) == [1, 4]
    for bad in ("first", [0, 6], [-1]):
        with pytest.raises(ConfigError):
            global_block_indices(6, bad)
    for setting, expected in (("even", [0, 2]), ("odd", [1, 3]), ([3], [3])):
        m = tiny_model(global_blocks=setting)
        kinds = [type(b.attn1) for b in m.blocks]
        assert [i for i, k in enumerate(kinds) if k is MoCAttention] == expected
        assert all(k is LocalAttention for i, k in enumerate(kinds) if i not in expected)


def test_ids_are_distinct_and_component_limit_is_a_clear_error():
    m = tiny_model()
    ids = m.sample_ids(3, 50)
    assert all(len(set(row.tolist())) == 50 for row in ids)
    with pytest.raises(InputError, match="exceed the model's limit"):
        m.sample_ids(1, 51)
    with pytest.raises(InputError, match="expects L=32"):
        m(torch.randn(1, 2, 16, 8), torch.rand(1), torch.randn(1, 6, 24))
    with pytest.raises(ConfigError):
        MoCATransformer(**{**TINY, "long_skips": True})  # even layer count


def test_cfg_scale_one_is_the_conditional_prediction():
    m = tiny_model()
    x, t, c = inputs()
    ids = m.sample_ids(2, 5)
    with torch.no_grad():
        v = flow.guided_velocity(m, x, t, c, torch.zeros_like(c), 1.0, ids=ids)
        torch.testing.assert_close(v, m(x, t, c, ids=ids), atol=0, rtol=0)
        v3 = flow.guided_velocity(m, x, t, c, torch.zeros_like(c), 3.0, ids=ids)
        vu = m(x, t, torch.zeros_like(c), ids=ids)
        torch.testing.assert_close(v3, vu + 3.0 * (m(x, t, c, ids=ids) - vu), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampler_is_guided_euler_at_the_times_the_model_sees(shift):
    """flow.sample == a hand-written loop: z <- z + (t_next - t) (v_u + s (v_c - v_u)), from N(0, I) at t = 1 down to t = 0.

    The model is a fixed non-linear function of (z, t, cond), so a wrong time, sign, step size or guidance
    formula changes the result; tolerance 1e-5 (fp32, O(1) values, 12 steps)."""
    W = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    seen = []

    def model(z, t, cond, ids=None):
        seen.append(t.clone())
        return torch.tanh(z @ W) * t.view(-1, 1, 1, 1) + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1) - ids.view(*ids.shape, 1, 1) * 0.1

    cond = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[0, 3, 1], [2, 0, 4]])
    steps, s = 12, 2.5
    got = flow.sample(model, cond, (2, 3, 32, 8), uncond=torch.zeros_like(cond), steps=steps, guidance=s, shift=shift,
                      generator=torch.Generator().manual_seed(7), ids=ids)
    times = torch.stack([ts[0] for ts in seen])  # one batched (cond + uncond) call per step
    assert len(seen) == steps and torch.all(times[1:] < times[:-1]) and abs(float(times[0]) - 1.0) < 1e-6
    grid = torch.cat([times, torch.zeros(1)])
    z = torch.randn(2, 3, 32, 8, generator=torch.Generator().manual_seed(7))
    for k in range(steps):
        t = grid[k].expand(2)
        v_c, v_u = model(z, t, cond, ids=ids), model(z, t, torch.zeros_like(cond), ids=ids)
        z = z + (grid[k + 1] - grid[k]) * (v_u + s * (v_c - v_u))
    torch.testing.assert_close(got, z, atol=1e-5, rtol=0)
    if shift > 1:  # a shift spends more of the steps at high noise: the middle step's time is above the plain schedule's
        assert float(times[steps // 2]) > 1 - (steps // 2) / steps


def test_flow_interpolation_and_loss():
    z0, eps = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    t = torch.tensor([0.0, 0.5, 1.0])
    zt = flow.interpolate(z0, eps, t)
    torch.testing.assert_close(zt[0], z0[0])
    torch.testing.assert_close(zt[2], eps[2])
    torch.testing.assert_close(zt[1], 0.5 * (z0[1] + eps[1]))
    # the exact velocity has zero loss; padded components are ignored
    mask = torch.tensor([[True, False]] * 3)
    pred = flow.velocity_target(z0, eps)
    pred[:, 1] += 5.0
    assert flow.flow_loss(pred, z0, eps, mask).item() == 0.0
    # Each asset weighs the same, whatever its number of real components: mean over its components, then over assets.
    g = torch.Generator().manual_seed(2)
    z0, eps, pred = (torch.randn(2, 3, 4, 2, generator=g) for _ in range(3))
    mask = torch.tensor([[True, False, False], [True, True, False]])
    err = (pred - (eps - z0)).pow(2).mean((2, 3))  # (B, N)
    expected = (err[0, 0] + (err[1, 0] + err[1, 1]) / 2) / 2
    torch.testing.assert_close(flow.flow_loss(pred, z0, eps, mask), expected, atol=1e-6, rtol=0)
    ts = flow.sample_timesteps(10000, "logit_normal", generator=torch.Generator().manual_seed(0))
    assert 0 < ts.min() and ts.max() < 1 and abs(ts.median().item() - 0.5) < 0.02
    # a shifted location moves the median to sigmoid(mean) (more training at high noise), tolerance 0.02
    ts = flow.sample_timesteps(10000, "logit_normal", mean=1.0, std=0.5, generator=torch.Generator().manual_seed(0))
    assert abs(ts.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02


def test_euler_sampler_follows_an_exact_velocity_field():
    """With v = eps - z* for a fixed target z*, Euler from t=1 lands exactly on z*."""
    target = torch.randn(1, 3, 4, 2)
    cond = torch.zeros(1, 1, 1)

    def model(z, t, c):
        tt = t.view(-1, 1, 1, 1)
        eps = (z - (1 - tt) * target) / tt  # the noise this z_t came from
        return eps - target

    z0 = flow.sample(model, cond, tuple(target.shape), steps=7, guidance=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z0, target, atol=1e-5, rtol=0)


def test_sampler_shift_overrides_a_given_scheduler():
    """shift=None keeps the scheduler's times; shift s visits s t / (1 + (s - 1) t); the scheduler is not changed."""
    visited = []

    def model(z, t, c):
        visited.append(float(t[0]))
        return torch.zeros_like(z)

    scheduler = flow.make_scheduler()
    flow.sample(model, torch.zeros(1, 1, 1), (1, 1, 2, 2), steps=5, guidance=1.0, scheduler=scheduler)
    plain, visited[:] = list(visited), []
    flow.sample(model, torch.zeros(1, 1, 1), (1, 1, 2, 2), steps=5, guidance=1.0, scheduler=scheduler, shift=3.0)
    expected = [3 * t / (1 + 2 * t) for t in plain]
    # diffusers shifts its 1000-step grid: equal to 2e-3 except at the last, near-zero time
    assert visited[:-1] == pytest.approx(expected[:-1], abs=2e-3) and visited[1] > plain[1] + 0.1
    assert scheduler.config.shift == 1.0 and len(scheduler.timesteps) == scheduler.config.num_train_timesteps  # never set
    fresh = flow.scheduler_with_shift(scheduler, None)
    public = [{k: v for k, v in s.config.items() if not k.startswith("_")} for s in (fresh, scheduler)]  # (diffusers' own notes)
    assert fresh is not scheduler and public[0] == public[1]  # each sampling call steps its own copy
    with pytest.raises(InputError, match="shift must be positive"):
        flow.scheduler_with_shift(scheduler, 0.0)


def test_loss_decreases_on_a_tiny_overfit_set():
    """A fixed batch of (Z_0, eps, t): the flow loss must fall well below its starting value."""
    torch.manual_seed(0)
    m = MoCATransformer(**TINY).train()
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(4, 3, 32, 8, generator=g), torch.randn(4, 3, 32, 8, generator=g)
    t, cond = flow.sample_timesteps(4, generator=g), torch.randn(4, 6, 24, generator=g)
    ids = m.sample_ids(4, 3, g)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = flow.flow_loss(m(flow.interpolate(z0, eps, t), t, cond, ids=ids, generator=g), z0, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::5]


def test_gradients_reach_every_parameter_group():
    m = tiny_model().train()
    x, t, c = inputs()
    m(x, t, c, generator=torch.Generator().manual_seed(0)).square().mean().backward()
    names = ["proj_in", "packer.queries", "id_embedding", "time_embed", "router.to_q", "attn2.to_k", "proj_out"]
    for name in names:
        grads = [p.grad for n, p in m.named_parameters() if name in n]
        assert grads and all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


def test_gradient_checkpointing_gives_the_same_gradients():
    m = tiny_model().train()
    x, t, c = inputs()
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m(x, t, c, ids=m.sample_ids(2, 5, torch.Generator().manual_seed(0)), generator=torch.Generator().manual_seed(1)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    m = tiny_model(topk=2, router="softmax")
    m.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    m2 = MoCATransformer.from_pretrained(tmp_path).eval()
    assert m2.config.topk == 2 and m2.config.router == "softmax"
    for (k1, v1), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    x, t, c = inputs()
    ids = m.sample_ids(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(m2(x, t, c, ids=ids), m(x, t, c, ids=ids), atol=ATOL, rtol=0)


class Killed(Exception):
    pass


@pytest.mark.parametrize("which", ["transformer", "image_encoder"])
def test_a_killed_save_leaves_the_earlier_model(tmp_path, monkeypatch, which):
    """Like the VAE (test_vae.py), the transformer and image encoder folders (an image_encoder_from is loaded on its
    own) are written all or nothing: a save killed while writing the weights leaves the earlier model loadable."""
    import safetensors.torch

    from moca3d.models.image_encoder import ImageEncoder

    def make(seed, heads):  # the head count changes the config, not the weights' shapes
        torch.manual_seed(seed)
        if which == "transformer":
            return tiny_model(seed, num_heads=heads)
        return ImageEncoder(image_size=32, patch_size=16, width=32, num_layers=1, num_heads=heads)

    earlier, later = make(1, heads=4), make(2, heads=2)
    klass = type(earlier)
    earlier.save_pretrained(tmp_path)

    def killed(tensors, filename, metadata=None):
        raise Killed

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(Killed):
        later.save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = klass.from_pretrained(tmp_path)
    assert loaded.config.num_heads == 4, "the later config beside the earlier weights"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), earlier.state_dict().values()))


def test_tokens_are_exchangeable_without_token_positions_and_ordered_with_them():
    """Without token positions, permuting a component's tokens permutes the velocity (tolerance 1e-5); with
    them (canonically ordered latents) it does not, and the config round-trips."""
    x, t, c = inputs(N=3)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(4))
    plain = tiny_model()
    positions = tiny_model(token_positions=True)
    assert plain.token_order == "fps" and positions.token_order == "canonical"
    assert plain.token_embedding is None and positions.token_embedding.shape == (32, 64)
    ids = plain.sample_ids(2, 3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(plain(x[:, :, perm], t, c, ids=ids), plain(x, t, c, ids=ids)[:, :, perm], atol=ATOL, rtol=0)
        moved = positions(x[:, :, perm], t, c, ids=ids) - positions(x, t, c, ids=ids)[:, :, perm]
    assert moved.abs().max() > 1e-3
    config = dict(positions.config)
    assert MoCATransformer.from_config(config).config.token_positions is True
    assert MoCATransformer.from_config({k: v for k, v in config.items() if k != "token_positions"}).token_embedding is None


def test_layout_embedding_starts_as_the_model_without_it_and_stays_equivariant():
    """A layout embedding (scene mask boxes) starts at zero output, so the model equals the one without it (1e-5);
    once trained it moves the velocity, permutes with its components, and a missing or stray layout is an error."""
    x, t, c = inputs(N=4)
    layout = torch.rand(2, 4, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    plain = tiny_model()
    boxed = tiny_model(layout_features=8)
    missing, unexpected = boxed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("layout_embed.") for k in missing)
    ids = plain.sample_ids(2, 4, torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(boxed(x, t, c, ids=ids, layout=layout), plain(x, t, c, ids=ids), atol=ATOL, rtol=0)
        torch.nn.init.normal_(boxed.layout_embed.linear_2.weight, std=0.1)  # as after training
        y = boxed(x, t, c, ids=ids, layout=layout)
        assert (y - plain(x, t, c, ids=ids)).abs().max() > 1e-3
        perm = torch.tensor([2, 0, 3, 1])
        torch.testing.assert_close(boxed(x[:, perm], t, c, ids=ids[:, perm], layout=layout[:, perm]), y[:, perm], atol=ATOL, rtol=0)
    with pytest.raises(InputError, match="layout features"):
        boxed(x, t, c, ids=ids)
    with pytest.raises(InputError, match="layout features"):
        boxed(x, t, c, ids=ids, layout=layout[:, :, :5])
    with pytest.raises(InputError, match="layout features"):
        plain(x, t, c, ids=ids, layout=layout)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_an_unpadded_forward_reads_nothing_back_from_the_device(backend, monkeypatch):
    """Routing read k and N back (tolist, int, bool) in every global block: a stall per block on a GPU. Without a
    component mask every count is known on the host; with one, each block reads the mask's sums once."""
    m = tiny_model(attention_backend=backend, global_blocks="all")
    z, t, c = inputs(B=2, N=5)
    ids = m.sample_ids(2, 5, torch.Generator().manual_seed(0), "cpu")
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k: (reads.append(_n), _f(self, *a, **k))[1])
    with torch.no_grad():
        m(z, t, c, ids=ids)
    assert reads == [], reads
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        m(z, t, c, ids=ids, component_mask=mask)
    assert reads == ["tolist"] * sum(block.is_global for block in m.blocks) and reads, reads
