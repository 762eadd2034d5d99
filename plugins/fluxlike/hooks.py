"""Hooks every Flux-lineage family shares: the ComfyUI LoRA format. Family plugins import these
names into their hook module, so pluggy registers them as that plugin's own. Import-cheap."""

from __future__ import annotations

from tuner.core import hookimpl

COMFYUI = "comfyui"
COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"


@hookimpl
def lora_formats():
    return [COMFYUI]


@hookimpl
def export_lora(export, lora_format, transformer):
    if lora_format != COMFYUI:
        return None
    from tuner.plugins.fluxlike import bfl

    return {COMFYUI_FILE: bfl.export_comfyui(export.state_dict, export.alphas, export.rank, transformer)}


@hookimpl
def read_lora(path, lora_format, transformer):
    if lora_format != COMFYUI:
        return None
    from safetensors.torch import load_file

    from tuner.core.types import LoraReading
    from tuner.plugins.fluxlike import bfl

    deltas, unmatched = bfl.read_comfyui(load_file(path), transformer)
    return LoraReading(deltas, unmatched)


def t5_example_text(config, transformer, batch_size, dtype, pooled: bool) -> dict:
    """``example_text`` for the Flux lineage: T5 embeddings and their mask, and for Flux the
    pooled CLIP vector. A plain function (not a hook): each family's hook calls it."""
    import torch

    tokens, model = config.tokenizer_max_length, transformer.config
    text = {
        "prompt_embeds": torch.zeros(batch_size, tokens, model.joint_attention_dim, dtype=dtype),
        "attention_mask": torch.ones(batch_size, tokens, dtype=torch.bool),
    }
    if pooled:
        text["pooled_prompt_embeds"] = torch.zeros(batch_size, model.pooled_projection_dim, dtype=dtype)
    return text
