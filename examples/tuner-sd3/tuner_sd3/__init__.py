"""Stable Diffusion 3 / 3.5 for tuner: ``plugin`` (hooks, import-cheap), ``model`` (heavy), ``tiny``."""
