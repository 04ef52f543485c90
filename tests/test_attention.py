"""MoC attention: backends vs an independent per-component, per-head loop, and its invariants.

Tolerances: fp32 on the CPU; outputs agree to 1e-5 absolute (values are O(1)), gradients to
1e-4 (sums over many terms), unless stated otherwise.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moca3d.attention import LocalAttention, MoCAttention, MoCAttentionConfig, local_attention, local_mask, route
from moca3d.attention.local_mask import local_attention_masked
from moca3d.attention.backends.context import build_context
from moca3d.errors import ConfigError, InputError

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ATOL = 1e-5
GRAD_ATOL = 1e-4
DIM, HEADS = 32, 4


def make_inputs(B=2, N=6, L=16, Np=4, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, L + Np + 1, DIM, generator=g)
    return x.requires_grad_(requires_grad)


def make_module(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MoCAttentionConfig(dim=DIM, num_heads=HEADS, **kw)
    m = MoCAttention(cfg)
    if m.router is not None:  # a larger router init: importances spread over (0, 1), no ties
        torch.nn.init.normal_(m.router.to_q.weight, std=0.15)
        torch.nn.init.normal_(m.router.to_k.weight, std=0.15)
    return m.eval()


def naive_moc(m: MoCAttention, x, num_compressed, routing, component_mask=None):
    """Oracle: loops over samples, components and heads; builds each context from DESIGN.md §3."""
    cfg = m.config
    B, N, T, D = x.shape
    H, d = cfg.num_heads, cfg.head_dim
    Lz = T - num_compressed - 1
    q, k, v = m.project(x)  # (B, N, H, T, d)
    routed = routing.routed_mask()
    Hr = routed.shape[1]
    real = component_mask if component_mask is not None else torch.ones(B, N, dtype=torch.bool)
    out = torch.zeros(B, N, H, T, d)
    for b in range(B):
        for i in range(N):
            for h in range(H):
                hr = h if Hr > 1 else 0
                keys, values = [k[b, i, h, :Lz]], [v[b, i, h, :Lz]]
                for j in range(N):
                    if j == i or not real[b, j]:
                        continue
                    o = routing.gate[b, hr, i, j]
                    if routed[b, hr, i, j]:
                        kj, vj = k[b, j, h, :Lz], v[b, j, h, :Lz]
                    elif cfg.unselected == "compressed":
                        kj, vj = k[b, j, h, Lz : Lz + num_compressed], v[b, j, h, Lz : Lz + num_compressed]
                    else:
                        continue
                    if cfg.gate == "key":
                        kj = o * kj
                    else:
                        vj = o * vj
                    keys.append(kj)
                    values.append(vj)
                K, V = torch.cat(keys), torch.cat(values)
                scores = q[b, i, h] @ K.T / math.sqrt(d)  # (T, Lg)
                out[b, i, h] = torch.softmax(scores, dim=-1) @ V
    return m.output(out, component_mask)


ABLATIONS = [
    {},
    {"gate": "value"},
    {"unselected": "drop"},
    {"routing": False},
    {"multihead_routing": False},
    {"router": "softmax"},
    {"topk": 2},
    {"topk_ratio": 0.5},
]


@pytest.mark.parametrize("kw", ABLATIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("padded", [False, True])
def test_backends_match_naive_loop_forward(kw, padded):
    m = make_module(**kw)
    x = make_inputs()
    mask = None
    if padded:
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[1, 3:] = False
    with torch.no_grad():
        routing = m.route(x, mask)
        expected = naive_moc(m, x, 4, routing, mask)
        backends = ["reference", "chunked", "matmul"] + (["blocksparse"] if m.config.gate == "key" else [])
        for backend in backends:
            m.config.backend = backend
            m.config.chunk_bytes = 1  # one component per chunk: exercises chunk boundaries
            got = m(x, 4, mask, routing=routing)
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"{backend} vs naive loop")


@pytest.mark.parametrize("kw", [{}, {"gate": "value"}, {"multihead_routing": False}, {"unselected": "drop"}])
def test_gradients_match_naive_loop_and_reach_router(kw):
    m = make_module(**kw).train()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    grads = {}
    for backend in ["naive", "reference", "chunked", "matmul"]:
        m.zero_grad()
        x = make_inputs(requires_grad=True)
        routing = m.route(x, mask, generator=torch.Generator().manual_seed(1))  # sampled, same draw each time
        if backend == "naive":
            y = naive_moc(m, x, 4, routing, mask)
        else:
            m.config.backend = backend
            m.config.chunk_bytes = 1
            y = m(x, 4, mask, routing=routing)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads[backend] = (x.grad.clone(), m.router.to_q.weight.grad.clone(), m.to_k.weight.grad.clone())
    assert grads["naive"][1].abs().max() > 1e-6, "no gradient reached the router through the gate"
    for backend in ["reference", "chunked", "matmul"]:
        for got, want in zip(grads[backend], grads["naive"]):
            torch.testing.assert_close(got, want, atol=GRAD_ATOL, rtol=1e-4)


def test_k_equals_n_minus_1_is_dense_attention_with_gated_keys():
    N, Lz, Np = 5, 16, 4
    m = make_module(topk=N - 1)
    x = make_inputs(N=N, L=Lz, Np=Np)
    with torch.no_grad():
        routing = m.route(x)
        got = m(x, Np, routing=routing)
        q, k, v = m.project(x)  # (B, N, H, T, d)
        kz, vz = k[:, :, :, :Lz], v[:, :, :, :Lz]
        B, _, H, T, d = q.shape
        out = torch.empty_like(q)
        for i in range(N):
            gate = routing.gate[:, :, i]  # (B, H, N); gate[:, :, i] == 1
            keys = (kz * gate.permute(0, 2, 1)[..., None, None]).permute(0, 2, 1, 3, 4).reshape(B, H, N * Lz, d)
            values = vz.permute(0, 2, 1, 3, 4).reshape(B, H, N * Lz, d)
            out[:, i] = F.scaled_dot_product_attention(q[:, i], keys, values)
        torch.testing.assert_close(got, m.output(out, None), atol=ATOL, rtol=0)
    assert torch.all(routing.gate.diagonal(dim1=-2, dim2=-1) == 1)


@pytest.mark.parametrize("mode", ["moc", "dense"])
def test_single_component_is_plain_self_attention(mode):
    Lz, Np = 16, 4
    m = make_module(mode=mode)
    x = make_inputs(N=1, L=Lz, Np=Np)
    with torch.no_grad():
        got = m(x, Np)
        q, k, v = m.project(x)
        scores = q[:, 0] @ k[:, 0, :, :Lz].transpose(-1, -2) / math.sqrt(m.config.head_dim)
        out = (torch.softmax(scores, -1) @ v[:, 0, :, :Lz]).unsqueeze(1)
        torch.testing.assert_close(got, m.output(out, None), atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "chunked", "blocksparse", "matmul"])
def test_permuting_components_permutes_output(backend):
    m = make_module(backend=backend)
    x = make_inputs(N=7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = m(x, 4)
        y_perm = m(x[:, perm], 4)
    torch.testing.assert_close(y_perm, y[:, perm], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["moc", "dense", "none"])
def test_padded_components_change_nothing_for_real_ones(mode):
    m = make_module(mode=mode)
    small = make_inputs(B=1, N=3, seed=3)
    with torch.no_grad():
        expected = m(small, 4)
        # The same sample padded to 8 components with garbage, beside a full 8-part sample.
        x = make_inputs(B=2, N=8, seed=4) * 10
        x[0, :3] = small[0]
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[0, 3:] = False
        backends = ["reference", "chunked", "blocksparse", "matmul"] if mode == "moc" else ["auto"]
        for backend in backends:
            m.config.backend = backend
            got = m(x, 4, component_mask=mask)
            torch.testing.assert_close(got[0, :3], expected[0], atol=ATOL, rtol=0)
            assert torch.all(got[0, 3:] == 0)
            # the full sample is unaffected by its padded neighbour
            torch.testing.assert_close(got[1], m(x[1:], 4)[0], atol=ATOL, rtol=0)


def test_eval_routing_is_deterministic_and_top_k():
    m = make_module()
    x = make_inputs(N=9)
    with torch.no_grad():
        r1, r2 = m.route(x), m.route(x)
    assert torch.equal(r1.order, r2.order)
    k = int(r1.num_routed[0])
    assert k == 2  # round(0.25 * 9) = 2
    # the routed set is exactly the k largest gates among the others
    gate = r1.gate.masked_fill(torch.eye(9, dtype=torch.bool), -1.0)
    top = gate.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(r1.order[..., :k].sort(-1).values, top)


def test_training_routing_samples_without_replacement_in_proportion_to_importance():
    """k draws without replacement from o / sum(o): k=1 frequencies and k=2 pair frequencies."""
    torch.manual_seed(0)
    N, M = 5, 40000
    o = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.05])  # importances of components 1..4 seen from 0
    gate = torch.ones(M, 1, N, N)
    gate[:, 0, 0, 1:] = o[1:]
    p = o[1:] / o[1:].sum()
    gen = torch.Generator().manual_seed(0)
    # k = 1: P(j) = p_j; bound: 5 standard deviations of a binomial frequency
    cfg = MoCAttentionConfig(dim=DIM, num_heads=HEADS, topk=1)
    first = route(gate, cfg, sample=True, generator=gen).order[:, 0, 0, 0] - 1
    freq = torch.bincount(first, minlength=4).float() / M
    assert torch.all((freq - p).abs() < 5 * torch.sqrt(p * (1 - p) / M)), (freq, p)
    # k = 2: P({a, b}) = p_a p_b / (1 - p_a) + p_b p_a / (1 - p_b); never the same twice
    cfg = MoCAttentionConfig(dim=DIM, num_heads=HEADS, topk=2)
    pair = route(gate, cfg, sample=True, generator=gen).order[:, 0, 0, :2] - 1
    assert torch.all(pair[:, 0] != pair[:, 1])
    lo, hi = pair.min(1).values, pair.max(1).values
    counts = torch.bincount(lo * 4 + hi, minlength=16).float() / M
    for a in range(4):
        for b in range(a + 1, 4):
            exact = p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b])
            assert abs(counts[a * 4 + b] - exact) < 5 * math.sqrt(exact * (1 - exact) / M), (a, b)


@pytest.mark.parametrize("kw", [{}, {"router": "softmax"}, {"multihead_routing": False}])
def test_router_importance_is_the_anchor_formula(kw):
    """o_ij^h = sigmoid(q_i^h . k_j^h / sqrt(d_r)) from the anchors (softmax over real j != i), written out per entry.

    Diagonal exactly 1, padded j exactly 0; tolerance 1e-6 (fp32, O(1) values)."""
    m = make_module(**kw)
    B, N = 2, 5
    x = make_inputs(B=B, N=N)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        gate = m.route(x, mask).gate  # (B, Hr, N, N)
        r = m.router
        Hr = m.config.router_heads
        dr = DIM // Hr
        anchors = x[:, :, -1]  # the last token of each component
        for b in range(B):
            for h in range(Hr):
                for i in range(N):
                    logits = {}
                    for j in range(N):
                        if j == i or not mask[b, j]:
                            continue
                        qi = (r.to_q.weight @ anchors[b, i] + r.to_q.bias)[h * dr : (h + 1) * dr]
                        kj = (r.to_k.weight @ anchors[b, j] + r.to_k.bias)[h * dr : (h + 1) * dr]
                        logits[j] = float(qi @ kj) / math.sqrt(dr)
                    if kw.get("router") == "softmax":
                        z = sum(math.exp(v) for v in logits.values())
                        expected = {j: math.exp(v) / z for j, v in logits.items()}
                    else:
                        expected = {j: 1 / (1 + math.exp(-v)) for j, v in logits.items()}
                    for j in range(N):
                        want = 1.0 if j == i else expected.get(j, 0.0)
                        assert abs(float(gate[b, h, i, j]) - want) < 1e-6, (b, h, i, j)
    assert gate.shape == (B, Hr, N, N)


def test_routing_reads_only_the_anchor_tokens():
    """Changing any token but the last of each component leaves the routing; changing an anchor changes it."""
    m = make_module()
    x = make_inputs(N=6)
    with torch.no_grad():
        base = m.route(x).gate
        y = x.clone()
        y[:, :, :-1] += torch.randn_like(y[:, :, :-1])
        assert torch.equal(m.route(y).gate, base)
        z = x.clone()
        z[:, 2, -1] += 1.0
        moved = m.route(z).gate
    assert not torch.allclose(moved[:, :, 2], base[:, :, 2], atol=1e-3)  # row and column of component 2
    assert not torch.allclose(moved[:, :, :, 2], base[:, :, :, 2], atol=1e-3)
    others = [0, 1, 3, 4, 5]
    torch.testing.assert_close(moved[:, :, others][:, :, :, others], base[:, :, others][:, :, :, others], atol=0, rtol=0)


def test_training_mode_samples_routing_unless_configured_top_k():
    """In training the router samples (draws differ from the eval top-k); train_routing="topk" keeps top-k."""
    x = make_inputs(B=2, N=12)
    m = make_module()
    with torch.no_grad():
        top = m.route(x).order[..., :3]  # k = 3 of 12 at eval
        m.train()
        draws = [m.route(x, generator=torch.Generator().manual_seed(s)).order[..., :3] for s in range(8)]
    assert any(not torch.equal(d.sort(-1).values, top.sort(-1).values) for d in draws)
    assert not all(torch.equal(d, draws[0]) for d in draws[1:])  # the draw depends on the generator
    fixed = make_module(train_routing="topk").train()
    with torch.no_grad():
        assert torch.equal(fixed.route(x, generator=torch.Generator().manual_seed(1)).order[..., :3], top)


def test_per_sample_seeds_make_training_routing_independent_of_the_batch():
    """With one seed per sample, a sample's draw is the same alone or beside others (any process split)."""
    m = make_module().train()
    x = make_inputs(B=3, N=10)
    with torch.no_grad():
        together = m.route(x, seeds=[11, 12, 13]).order
        alone = [m.route(x[b : b + 1], seeds=[s]).order[0] for b, s in enumerate([11, 12, 13])]
        other = m.route(x, seeds=[21, 22, 23]).order
    for b in range(3):
        assert torch.equal(together[b], alone[b])
    assert not torch.equal(together, other)


def test_number_of_routed_components():
    cfg = MoCAttentionConfig(dim=DIM, num_heads=HEADS)
    assert [cfg.num_routed(n) for n in (1, 2, 3, 4, 8, 16, 32, 64)] == [0, 1, 1, 1, 2, 4, 8, 16]
    fixed = MoCAttentionConfig(dim=DIM, num_heads=HEADS, topk=6)
    assert [fixed.num_routed(n) for n in (1, 3, 8, 32)] == [0, 2, 6, 6]
    assert MoCAttentionConfig(dim=DIM, num_heads=HEADS, routing=False).num_routed(32) == 0
    with pytest.raises(ConfigError, match="topk must be a whole number >= 1 .routing=False routes none"):
        MoCAttentionConfig(dim=DIM, num_heads=HEADS, topk=0)  # it would be read as 1


def test_a_backend_set_on_a_built_layer_is_checked_when_used():
    """`attention_config.backend = "bogus"` on a loaded model (the dataclass checks only when made) was a bare KeyError."""
    m = make_module()
    m.config.backend = "bogus"
    with pytest.raises(ConfigError, match="^attention backend must be one of auto, reference, chunked, blocksparse, matmul, fused, got 'bogus'$"):
        m(make_inputs(), 4)


@pytest.mark.parametrize("N", [1, 2, 5, 12])
@pytest.mark.parametrize("kw", [{}, {"unselected": "drop"}, {"routing": False}])
def test_context_length_matches_formula(N, kw):
    Lz, Np = 16, 4
    m = make_module(**kw)
    x = make_inputs(B=1, N=N, L=Lz, Np=Np)
    with torch.no_grad():
        routing = m.route(x)
        q, k, v = m.project(x)
        K, _, mask = build_context(k[:, :, :, : Lz + Np].contiguous(), v[:, :, :, : Lz + Np].contiguous(), Lz, routing, m.config, torch.arange(N))
    assert mask is None
    assert K.shape[2] == m.config.context_length(N, Lz, Np)
    kk = m.config.num_routed(N)
    extra = (N - kk - 1) * Np if m.config.unselected == "compressed" else 0
    assert K.shape[2] == Lz + kk * Lz + extra


def test_mixed_part_counts_in_one_batch_match_separate_runs():
    m = make_module()
    a, b = make_inputs(B=1, N=2, seed=7), make_inputs(B=1, N=9, seed=8)
    x = torch.zeros(2, 9, a.shape[2], DIM)
    x[0, :2], x[1] = a[0], b[0]
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :2], mask[1] = True, True
    with torch.no_grad():
        for backend in ["reference", "chunked", "blocksparse", "matmul"]:
            m.config.backend = backend
            y = m(x, 4, component_mask=mask)
            torch.testing.assert_close(y[0, :2], m(a, 4)[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(y[1], m(b, 4)[0], atol=ATOL, rtol=0)


def test_blocksparse_with_unaligned_lengths_and_small_blocks():
    """A timestep token makes L_z = L + 1; padding to the block size must not leak."""
    m = make_module(block_size=16)
    x = make_inputs(N=5, L=33, Np=5)
    with torch.no_grad():
        routing = m.route(x)
        expected = naive_moc(m, x, 5, routing)
        m.config.backend = "blocksparse"
        torch.testing.assert_close(m(x, 5, routing=routing), expected, atol=ATOL, rtol=0)


def test_blocksparse_on_cpu_says_nothing_of_compiling(monkeypatch):
    """Eager flex_attention is the CPU's path on purpose: torch's multi-line advice to compile it is not shown."""
    import warnings

    import torch.nn.attention.flex_attention as flex

    from moca3d.attention.backends import blocksparse

    monkeypatch.setattr(flex, "_WARNINGS_SHOWN", set())  # torch says it once a process
    monkeypatch.setattr(blocksparse, "_EAGER_QUIETED", [])
    m = make_module(backend="blocksparse")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        m(make_inputs(), 4)
    assert not [str(w.message) for w in caught if "flex_attention" in str(w.message)]


def test_blocksparse_refuses_cpu_backward_with_clear_error():
    m = make_module(backend="blocksparse").train()
    x = make_inputs(requires_grad=True)
    with pytest.raises(ConfigError, match="no backward on the CPU"):
        m(x, 4)


def test_dense_mode_sees_all_latents_of_all_components():
    Lz, Np, N = 16, 4, 4
    m = make_module(mode="dense")
    x = make_inputs(N=N, L=Lz, Np=Np)
    with torch.no_grad():
        got = m(x, Np)
        q, k, v = m.project(x)
        B, _, H, T, d = q.shape
        keys = k[:, :, :, :Lz].permute(0, 2, 1, 3, 4).reshape(B, H, N * Lz, d)
        values = v[:, :, :, :Lz].permute(0, 2, 1, 3, 4).reshape(B, H, N * Lz, d)
        out = torch.stack([torch.softmax(q[:, i] @ keys.transpose(-1, -2) / math.sqrt(d), -1) @ values for i in range(N)], 1)
        torch.testing.assert_close(got, m.output(out, None), atol=ATOL, rtol=0)


# --- the local block -------------------------------------------------------------------------


def test_local_mask_blocks_exactly_the_pairs_of_the_design():
    nz, npc = 3, 2
    mask = local_mask(nz, npc)
    group = ["z"] * nz + ["p"] * npc + ["a"]
    allowed = {("z", "z"), ("p", "z"), ("p", "p"), ("a", "z"), ("a", "p"), ("a", "a")}
    for qi, gq in enumerate(group):
        for ki, gk in enumerate(group):
            assert bool(mask[qi, ki]) == ((gq, gk) in allowed), (gq, gk)


def test_local_attention_fast_path_equals_masked_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 4, 16 + 4 + 1, 8) for _ in range(3))
    expected = local_attention_masked(q, k, v, 16, 4)  # the oracle: one SDPA with the explicit mask
    torch.testing.assert_close(local_attention(q, k, v, 16, 4), expected, atol=ATOL, rtol=0)


def test_local_block_leaves_latents_blind_to_compressed_and_anchor_tokens():
    torch.manual_seed(0)
    layer = LocalAttention(MoCAttentionConfig(dim=DIM, num_heads=HEADS)).eval()
    x = make_inputs(N=3)
    y = layer(x, 4)
    x2 = x.clone()
    x2[:, :, 16:] += torch.randn_like(x2[:, :, 16:])  # change p and the anchor
    y2 = layer(x2, 4)
    torch.testing.assert_close(y2[:, :, :16], y[:, :, :16], atol=ATOL, rtol=0)
    assert not torch.allclose(y2[:, :, 16:], y[:, :, 16:])
    # and components never see each other
    x3 = x.clone()
    x3[:, 1] += 1.0
    y3 = layer(x3, 4)
    torch.testing.assert_close(y3[:, [0, 2]], y[:, [0, 2]], atol=ATOL, rtol=0)


# --- configuration and input errors ----------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"dim": 30, "num_heads": 4},
        {"mode": "sparse"},
        {"topk_ratio": 0.0},
        {"gate": "query"},
        {"routing": False, "unselected": "drop"},
        {"block_size": 24},
        {"backend": "triton"},
    ],
)
def test_bad_config_is_a_clear_error(kw):
    args = {"dim": DIM, "num_heads": HEADS, **kw}
    with pytest.raises(ConfigError):
        MoCAttentionConfig(**args)


def test_bad_token_layout_is_a_clear_error():
    m = make_module()
    with pytest.raises(InputError, match="compressed tokens"):
        m(torch.randn(1, 2, 5, DIM), 4)
    with pytest.raises(InputError, match="component_mask"):
        m(make_inputs(), 4, component_mask=torch.ones(3, 3, dtype=torch.bool))


def test_compiled_blocksparse_matches_reference_on_real_components():
    """The torch.compile'd flex_attention path (the one CUDA uses) agrees with the oracle."""
    from moca3d.attention.backends.blocksparse import moc_attention_blocksparse
    from moca3d.attention.backends.reference import moc_attention_reference

    m = make_module(block_size=16)
    x = make_inputs(N=5, L=32, Np=8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        q, k, v = m.project(x, num_keys=40)
        routing = m.route(x, mask)
        got = moc_attention_blocksparse(q, k, v, 32, routing, m.config, compiled=True)
        want = moc_attention_reference(q, k, v, 32, routing, m.config)
    torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1, :3], want[1, :3], atol=ATOL, rtol=0)  # padded components' rows are unused


def test_auto_backend_follows_the_measured_choice_per_device():
    from moca3d.attention.backends import select_backend

    config = MoCAttentionConfig(dim=DIM, num_heads=4)
    assert select_backend(config, torch.device("cuda")) == "reference"  # measured fastest on an H200, training and inference
    assert select_backend(config, torch.device("cpu")) == "chunked"
    config.backend = "matmul"
    assert select_backend(config, torch.device("cpu")) == "matmul", "a forced backend is kept"


def test_equal_importances_route_in_id_order_so_routing_follows_a_permutation():
    """An untrained router's gates sit near 0.5 and can tie exactly (found at N = 64: two gates equal to the last
    bit at the top-k cut); the stable sort then kept the lower index, so permuting the components changed which one
    was routed (an output change of 3e-2). Ties now rank by the components' IDs, which a permutation carries along."""
    from moca3d.attention.routing import tie_breaking_order

    N = 7
    config = MoCAttentionConfig(dim=DIM, num_heads=HEADS, topk=3)
    gate = torch.full((1, 1, N, N), 0.5)  # every importance tied
    gate[0, 0, 2, 5] = gate[0, 0, 2, 6] = 0.7  # and a tie above the cut, and a clear winner
    gate[0, 0, 2, 1] = 0.9
    ids = torch.tensor([[40, 3, 17, 8, 25, 1, 33]])
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    plain = route(gate, config, tie_order=tie_breaking_order(ids)).routed_mask()[0, 0]  # (N, N)
    moved = route(gate[:, :, perm][..., perm], config, tie_order=tie_breaking_order(ids[:, perm])).routed_mask()[0, 0]
    assert torch.equal(moved, plain[perm][:, perm])
    assert plain[2].nonzero().flatten().tolist() == [1, 5, 6] and plain[0].nonzero().flatten().tolist() == [1, 3, 5]  # lowest IDs
    unbroken = route(gate[:, :, perm][..., perm], config).routed_mask()[0, 0]  # index order: not equivariant here
    assert not torch.equal(unbroken, plain[perm][:, perm])


def test_routing_settings_are_checked_when_set_on_a_built_model_and_a_topk_that_routes_everything_is_named():
    """`attention_config.topk = 0` on a loaded model ran with k = 1 silently (only __post_init__ checked it); a
    recipe's topk of 100 on a 50-ID model routed every component to all others (dense cost) without a word, and
    `moca3d info` did not show it."""
    import numpy as np

    from moca3d.commands.info import component_entry
    from moca3d.models.transformer import MoCATransformer

    cfg = MoCAttentionConfig(dim=DIM, num_heads=HEADS, topk=3)
    assert cfg.num_routed(8) == 3
    for name, value, message in (("topk", 0, "topk must be a whole number >= 1"), ("topk", 2.5, "topk must be a whole number"),
                                 ("topk", True, "topk must be a whole number"), ("topk_ratio", 0.0, "topk_ratio must be in")):
        bad = MoCAttentionConfig(dim=DIM, num_heads=HEADS)
        setattr(bad, name, value)
        with pytest.raises(ConfigError, match=message):
            bad.num_routed(8)
    for value in (4.0, True, "4"):  # refused when built as when used (4.0 was built, then failed at the first forward)
        with pytest.raises(ConfigError, match="topk must be a whole number"):
            MoCAttentionConfig(dim=DIM, num_heads=HEADS, topk=value)
    assert MoCAttentionConfig(dim=DIM, num_heads=HEADS, topk=np.int64(4)).num_routed(8) == 4  # a numpy sweep's ints
    with pytest.raises(ConfigError, match="topk_ratio must be in"):
        MoCAttentionConfig(dim=DIM, num_heads=HEADS, topk_ratio=True)
    small = dict(num_latents=8, in_channels=4, width=32, num_layers=2, num_heads=4, cond_dim=16, compression=4, id_codebook_size=50)
    from moca3d.errors import InputWarning

    with pytest.warns(InputWarning, match=r"topk 100 routes every component to all the others at any count up to the model's 50"):
        MoCATransformer(**small, topk=100)  # warned, still built: a pipeline saved so still loads
    assert MoCATransformer(**small, topk=48).attention_config.topk == 48  # k 48 of 50: still one left compressed
    MoCATransformer(**small, topk=100, attention_mode="dense")  # no routing there: not checked
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        MoCATransformer(**small, topk=np.int64(6)).save_pretrained(folder)  # a numpy int: saved as JSON (it failed)
        assert component_entry(Path(folder), "transformer")["topk"] == 6
        MoCATransformer(**small).save_pretrained(folder)
        assert "topk" not in component_entry(Path(folder), "transformer")  # unset: the ratio decides (shown)
