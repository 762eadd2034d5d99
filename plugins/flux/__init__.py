"""Flux.1 (dev, schnell) for tuner.

``plugin`` holds the hooks (import-cheap), ``model`` loading, encoding, guidance, sigma schedules,
prediction and validation; ``tiny`` a random miniature for tests and examples. What Flux shares
with Chroma lives in ``tuner.plugins.fluxlike``.
"""
