"""Converters, one per Stable Diffusion component, over the shared steps in `common`."""
