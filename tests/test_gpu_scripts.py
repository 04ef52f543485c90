"""scripts/gpu: the latent-cache transport round trip, the pipeline assembly from fp16 weights, and what session.sh
needs on the GPU image: a script that parses, imports without the packages the image lacks, and benchmarks that keep
their records when a timeout stops them."""

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
GPU_IMAGE_LACKS = ("mcubes", "fpsample", "fast_simplification", "embreex", "gradio")  # not in the image, no wheels


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transport_round_trip_keeps_images_exact_and_latents_within_a_step(tmp_path):
    transport = load("transport")
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([2, 5, 3])
    latents = torch.randn(int(counts.sum()), 16, 4, generator=g) * 3.7 + 1.0  # (P, L, C), the raw latent scale
    images = torch.randint(0, 256, (3, 3, 8, 8), generator=g, dtype=torch.uint8)
    cache = tmp_path / "cache.safetensors"
    ids = ["a", "b", "c"]
    save_file({"latents": latents, "counts": counts, "images": images}, str(cache), metadata={"ids": json.dumps(ids), "kind": "moca3d-latent-cache"})
    transport.pack(cache, tmp_path / "cache.xz")
    transport.unpack(tmp_path / "cache.xz", tmp_path / "back.safetensors")
    back = load_file(str(tmp_path / "back.safetensors"))
    assert torch.equal(back["images"], images) and torch.equal(back["counts"], counts)
    span = (latents.amax(dim=1) - latents.amin(dim=1))[:, None]  # (P, 1, C)
    err = back["latents"] - latents
    fp16 = 2 * latents.abs().amax(dim=1, keepdim=True) * 2**-11  # the fp16 rounding of min and max
    assert (err.abs() <= span / 510 + fp16).all(), "within half an 8-bit step: rounded to the nearest code"
    assert err.mean().abs() < (span / 2550).mean(), "unbiased (flooring would be off by half a step on average)"
    # keeping the first assets keeps their parts only
    transport.pack(cache, tmp_path / "two.xz", max_assets=2)
    transport.unpack(tmp_path / "two.xz", tmp_path / "two.safetensors")
    two = load_file(str(tmp_path / "two.safetensors"))
    assert two["latents"].shape[0] == 7 and two["images"].shape[0] == 2


def test_transport_carries_a_scene_cache_with_its_instance_masks(tmp_path):
    from moca3d.data.dataset import SCENE_CACHE, save_latent_cache
    from moca3d.data.scene import SceneLatentDataset

    transport = load("transport")
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(n, 16, 4, generator=g) for n in (3, 1, 2)]  # (N, L, C) per scene
    scenes = torch.randint(0, 256, (3, 3, 8, 8), generator=g, dtype=torch.uint8)  # (A, 3, S, S)
    masks = torch.randint(0, 256, (6, 8, 8), generator=g, dtype=torch.uint8)  # (sum N, S, S)
    cache = save_latent_cache(tmp_path / "scenes.safetensors", SCENE_CACHE, latents, ["a", "b", "c"], "fps", images=scenes, masks=masks)
    transport.pack(cache, tmp_path / "scenes.xz", max_assets=2)
    transport.unpack(tmp_path / "scenes.xz", tmp_path / "back.safetensors")
    back = SceneLatentDataset.from_cache(tmp_path / "back.safetensors")
    assert back.ids == ["a", "b"] and [len(m) for m in back.masks] == [3, 1]
    assert torch.equal(torch.cat(back.masks), masks[:4]) and torch.equal(torch.stack(back.scenes), scenes[:2])
    for z, want in zip(back.latents, latents):
        span = want.amax(dim=1, keepdim=True) - want.amin(dim=1, keepdim=True)  # (N, 1, C)
        assert ((z - want).abs() <= span / 255).all()


def test_assemble_builds_a_loadable_pipeline_from_fp16_parts(tmp_path):
    from moca3d.models.image_encoder import ImageEncoder
    from moca3d.models.transformer import MoCATransformer
    from moca3d.models.vae import VecSetVAE
    from moca3d.pipeline import MoCAPipeline

    torch.manual_seed(0)
    vae = VecSetVAE(num_latents=16, latent_channels=4, width_encoder=32, width_decoder=32, num_attention_heads=4,
                    num_layers_encoder=1, num_layers_decoder=1, embed_frequency=4)
    vae.save_pretrained(tmp_path / "vae")
    encoder = ImageEncoder(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4)
    transformer = MoCATransformer(in_channels=4, num_latents=16, width=32, num_layers=2, num_heads=4, cond_dim=32, compression=4)
    transformer.half().save_pretrained(tmp_path / "parts" / "transformer")
    encoder.half().save_pretrained(tmp_path / "parts" / "image_encoder")
    with tarfile.open(tmp_path / "moc.tar", "w") as tar:
        for name in ("transformer", "image_encoder"):
            tar.add(tmp_path / "parts" / name, arcname=name)
    out = load("assemble").assemble(tmp_path / "moc.tar", tmp_path / "vae", tmp_path / "pipeline")
    pipe = MoCAPipeline.from_pretrained(out)
    assert next(pipe.transformer.parameters()).dtype == torch.float32, "fp16 files load as fp32"
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, transformer.state_dict()[k].float()), k


def test_export_init_writes_an_fp16_pipeline_that_loads_back_within_fp16_rounding(tmp_path):
    from moca3d.models.image_encoder import ImageEncoder
    from moca3d.models.transformer import MoCATransformer
    from moca3d.models.vae import VecSetVAE
    from moca3d.pipeline import MoCAPipeline

    torch.manual_seed(0)
    vae = VecSetVAE(num_latents=16, latent_channels=4, width_encoder=32, width_decoder=32, num_attention_heads=4,
                    num_layers_encoder=1, num_layers_decoder=1, embed_frequency=4)
    encoder = ImageEncoder(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4)
    transformer = MoCATransformer(in_channels=4, num_latents=16, width=32, num_layers=2, num_heads=4, cond_dim=32, compression=4)
    MoCAPipeline(vae, transformer, encoder).save_pretrained(tmp_path / "full")
    out = load("assemble").export_init(tmp_path / "full", tmp_path / "init")
    sizes = {p.parent.name: p.stat().st_size for p in out.glob("*/diffusion_pytorch_model.safetensors")}
    full = {p.parent.name: p.stat().st_size for p in (tmp_path / "full").glob("*/diffusion_pytorch_model.safetensors")}
    assert set(sizes) == {"vae", "transformer", "image_encoder"}
    assert all(sizes[k] < 0.6 * full[k] for k in sizes), "weights stored in fp16"
    pipe = MoCAPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor == vae.config.scaling_factor
    for k, v in pipe.transformer.state_dict().items():
        want = transformer.state_dict()[k]
        assert v.dtype == want.dtype and torch.allclose(v, want, rtol=1e-3, atol=1e-4), k


@pytest.mark.parametrize("script", ["session.sh", "make_inputs.sh"])
def test_session_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu" / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_session_imports_without_the_packages_the_gpu_image_lacks():
    """What session.sh runs there (python -m moca3d train, transport.py unpack, the fp16 export, the benchmarks) imports
    with GPU_IMAGE_LACKS unimportable: a top-level import of one would end every GPU training at its start."""
    code = f"""
import runpy, sys
for name in {GPU_IMAGE_LACKS!r}:
    sys.modules[name] = None  # `import name` raises ImportError, as on the GPU image
sys.path[:0] = ["benchmarks", "scripts/gpu"]  # as session.sh's PYTHONPATH, and transport.py's folder
import moca3d.cli, moca3d.pipeline, moca3d.training.train_dit, moca3d.models.image_encoder, moca3d.models.transformer
import memory, attention, forward, transport
sys.argv = ["moca3d", "train", "--help"]
try:
    runpy.run_module("moca3d", run_name="__main__")  # python -m moca3d train: the verbs registered, the train verb parsed
except SystemExit as done:
    assert done.code == 0, done.code
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


class FakeServer:
    """memory.Server without processes: every step peaks 1 MiB over a zero baseline."""

    def __init__(self, threads: int):
        pass

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, spec: dict) -> dict:
        return {"static_bytes": 0, "baseline_bytes": 0, "peak_bytes": 2**20, "params": 0, "method": "fake"}


TINY = {"num_latents": 8, "in_channels": 4, "width": 16, "num_layers": 2, "num_heads": 2, "cond_dim": 8, "compression": 4, "id_codebook_size": 8}


@pytest.mark.parametrize("script, argv, counts", [  # counts: the records in the file after each write
    ("memory", ["--n", "2", "3", "--batch", "1", "--config", "CONFIG", "--device", "cpu"], [1, 2, 3, 4]),  # one per (N, mode)
    ("attention", ["--n", "2", "3", "--L", "16", "--dim", "32", "--heads", "2", "--repeats", "1", "--backends", "reference",
                   "--no-backward", "--device", "cpu"], [1, 2]),  # one per N
    ("forward", ["--n", "2", "3", "--config", "CONFIG", "--repeats", "1", "--device", "cpu"], [2, 4]),  # an N's MoCA and dense
])
def test_session_benchmarks_rewrite_their_json_after_every_record(script, argv, counts, tmp_path, monkeypatch):
    """memory.py, attention.py and forward.py rewrite --json quietly after each record (a `timeout` kill keeps those
    done), then once more at the end with its "wrote" line."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    module = load_benchmark(script)
    if script == "memory":
        monkeypatch.setattr(module, "Server", FakeServer)
    writes = []  # (records in the file just written, quiet)

    def write_json(path, data, quiet=False, real=module.write_json):
        real(path, data, quiet=quiet)
        on_disk = json.loads(Path(path).read_text())
        writes.append((len(on_disk if isinstance(on_disk, list) else on_disk["records"]), quiet))

    monkeypatch.setattr(module, "write_json", write_json)
    module.main([str(config) if a == "CONFIG" else a for a in argv] + ["--json", str(tmp_path / "out.json")])
    assert writes == [(n, True) for n in counts] + [(counts[-1], False)]
