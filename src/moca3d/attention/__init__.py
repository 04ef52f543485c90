"""Mixture-of-Components attention: router, routing, local mask, backends."""
