"""Geometry toolkit: mesh I/O and normalisation, surface sampling, inside tests, rendering."""
