"""Where does a generation pipeline lose quality? Three measurements on prepared assets with cached latents.

1. Condition use: the flow loss at fixed times t with the asset's own image, a zero condition (what CFG
   calls unconditional) and another asset's image. A model that reads its image has a clearly lower
   loss with the right one. For a scene model the wrong condition is the scene's own, with the instance
   conditions shifted by one (instance i conditioned on mask i-1): does it read its masks?
2. SDEdit: the GT latents noised to t0 and integrated back to 0 with the model (guided Euler, the
   pipeline's step size), decoded and scored (F-score@0.1 on the fused surface, DESIGN §6). t0 = 0 is the
   VAE round trip; t0 = 1 is generation from pure noise. Where F falls tells which part of the trajectory
   (global layout at high t, detail at low t) the model gets wrong.
3. Decoder robustness: the GT latents plus Gaussian noise of std sigma (in the transformer's unit-scale
   latent units), decoded and scored: how exact must generated latents be?

    python benchmarks/diagnose_model.py data/objects --split train --count 8 --json benchmarks/results/diagnose.json

A scene model (`--model src/moca3d/weights/scene`, prepared scenes) is diagnosed the same way, each
instance conditioned on its own mask; its scores add the instance F-score@0.1 (prediction i vs GT i).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchkit import print_table, run_script, write_json
from moca3d.defaults import GUIDANCE, STEPS


def load_assets(pipe, root: Path, split: str, count: int, max_parts: int = 32):
    """(id, GT meshes, unit-scale latents (N, L, C), condition, transformer kwargs) of the first `count` assets with latents.

    The condition is (1, M, D) for an object model and (1, N, M, D) for a scene model (each instance
    on its own mask; scenes with an instance hidden in the render are skipped, as in evaluate-scenes); the
    kwargs hold the masks' layout (1, N, 8) for a transformer with `layout_features`, else nothing.
    """
    from moca3d.data.dataset import load_cached_latents, read_manifest, require_token_order
    from moca3d.data.scene import component_masks
    from moca3d.geometry.mesh_io import load_components

    out = []
    for rec in read_manifest(root, split):
        asset = root / "assets" / rec["id"]
        if rec["num_components"] <= max_parts and (asset / "latents.safetensors").is_file():
            z, made = load_cached_latents(asset / "latents.safetensors")
            require_token_order(pipe.transformer.token_order, made["token_order"], str(asset))
            z = pipe.vae.normalize_latents(z)
            gt = load_components(asset / "mesh.glb")[0]
            if pipe.is_scene_model:
                masks = component_masks(asset / "mask.png", len(gt))  # (N, H, W)
                if not masks.any(axis=(1, 2)).all():
                    continue
                cond, layout = pipe.scene_condition(asset / "render.png", masks)
            else:
                cond, layout = pipe.encode_image(asset / "render.png"), None
            out.append((rec["id"], gt, z, cond, {} if layout is None else {"layout": layout}))
        if len(out) == count:
            break
    if not out:
        raise SystemExit(f"{root}: no '{split}' assets with cached latents (run `moca3d encode-dataset` first)")
    return out


METRIC_POINTS = 20000  # points per fused surface, as `moca3d evaluate-model`


def fscore(pipe, latents: torch.Tensor, gt, resolution: int, points: int = METRIC_POINTS) -> dict:
    """Decoded unit-scale latents (N, L, C) against the GT: fused-surface F-score@0.1 (0 if all empty), empty parts,
    and for a scene model the instance F-score@0.1 (an empty instance scores 0)."""
    from moca3d.metrics import MetricsConfig, evaluate_scene, surface_metrics

    meshes = pipe.decode_latents(latents, resolution)
    config = MetricsConfig(num_points=points)
    if pipe.is_scene_model:
        m = evaluate_scene(meshes, gt, config)
        return {"fscore@0.1": m["fscore@0.1"], "empty": m["num_empty"], "instance_fscore@0.1": m["instance_fscore@0.1"]}
    parts = [m for m in meshes if len(m.faces)]
    f = surface_metrics(parts, gt, config)["fscore@0.1"] if parts else 0.0
    return {"fscore@0.1": f, "empty": len(meshes) - len(parts)}


def score_rows(key: str, value: float, scores: list[dict]) -> dict:
    """One table row: the setting, the mean scores and each asset's."""
    row = {key: value, "fscore@0.1": float(np.mean([s["fscore@0.1"] for s in scores])), "empty_parts": sum(s["empty"] for s in scores),
           "per_asset": [s["fscore@0.1"] for s in scores]}
    if "instance_fscore@0.1" in scores[0]:
        row["instance_fscore@0.1"] = float(np.mean([s["instance_fscore@0.1"] for s in scores]))
        row["per_asset_instance"] = [s["instance_fscore@0.1"] for s in scores]
    return row


def condition_use(pipe, assets, times, seed: int) -> list[dict]:
    """Mean flow loss at each t with the right, a zero and a wrong condition (the next asset's; a scene's masks shifted)."""
    from moca3d import flow

    conds = [a[3] for a in assets]  # (1, M, D) each
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in times:
        losses = {"right": [], "zero": [], "wrong": []}
        for i, (_, _, z, _, extra) in enumerate(assets):
            z0 = z[None]  # (1, N, L, C)
            noise = torch.randn(z0.shape, generator=g)
            ids = pipe.transformer.sample_ids(1, z0.shape[1], g, pipe.device)
            tt = torch.tensor([t])
            zt = flow.interpolate(z0, noise, tt)
            shifted = {k: v.roll(1, dims=1) for k, v in extra.items()}  # a scene's layout moves with its masks
            if conds[i].dim() == 4:  # scene: instance j on mask j+1 of the same scene
                other = conds[i].roll(1, dims=1) if z0.shape[1] > 1 else torch.zeros_like(conds[i])
            else:
                other = conds[(i + 1) % len(conds)] if len(conds) > 1 else torch.zeros_like(conds[i])
            for key, cond, kw in (("right", conds[i], extra), ("zero", torch.zeros_like(conds[i]), extra), ("wrong", other, shifted)):
                with torch.no_grad():
                    pred = pipe.transformer(zt, tt, cond, ids=ids, **kw)
                losses[key].append(flow.flow_loss(pred, z0, noise).item())
        rows.append({"t": t, **{f"loss_{k}": float(np.mean(v)) for k, v in losses.items()}})
    return rows


def sdedit(pipe, assets, starts, steps: int, guidance: float, resolution: int, seed: int, points: int) -> list[dict]:
    """F-score@0.1 after noising the GT latents to t0 and integrating back with the model."""
    from moca3d import flow

    rows = []
    for t0 in starts:
        scores = []
        for k, (_, gt, z, cond, extra) in enumerate(assets):
            g = torch.Generator().manual_seed(seed + k)
            z0 = z[None]  # (1, N, L, C)
            ids = pipe.transformer.sample_ids(1, z0.shape[1], g, pipe.device)
            ts = torch.linspace(t0, 0.0, max(1, int(round(steps * t0))) + 1)  # the pipeline's step size 1 / steps
            zt = flow.interpolate(z0, torch.randn(z0.shape, generator=g), ts[:1])
            with torch.no_grad():
                for i in range(len(ts) - 1 if t0 > 0 else 0):
                    v = flow.guided_velocity(pipe.transformer, zt, ts[i:i + 1], cond, torch.zeros_like(cond), guidance, ids=ids, **extra)
                    zt = zt + (ts[i + 1] - ts[i]) * v
            scores.append(fscore(pipe, zt[0], gt, resolution, points))
        rows.append(score_rows("t0", t0, scores))
    return rows


def decoder_robustness(pipe, assets, sigmas, resolution: int, seed: int, points: int) -> list[dict]:
    """F-score@0.1 of GT latents plus noise of std sigma (unit-scale latents)."""
    rows = []
    for sigma in sigmas:
        scores = []
        for k, (_, gt, z, _, _) in enumerate(assets):
            g = torch.Generator().manual_seed(seed + k)
            scores.append(fscore(pipe, z + sigma * torch.randn(z.shape, generator=g), gt, resolution, points))
        rows.append(score_rows("sigma", sigma, scores))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="prepared dataset with cached latents (moca3d prepare + encode-dataset)")
    p.add_argument("--model", default=None, help="pipeline folder (default: the built-in model)")
    p.add_argument("--split", default="train", help="split to diagnose (train: does it fit its own data?)")
    p.add_argument("--count", type=int, default=8, help="first COUNT assets of the split")
    p.add_argument("--max-parts", type=int, default=32, help="skip assets with more components")
    p.add_argument("--times", type=float, nargs="*", default=[0.05, 0.2, 0.4, 0.6, 0.8, 0.95],
                   help="flow times t at which the loss is compared: own condition, zero condition, another asset's")
    p.add_argument("--sdedit", type=float, nargs="*", default=[0.0, 0.3, 0.6, 0.9, 1.0],
                   help="start times t0: GT latents noised to t0, integrated back with the model, scored (1.0 = pure noise)")
    p.add_argument("--noise", type=float, nargs="*", default=[0.0, 0.1, 0.2, 0.3, 0.5],
                   help="std of Gaussian noise added to the GT latents before decoding (the decoder's tolerance)")
    p.add_argument("--steps", type=int, default=STEPS, help="sampling steps over [0, 1] (SDEdit uses the same spacing)")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--resolution", type=int, default=96, help="marching-cubes resolution per component")
    p.add_argument("--metric-points", type=int, default=METRIC_POINTS, help="points per fused surface for the F-score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from moca3d.pipeline import MoCAPipeline

    pipe = MoCAPipeline.from_pretrained(args.model)
    assets = load_assets(pipe, args.data, args.split, args.count, args.max_parts)
    t0 = time.time()
    report = {"model": args.model or "built-in", "split": args.split, "assets": [a[0] for a in assets],
              "steps": args.steps, "guidance": args.guidance, "resolution": args.resolution,
              "metric_points": args.metric_points}
    report["condition_use"] = condition_use(pipe, assets, args.times, args.seed)
    scene = pipe.is_scene_model
    report["scene_model"] = scene
    print_table(report["condition_use"], [("t", "t", "{:.2f}"), ("loss, own image", "loss_right", "{:.4f}"),
                                          ("loss, zero condition", "loss_zero", "{:.4f}"),
                                          ("loss, masks shifted" if scene else "loss, another image", "loss_wrong", "{:.4f}")])
    scores = [("F@0.1", "fscore@0.1", "{:.3f}")] + ([("instance F@0.1", "instance_fscore@0.1", "{:.3f}")] if scene else [])
    scores.append(("empty parts", "empty_parts", "{}"))
    report["sdedit"] = sdedit(pipe, assets, args.sdedit, args.steps, args.guidance, args.resolution, args.seed, args.metric_points)
    print_table(report["sdedit"], [("SDEdit from t0", "t0", "{:.2f}")] + scores)
    report["decoder_noise"] = decoder_robustness(pipe, assets, args.noise, args.resolution, args.seed, args.metric_points)
    print_table(report["decoder_noise"], [("latent noise std", "sigma", "{:.2f}")] + scores)
    report["seconds"] = time.time() - t0
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    run_script(main)
