"""What the Flux lineage (Flux.1 and its derivative Chroma) shares: config keys and LoRA presets
(``keys``) and the ComfyUI format (``formats``), both import-cheap; loading, LoRA targets and
packed prediction (``model``), latent packing, position ids and text masks (``latents``), BFL
names (``bfl``), pipeline text inputs, and tiny components (``tiny``).

Not a plugin itself: family plugins import it.
"""
