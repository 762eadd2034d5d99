"""Stable Diffusion 3 / 3.5 for tuner: ``plugin`` (the manifest, import-cheap), ``model`` (the
implementation: the hooks that need torch and diffusers), ``tiny`` (a random miniature)."""
