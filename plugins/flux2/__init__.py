"""Flux.2 (dev and klein) for tuner, written as a third-party family would be: ``plugin`` (the
manifest, import-cheap), ``model`` (the hooks that need torch and diffusers), ``tiny`` (a random
miniature). It uses tuner's public API (``tuner.core.api``, ``tuner.testing``) and the Flux lineage's
shared module (``tuner.plugins.fluxlike``: guidance keys, the ComfyUI layout)."""
