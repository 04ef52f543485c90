"""Turn a GPU session's <variant>.tar (fp16 transformer + image encoder) into a pipeline folder.

    python scripts/gpu/assemble.py moc.tar --vae src/moca3d/weights/default/vae -o runs/gpu/moc/pipeline

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("archive", type=Path)
    p.add_argument("--vae", type=Path, required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    print(assemble(args.archive, args.vae, args.output))


if __name__ == "__main__":
    main()
