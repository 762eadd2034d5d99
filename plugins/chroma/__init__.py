"""Chroma 1 (Lodestone Labs' de-distilled Flux.1 Schnell derivative) for tuner.

``plugin`` holds the hooks (import-cheap), ``model`` the loading, encoding, prediction and
validation code, ``sigmas`` the quadratic tail remap, ``tiny`` a randomly initialised miniature
for tests and examples.
"""
