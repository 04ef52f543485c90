"""Training loops, checkpoints and EMA."""
