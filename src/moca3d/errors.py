"""User-facing errors: one clear line, no deep stack trace from the CLI."""

import os
import sys
import warnings


class MoCA3DError(Exception):
    """Base class of errors caused by bad input or configuration (shown as one line)."""


class InputError(MoCA3DError, ValueError):
    """A user-supplied file, image, mask or mesh is unusable."""


class ConfigError(MoCA3DError, ValueError):
    """A configuration value is out of range or inconsistent."""


class CheckpointError(MoCA3DError, ValueError):
    """A checkpoint is missing, mis-shaped, or contains non-finite values."""


class InputWarning(UserWarning):
    """Input that is used but probably not what the model expects (the CLI prints it as one line)."""


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_input(message: str) -> None:
    """An InputWarning attributed to the first caller outside moca3d: a script's own line, not one of ours."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: warn_input's caller
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(PACKAGE_DIR):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, InputWarning, stacklevel=level)


def cannot_write(path, err: OSError) -> InputError:
    """The one-line error of a failed write to `path` (permission, a folder in the way, disk full)."""
    return InputError(f"cannot write {path}: {err.strerror or err}")


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its first line of text, after its type unless it is one of ours."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text if isinstance(err, MoCA3DError) else f"{type(err).__name__}: {text}"


def out_of_memory(err: BaseException) -> bool:
    """True for an allocation failure: MemoryError, torch.OutOfMemoryError, or the CPU allocator's RuntimeError."""
    text = str(err)
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in text \
        or "out of memory" in text.lower()
