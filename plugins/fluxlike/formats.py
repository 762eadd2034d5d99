"""The ComfyUI LoRA format the Flux lineage writes and reads (BFL module names, q/k/v fused).
Import-cheap: the family manifests register it; the work is imported when a file is written or read."""

from __future__ import annotations

from tuner.core.api import LoraFormat

COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"


def comfyui_format(generation: str) -> LoraFormat:
    """The ``comfyui`` format for a generation's BFL names (``flux1``: Flux.1 and Chroma; ``flux2``)."""

    def export(export, transformer):
        from tuner.plugins.fluxlike import bfl

        state = bfl.export_comfyui(export.state_dict, export.alphas, export.rank, transformer, bfl.NAMES[generation])
        return {COMFYUI_FILE: state}

    def read(path, transformer, family):
        from safetensors.torch import load_file

        from tuner.core.api import LoraReading
        from tuner.plugins.fluxlike import bfl

        deltas, unmatched = bfl.read_comfyui(load_file(path), transformer, bfl.NAMES[generation])
        return LoraReading(deltas, unmatched)

    return LoraFormat(
        "comfyui",
        f"{COMFYUI_FILE}: BFL names under diffusion_model., q/k/v fused into qkv/linear1 (ComfyUI's loader)",
        export=export,
        read=read,
        detect=lambda keys: any(k.startswith("diffusion_model.") for k in keys),
        # fused q/k/v hold one LoRA of rank 3r, and a DoRA's dora_scale per fused row; a Kronecker or
        # Hadamard product per q/k/v cannot be fused into one
        layouts=("lora",),
    )


COMFYUI = comfyui_format("flux1")
