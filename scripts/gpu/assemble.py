"""Turn a GPU session's <name>.tar (fp16 transformer + image encoder) into a pipeline folder, or the
other way: a pipeline folder into the fp16 copy a GPU session starts from (`--export-init`).

    python scripts/gpu/assemble.py cont.tar --vae src/moca3d/weights/default/vae -o runs/gpu/cont/pipeline
    python scripts/gpu/assemble.py --export-init src/moca3d/weights/default -o .gpu/init
    python scripts/gpu/assemble.py --export-init src/moca3d/weights/scene -o .gpu/scene_init      # scenes
    python scripts/gpu/assemble.py scene_moc.tar --vae src/moca3d/weights/scene/vae -o runs/gpu/scene_moc/pipeline

The transformer and image encoder keep their fp16 weights (loading casts them to fp32); the VAE
and the scheduler are copied from `--vae` and the default scheduler.
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
import tempfile
from pathlib import Path

from moca3d.models.image_encoder import ImageEncoder
from moca3d.models.transformer import MoCATransformer
from moca3d.models.vae import VecSetVAE
from moca3d.pipeline import MoCAPipeline


def assemble(archive: Path, vae_dir: Path, out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        parts = {"transformer": MoCATransformer.from_pretrained(Path(tmp) / "transformer"),
                 "image_encoder": ImageEncoder.from_pretrained(Path(tmp) / "image_encoder")}
        MoCAPipeline(VecSetVAE.from_pretrained(vae_dir), **parts).save_pretrained(out)
        for name in parts:  # keep the fp16 files as they came
            shutil.rmtree(out / name)
            shutil.copytree(Path(tmp) / name, out / name)
    MoCAPipeline.from_pretrained(out)  # loads and passes the finiteness check
    return out


def export_init(pipeline: Path, out: Path) -> Path:
    """A copy of the pipeline folder with fp16 weights (half the upload; loading casts them back to fp32)."""
    pipe = MoCAPipeline.from_pretrained(pipeline)
    for name in ("vae", "transformer", "image_encoder"):
        getattr(pipe, name).half()
    pipe.save_pretrained(out)
    MoCAPipeline.from_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", type=Path, help="<name>.tar from a GPU session, or with --export-init a pipeline folder")
    p.add_argument("--vae", type=Path, default=None, help="the VAE folder of the assembled pipeline")
    p.add_argument("--export-init", action="store_true", help="write an fp16 copy of the pipeline folder ARCHIVE instead")
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    if args.export_init:
        print(export_init(args.archive, args.output))
    elif args.vae is None:
        p.error("--vae is required to assemble a pipeline")
    else:
        print(assemble(args.archive, args.vae, args.output))


if __name__ == "__main__":
    main()
