"""Move a latent cache (`moca3d cache-latents`) to a machine with a small upload limit, and back.

    python scripts/gpu/transport.py pack CACHE.safetensors -o cache.xz     # here
    python scripts/gpu/transport.py unpack cache.xz -o CACHE.safetensors   # there

`pack` quantises every latent to 8 bits per (part, channel) (min/max over the part's L tokens,
kept in fp16: measured rms error 0.25% of the latents' std, at most 1.2% of a part's range) and compresses the whole
with xz; `unpack` writes a cache that `moca3d train` reads. The 8-bit images, and a scene cache's 8-bit instance
masks (one (S, S) mask per part), travel exactly. It is a transport format for this project's GPU sessions, not a
training input of its own.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moca3d.data.dataset import CACHE_PER_ASSET

QUANTIZED = ("codes", "lo", "hi")  # `quantize`'s arrays: the latents


def quantize(latents: torch.Tensor) -> dict[str, np.ndarray]:
    """(P, L, C) float -> uint8 codes (P, L, C) and per (part, channel) lo, hi (P, C)."""
    lo = latents.amin(dim=1)  # (P, C)
    hi = latents.amax(dim=1)
    scale = (hi - lo).clamp_min(1e-12)
    codes = ((latents - lo[:, None]) / scale[:, None] * 255).round().clamp(0, 255).to(torch.uint8)
    return {"codes": codes.numpy(), "lo": lo.half().numpy(), "hi": hi.half().numpy()}


def dequantize(codes: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> torch.Tensor:
    """Inverse of `quantize` (up to the rounding): (P, L, C) float32."""
    codes, lo, hi = torch.from_numpy(codes), torch.from_numpy(lo).float(), torch.from_numpy(hi).float()
    return lo[:, None] + codes.float() / 255 * (hi - lo)[:, None]


def pack(cache: Path, out: Path, max_assets: int | None = None) -> None:
    """Write the cache `cache` (its first `max_assets` assets) as 8-bit latents and exact uint8 tensors, xz-compressed."""
    with safe_open(str(cache), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # latents, counts, images; a scene cache's masks too
    if max_assets is not None and max_assets < len(tensors["counts"]):  # keep the first assets (ids in order)
        meta = meta | {"ids": json.dumps(json.loads(meta["ids"])[:max_assets])}
        parts = int(tensors["counts"][:max_assets].sum())
        tensors = {k: v[:max_assets] if k in CACHE_PER_ASSET else v[:parts] for k, v in tensors.items()}
    images = tensors.pop("images").permute(0, 2, 3, 1).contiguous().numpy()  # (A, S, S, 3): compresses 15% better
    arrays = quantize(tensors.pop("latents").float()) | {k: v.numpy() for k, v in tensors.items()} | {"images": images}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    out.write_bytes(lzma.compress(buf.getvalue(), preset=6))
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB for {len(arrays['counts'])} assets")


def unpack(packed: Path, out: Path) -> None:
    """Write `pack`'s file back as a latent cache (the latents dequantised to float32)."""
    with np.load(io.BytesIO(lzma.decompress(packed.read_bytes()))) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        tensors = {"latents": dequantize(z["codes"], z["lo"], z["hi"]).contiguous(),  # (P, L, C)
                   "images": torch.from_numpy(z["images"]).permute(0, 3, 1, 2).contiguous()}  # (A, 3, S, S)
        tensors |= {k: torch.from_numpy(z[k]) for k in z.files if k not in ("meta", "images", *QUANTIZED)}  # counts, masks
        save_file(tensors, str(out), metadata=meta)
    print(f"{out}: {tensors['latents'].shape[0]} parts")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("source", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--max-assets", type=int, default=None, help="pack: keep only the first assets (an upload limit)")
    args = p.parse_args()
    if args.action == "pack":
        pack(args.source, args.output, args.max_assets)
    else:
        unpack(args.source, args.output)


if __name__ == "__main__":
    main()
