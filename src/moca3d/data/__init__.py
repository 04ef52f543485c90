"""Datasets: the procedural generator, `moca3d prepare`, and torch Datasets over its output."""
