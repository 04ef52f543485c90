"""Neural networks: the vecset VAE and the MoC diffusion transformer."""
