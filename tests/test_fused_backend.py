"""The `fused` backend's Triton kernels against the `reference` backend, run in Triton's CPU interpreter.

Triton decides at import whether kernels are compiled or interpreted, so the kernel tests run in
a child pytest started with TRITON_INTERPRET=1 (`test_kernels_in_triton_interpreter`); in this
process they are skipped with that reason. Tolerances: fp32, outputs to 1e-5 absolute, gradients
to 1e-4 absolute + 1e-4 relative, as for the other backends in test_attention.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moca3d.attention import MoCAttention, MoCAttentionConfig
from moca3d.attention.backends.fused import HAS_TRITON, interpreted, routing_kinds
from moca3d.errors import ConfigError

DIM, HEADS = 32, 2
in_child = pytest.mark.skipif(
    not (HAS_TRITON and interpreted()), reason="runs in the TRITON_INTERPRET=1 child of test_kernels_in_triton_interpreter"
)


def make_module(seed=0, **kw):
    torch.manual_seed(seed)
    m = MoCAttention(MoCAttentionConfig(dim=DIM, num_heads=HEADS, **kw))
    torch.nn.init.normal_(m.router.to_q.weight, std=0.15)  # importances spread over (0, 1), no ties
    torch.nn.init.normal_(m.router.to_k.weight, std=0.15)
    return m


def run(m, backend, x, num_compressed, mask, seeds):
    """Output and the gradients of x, the router and the key/value projections under `backend`."""
    m.config.backend = backend
    m.zero_grad()
    x = x.detach().clone().requires_grad_(m.training)
    y = m(x, num_compressed, mask, seeds=seeds)
    if not m.training:
        return (y,)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y, x.grad, m.router.to_q.weight.grad, m.to_k.weight.grad, m.to_v.weight.grad


def assert_backends_agree(m, x, num_compressed, mask, seeds=(1, 2)):
    want = run(m, "reference", x, num_compressed, mask, list(seeds))
    got = run(m, "fused", x, num_compressed, mask, list(seeds))
    names = ["output", "d x", "d router", "d to_k", "d to_v"]
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0, msg="output")
    for name, g, w in zip(names[1:], got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=name)
    if m.training:
        assert want[2].abs().max() > 1e-6, "no gradient reached the router"


@in_child
def test_forward_and_gradients_match_reference_with_padding_and_sampled_routing():
    """Several query and key tiles per component (16-token tiles, 21 queries); padded components; k differs by sample."""
    m = make_module(block_size=16, topk_ratio=0.5).train()
    x = torch.randn(2, 5, 16 + 4 + 1, DIM)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2:] = False  # k = 3 of 5 in sample 0, 1 of 2 in sample 1
    assert_backends_agree(m, x, 4, mask)


@in_child
def test_gradients_match_with_one_routing_shared_by_all_heads_and_unaligned_latents():
    """multihead_routing=False (the gate is broadcast over heads) and L_z = 17 (a timestep token)."""
    m = make_module(block_size=16, multihead_routing=False).train()
    x = torch.randn(1, 4, 17 + 4 + 1, DIM)
    assert_backends_agree(m, x, 4, None, seeds=(3,))


@in_child
@pytest.mark.parametrize(
    "kw", [{"unselected": "drop"}, {"routing": False}, {"router": "softmax", "topk": 2}], ids=["drop", "no-routing", "softmax-top2"]
)
def test_ablations_match_reference_forward(kw):
    m = make_module(block_size=32, **kw).eval()
    x = torch.randn(2, 4, 16 + 4 + 1, DIM)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 3] = False
    with torch.no_grad():
        assert_backends_agree(m, x, 4, mask)


@in_child
def test_no_compressed_tokens_reads_routed_latents_only():
    """N_p = 0: unrouted components contribute nothing, as in `reference`."""
    m = make_module(block_size=16).eval()
    x = torch.randn(1, 4, 16 + 0 + 1, DIM)
    with torch.no_grad():
        assert_backends_agree(m, x, 0, None)


def test_kernels_in_triton_interpreter():
    if not HAS_TRITON:
        pytest.skip("triton is not installed (scripts/setup.sh installs it with the dev extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "not interpreter"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "8 passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_routing_kinds_follow_the_routed_mask():
    """OWN on the diagonal, ROUTED = routed_mask, COMPRESSED for the other real components, SKIP towards padding."""
    m = make_module().eval()
    x = torch.randn(2, 5, 21, DIM)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    routing = m.route(x, mask)
    kinds = routing_kinds(routing, m.config, HEADS, num_compressed=4)
    routed = routing.routed_mask()
    eye = torch.eye(5, dtype=torch.bool)
    assert (kinds[:, :, eye] == 1).all()
    assert ((kinds == 2) == (routed & ~eye)).all()
    real = mask.view(2, 1, 1, 5)
    assert ((kinds == 3) == (real & ~routed & ~eye)).all()
    assert (kinds[1, :, :, 3:][~eye[:, 3:].expand(2, 5, 2)] == 0).all()
    assert (routing_kinds(routing, m.config, HEADS, num_compressed=0) != 3).all(), "no p tokens, nothing compressed"


def test_fused_backend_outside_cuda_or_with_value_gate_is_a_clear_error():
    x = torch.randn(1, 3, 21, DIM)
    if not interpreted():
        with pytest.raises(ConfigError, match="CUDA|triton"):
            make_module(backend="fused").eval()(x, 4)
    with pytest.raises(ConfigError, match="key gating only|triton"):
        make_module(backend="fused", gate="value").eval()(x, 4)
