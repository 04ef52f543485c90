"""Helpers shared by the benchmark scripts: default model shape, JSON output, tables, peak memory, one-line errors."""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import json
import os
import re
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from moca3d.errors import InputError, MoCA3DError

# The mid-size CPU transformer of the whole-model benchmarks (forward.py, memory.py).
DEFAULT_CONFIG = {"num_latents": 256, "in_channels": 64, "width": 256, "num_layers": 4, "num_heads": 4, "cond_dim": 256, "compression": 8, "id_codebook_size": 128}
COND_TOKENS = 65  # condition tokens per sample (a DINO CLS + 8x8 patch grid)
MIB = 2**20
GIB = 2**30
RSS_SAMPLE_S = 0.002  # RSS sampling period where the peak cannot be reset
CLEAR_REFS_RESET_PEAK = "5"  # /proc/<pid>/clear_refs: reset VmHWM to the current RSS
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # bytes: larger allocations are mmapped (return_freed_memory)


def sync(device: torch.device) -> None:
    """Wait for a GPU's queued work (timings end there); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Median ms of each function, timed in turn within every repeat, so that a shared machine's
    load changes hit all of them alike (side-by-side ratios)."""
    import statistics

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def flow_training_step(model: torch.nn.Module, batch: int, n: int, device: torch.device, dtype: torch.dtype,
                       scene: bool = False, seed: int = 0, autocast: Optional[torch.dtype] = None
                       ) -> Tuple[Callable[..., None], List[torch.Tensor]]:
    """The inputs of one rectified-flow training step of a MoCATransformer (latents (B, N, L, C), timesteps, condition
    tokens, an all-real component mask, IDs, routing seeds; with `scene`, one condition token set per component) and
    `step(b, n)`: forward + flow loss + backward on the first b samples and n components (under autocast to `autocast`
    when given); also the input tensors, for byte counts."""
    from contextlib import nullcontext

    from moca3d.flow import flow_loss, interpolate, sample_timesteps

    config = model.config
    B, N, L, C = batch, n, config.num_latents, config.in_channels
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(B, N, L, C, generator=g).to(device, dtype)  # (B, N, L, C) clean latents
    noise = torch.randn(B, N, L, C, generator=g).to(device, dtype)
    t = sample_timesteps(B, generator=g, device=device)  # (B,)
    zt = interpolate(z0, noise, t)  # (B, N, L, C)
    per_instance = (N,) if scene else ()  # a scene's condition: one token set per instance
    cond = torch.randn(B, *per_instance, COND_TOKENS, config.cond_dim, generator=g).to(device, dtype)  # (B, [N,] T_c, cond_dim)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)  # every component real
    ids = model.sample_ids(B, N, g, device)  # (B, N)
    seeds = torch.arange(B) + seed  # (B,) routing seeds
    F = getattr(config, "layout_features", 0) or 0  # a scene model's mask layout: (B, N, F) in [-1, 1]
    layout = (torch.rand(B, N, F, generator=g) * 2 - 1).to(device) if F else None
    context = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast is not None else nullcontext

    def step(b: int = B, n: int = N) -> None:
        """Forward + flow loss + backward on the first b samples and n components."""
        c = cond[:b, :n] if scene else cond[:b]  # (b, [n,] T_c, cond_dim)
        with context():
            pred = model(zt[:b, :n], t[:b], c, component_mask=mask[:b, :n], ids=ids[:b, :n], routing_seeds=seeds[:b],
                         layout=None if layout is None else layout[:b, :n])  # (b, n, L, C)
        flow_loss(pred, z0[:b, :n], noise[:b, :n], mask[:b, :n]).backward()

    return step, [z0, noise, t, zt, cond, mask, ids]


def load_config(paths: Union[str, Sequence[str], None] = None) -> dict:
    """DEFAULT_CONFIG updated with the MoCATransformer arguments of each JSON file in turn (a path, a list, or None).

    A file may be a model folder's config.json: diffusers' bookkeeping keys ("_class_name", ...) are dropped.
    """
    from moca3d.models.transformer import MoCATransformer

    known = set(inspect.signature(MoCATransformer.__init__).parameters)
    config = dict(DEFAULT_CONFIG)
    for path in [paths] if isinstance(paths, str) else paths or []:
        with open(path) as f:
            try:
                values = json.load(f)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise InputError(f"{path}: expected a JSON object of MoCATransformer arguments")
        values = {k: v for k, v in values.items() if not k.startswith("_")}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{path}: not MoCATransformer arguments: {', '.join(unknown)}")
        config.update(values)
    return config


def write_json(path, data, quiet: bool = False) -> None:
    """Write `data` as indented standard JSON (NaN and infinities as null), atomically (temporary file, then rename);
    quiet: without the "wrote PATH" line (a script that rewrites its file after every record)."""
    from moca3d.training.checkpoints import atomic_write_json

    atomic_write_json(data, path, sort_keys=False)
    if not quiet:
        print(f"wrote {path}")


def named_paths(values: Sequence[str]) -> Dict[str, List[str]]:
    """['name=path', ...] (a repeated command-line option) -> {name: [path, ...]}, names and paths in order."""
    out: Dict[str, List[str]] = {}
    for value in values:
        name, _, path = value.partition("=")
        if not name or not path:
            raise InputError(f"expected NAME=PATH, got {value!r}")
        out.setdefault(name, []).append(path)
    return out


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse's one-line error otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_script(main: Callable[[], object]) -> None:
    """A script's entry point: bad input (moca3d's errors) or a failed read or write ends with one line on stderr and
    exit status 2, as the moca3d CLI, not a stack trace."""
    try:
        main()
    except MoCA3DError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        sys.exit(2)


def print_table(records: Sequence[Dict], cols: Sequence[Tuple[str, str, str]]) -> None:
    """Print records as a " | " table; cols are (header, key, format); a missing value prints "-"."""
    rows = [[fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in cols] for r in records]
    widths = [max([len(name)] + [len(row[i]) for row in rows]) for i, (name, _, _) in enumerate(cols)]
    for cells in [[name for name, _, _ in cols]] + rows:
        print(" | ".join(cell.rjust(w) for cell, w in zip(cells, widths)))


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> Optional[int]:
    """VmHWM (peak RSS since start or the last reset) of this process, None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write(CLEAR_REFS_RESET_PEAK)
    except OSError:
        return False
    return _hwm_bytes() is not None


def return_freed_memory() -> bool:
    """Make glibc serve every allocation above MMAP_THRESHOLD with mmap, returned to the OS when freed, so that the
    RSS follows the live tensors (False where glibc is absent). By default the threshold grows with the blocks freed,
    and freed temporaries below it stay in the heap and in the RSS: a CPU step's peak then read up to 45% high
    (memory.py, MoCA at N = 32 with the math kernel, 1.71 against 1.18 GiB)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def trim_heap() -> None:
    """Collect garbage and hand free heap pages back to the OS, so RSS tracks live allocations."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _sampled_peak(fn: Callable[[], object], base: int) -> int:
    """Peak RSS during fn(), polled by a thread (misses spikes shorter than RSS_SAMPLE_S)."""
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(RSS_SAMPLE_S)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = fn()
    peak[0] = max(peak[0], rss_bytes())
    done.set()
    thread.join()
    del out
    return peak[0]


def measure_peak(fn: Callable[[], object], device: torch.device) -> Tuple[int, int]:
    """(baseline, peak) bytes around one call of `fn`.

    CUDA: allocated bytes before, and the allocator's peak during the call.
    CPU: RSS before (heap trimmed), and the kernel's peak RSS (VmHWM, reset just before the call),
    or the RSS sampled every RSS_SAMPLE_S where the peak cannot be reset; freed blocks leave the RSS
    (return_freed_memory), so the peak is that of the live allocations.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return base, torch.cuda.max_memory_allocated(device)
    return_freed_memory()
    trim_heap()
    base = rss_bytes()
    if not reset_peak_rss():
        return base, _sampled_peak(fn, base)
    out = fn()
    peak = max(_hwm_bytes() or 0, rss_bytes())
    del out
    return base, peak


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory added by one call of `fn` in MiB (see measure_peak)."""
    base, peak = measure_peak(fn, device)
    return (peak - base) / MIB

