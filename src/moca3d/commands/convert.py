"""`moca3d convert triposg|partcrafter SRC_DIR DST_DIR`: released checkpoints -> moca3d pipeline folders."""

from __future__ import annotations

from pathlib import Path

import typer

from moca3d.defaults import DTYPES
from moca3d.errors import ConfigError

GLOBAL_BLOCKS = ("even", "odd", "all", "none")  # moca3d.models.transformer.global_block_indices
DST_HELP = ("Output moca3d pipeline folder (created; an earlier conversion there is replaced, and it loads as a "
            "pipeline only once the conversion has completed). Must not be SRC.")
DTYPE_HELP = "dtype written for the transformer and VAE: fp32, bf16, fp16 (DINOv2 is copied as it is in SRC)."


def _dtype(name: str):
    """'fp32' | 'bf16' | 'fp16' -> torch dtype."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, DTYPES[name])


def check_conversion(dst: Path, num_latents: int, compression: int, global_blocks: str = "even") -> None:
    """The options of a conversion, before any weights are read (one-line ConfigErrors)."""
    from moca3d.commands.common import check_run_folder

    check_run_folder(dst, "DST")
    if num_latents < 1 or compression < 1 or num_latents % compression:
        raise ConfigError(f"--num-latents ({num_latents}) must be a positive multiple of --compression ({compression})")
    if global_blocks not in GLOBAL_BLOCKS:
        raise ConfigError(f"--global-blocks must be one of {', '.join(GLOBAL_BLOCKS)}, got {global_blocks!r}")


def register(app: typer.Typer) -> None:
    """Add the `convert` sub-app to the CLI."""
    sub = typer.Typer(help="Convert released checkpoints (TripoSG, PartCrafter) to moca3d pipeline folders.",
                      no_args_is_help=True)

    @sub.command("triposg")
    def triposg_cmd(
        src: Path = typer.Argument(..., help="TripoSG folder: transformer/, vae/, scheduler/, image_encoder_dinov2/."),
        dst: Path = typer.Argument(..., help=DST_HELP),
        num_latents: int = typer.Option(2048, "--num-latents", help="Latent tokens per component (L)."),
        compression: int = typer.Option(8, "--compression", help="Compression ratio sigma (N_p = L / sigma)."),
        global_blocks: str = typer.Option("even", "--global-blocks",
                                          help="Blocks given MoC (global) attention: even, odd, all, none."),
        dtype: str = typer.Option("fp32", "--dtype", help=DTYPE_HELP),
    ) -> None:
        """TripoSG -> MoCA transformer (N = 1 identical to TripoSG), VAE, scheduler, DINOv2."""
        from moca3d.convert import convert_triposg

        check_conversion(dst, num_latents, compression, global_blocks)
        out = convert_triposg(src, dst, num_latents, compression, _dtype(dtype), global_blocks=global_blocks)
        typer.echo(f"wrote {out}")

    @sub.command("partcrafter")
    def partcrafter_cmd(
        src: Path = typer.Argument(..., help="PartCrafter folder: transformer/, vae/, scheduler/, image_encoder_dinov2/."),
        dst: Path = typer.Argument(..., help=DST_HELP),
        num_latents: int = typer.Option(2048, "--num-latents", help="Latent tokens per component (L)."),
        compression: int = typer.Option(8, "--compression", help="Compression ratio sigma (N_p = L / sigma)."),
        dtype: str = typer.Option("fp32", "--dtype", help=DTYPE_HELP),
    ) -> None:
        """PartCrafter -> transformer in the dense-global mode with its part embedding as ID codebook."""
        from moca3d.convert import convert_partcrafter

        check_conversion(dst, num_latents, compression)
        out = convert_partcrafter(src, dst, num_latents, compression, _dtype(dtype))
        typer.echo(f"wrote {out}")

    app.add_typer(sub, name="convert")
