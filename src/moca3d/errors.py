"""User-facing errors: one clear line, no deep stack trace from the CLI."""


class MoCA3DError(Exception):
    """Base class of errors caused by bad input or configuration (shown as one line)."""


class InputError(MoCA3DError, ValueError):
    """A user-supplied file, image, mask or mesh is unusable."""


class ConfigError(MoCA3DError, ValueError):
    """A configuration value is out of range or inconsistent."""


class CheckpointError(MoCA3DError, ValueError):
    """A checkpoint is missing, mis-shaped, or contains non-finite values."""
