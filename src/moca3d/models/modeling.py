"""What the project's diffusers-style models share: a save that never leaves a folder looking complete when it is not."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from moca3d.errors import InputError


class AtomicSaveMixin:
    """Put before ModelMixin: `save_pretrained` with config.json as the mark of a complete folder."""

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """diffusers' `save_pretrained` with config.json as the mark of a complete folder (a model folder is also loaded
        on its own: `--model runs/vae/vae`, a recipe's image_encoder_from). The files are written in a hidden folder
        inside it first; then config.json is removed, the weights renamed into place, and config.json last: a save
        killed midway leaves the earlier model or a folder without config.json, never config.json beside missing,
        partial or older weights."""
        final = Path(save_directory)
        if final.exists() and not final.is_dir():
            raise InputError(f"cannot write the model folder {final}: a file is in the way")
        final.mkdir(parents=True, exist_ok=True)
        for stale in final.glob(".saving.*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".saving.", dir=final))
        try:
            super().save_pretrained(tmp, *args, **kwargs)
            files = sorted((p for p in tmp.iterdir() if p.is_file()), key=lambda p: p.name == self.config_name)  # config last
            mode = (tmp / self.config_name).stat().st_mode & 0o777  # written with open(): the user's umask
            for path in files:  # on disk before any rename
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(path, mode)  # diffusers writes the weights through a 0600 temporary file: as config.json instead
            (final / self.config_name).unlink(missing_ok=True)  # incomplete from here until the new config.json is in
            for path in files:
                os.replace(path, final / path.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
