"""The benchmark scripts run end to end at tiny sizes and write the documented JSON keys (no timing asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_benchmark_writes_required_keys(tmp_path):
    out = tmp_path / "attention.json"
    load("attention").main(["--n", "2", "4", "--L", "16", "--dim", "32", "--heads", "2", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    records = json.loads(out.read_text())
    assert [r["n"] for r in records] == [2, 4]
    required = {"n", "dense_ms", "moc_ms", "routing_ms", "backend", "context_len", "fwd_bwd_dense_ms", "fwd_bwd_moc_ms"}
    for r in records:
        assert required <= set(r)
        assert r["context_len"] == r["context_len_formula"]
        assert r["dense_ms"] > 0 and r["moc_ms"] > 0


def test_forward_benchmark_writes_required_keys(tmp_path):
    out = tmp_path / "forward.json"
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"num_latents": 16, "in_channels": 4, "width": 32, "num_layers": 2, "num_heads": 2, "cond_dim": 16, "compression": 4}))
    load("forward").main(["--n", "2", "3", "--config", str(config), "--repeats", "1", "--device", "cpu", "--json", str(out)])
    records = json.loads(out.read_text())["records"]
    assert {(r["n"], r["mode"]) for r in records} == {(2, "moca"), (2, "dense"), (3, "moca"), (3, "dense")}
    for r in records:
        assert {"n", "mode", "local_ms", "routing_ms", "global_ms", "total_ms"} <= set(r)
        assert r["total_ms"] >= r["local_ms"] + r["global_ms"]
