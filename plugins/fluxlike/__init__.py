"""What the Flux lineage (Flux.1 and its derivative Chroma) shares: config keys, LoRA presets
(``keys``, import-cheap) and latent packing, position ids and text masks (``latents``, torch).

Not a plugin itself: family plugins import it.
"""
