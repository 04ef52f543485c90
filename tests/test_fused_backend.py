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

from moca3d.attention import MoCAttention, MoCAttentionConfig, route
from moca3d.attention.backends.reference import moc_attention_reference
from moca3d.attention.backends import fused
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
def test_gradients_match_with_one_routing_shared_by_all_heads_unaligned_latents_and_unequal_tiles(monkeypatch):
    """multihead_routing=False (the gate is broadcast over heads), L_z = 17 (a timestep token), and tiles as on
    CUDA: query and key tiles of different sizes, and different ones in each kernel."""
    tiles = {"fwd": fused.Tiles(16, 32), "dq": fused.Tiles(32, 16), "dkv": fused.Tiles(16, 32)}
    monkeypatch.setattr(fused, "kernel_tiles", lambda device, block_size: tiles)
    m = make_module(multihead_routing=False).train()
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


@in_child
def test_half_precision_kernels_match_fp32_reference():
    """fp16 q, k, v (the low-precision path: probabilities cast for the P V product, fp16 gradients) against the fp32
    reference on the same values: within fp16's precision (2e-3 absolute on outputs and gradients of O(1), 5e-3 on
    the gate's, whose entries reach ~6). The interpreter miscomputes bf16 (a bare bf16 dot is off by 1e10 there), so
    bf16 is checked on a GPU only; the diagonal of o is the constant 1 (Router), so its gradient is compared off it."""
    cfg = MoCAttentionConfig(dim=32, num_heads=2, block_size=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2, n, 16, generator=g).half().float() for n in (21, 20, 20))  # (B, N, H, T or S, d)
    gate = torch.rand(1, 2, 4, 4, generator=g)
    gate.diagonal(dim1=2, dim2=3).fill_(1.0)
    weight = torch.randn(q.shape, generator=g)
    results = {}
    for name, fn, dtype in [("reference", moc_attention_reference, torch.float32), ("fused", fused.moc_attention_fused, torch.float16)]:
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = gate.clone().requires_grad_()
        out = fn(*leaves, 16, route(o, cfg), cfg)
        (out.float() * weight).sum().backward()
        results[name] = [out.float()] + [t.grad.float() for t in leaves] + [o.grad]
    off = ~torch.eye(4, dtype=torch.bool)
    for name, got, want in zip(["output", "d q", "d k", "d v"], results["fused"], results["reference"]):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0, msg=name)
    torch.testing.assert_close(results["fused"][4][..., off], results["reference"][4][..., off], atol=5e-3, rtol=0, msg="d gate")


def test_kernels_in_triton_interpreter():
    if not HAS_TRITON:
        pytest.skip("triton is not installed (scripts/setup.sh installs it with the dev extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "not interpreter"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "9 passed, 2 skipped" in proc.stdout, proc.stdout[-2000:]  # the compile tests are skipped there


KERNELS = {"fwd": "_fwd_kernel", "dq": "_dq_kernel", "dkv": "_dkv_kernel"}
POINTERS = {"Kinds": "*i8", "Gates": "*fp32", "Lse": "*fp32", "Delta": "*fp32", "dGates": "*fp32"}
TENSORS = {"Q", "K", "V", "Out", "dOut", "dQ", "dK", "dV"}  # of the inputs' dtype


@pytest.mark.skipif(not HAS_TRITON or interpreted(), reason="needs triton's compiler (not its interpreter)")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("arch,dtype,head_dim", [(90, "bf16", 128), (80, "fp32", 64)])
def test_kernels_compile_for_nvidia_gpus(arch, dtype, head_dim):
    """Each kernel with its CUDA tiles lowers to a cubin for sm_90 (H100/H200) and sm_80 (A100): Triton's
    compiler and its bundled ptxas, no GPU needed. Catches what the interpreter accepts and the compiler does not."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton

    q = torch.empty(1, 2, 2, 21, head_dim, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    for name, tiles in fused.CUDA_TILES.items():
        kernel = getattr(fused, KERNELS[name])
        args = fused.kernel_args(q, q[:, :, :, :20], 16, tiles)
        options = {"num_warps": args.pop("num_warps"), "num_stages": args.pop("num_stages")}
        constants = {key: args[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "PRECISION")}
        signature = {}
        for arg in kernel.arg_names:
            if arg in constants:
                signature[arg] = "constexpr"
            elif arg in POINTERS:
                signature[arg] = POINTERS[arg]
            elif arg == "sm_scale":
                signature[arg] = "fp32"
            elif arg in TENSORS:
                signature[arg] = f"*{dtype}"
            else:
                signature[arg] = "i32"
        source = ASTSource(fn=kernel, signature=signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        assert compiled.asm["cubin"], f"{name}: no cubin"
        assert compiled.metadata.shared <= 160 * 1024, f"{name}: {compiled.metadata.shared} bytes of shared memory"


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
