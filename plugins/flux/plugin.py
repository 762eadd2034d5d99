"""Flux.1's hooks. For now the family is registered (flavours, shared keys) so it is listed and
selectable; loading is not implemented yet and says so in one line."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.errors import PluginError
from tuner.core.types import FamilyInfo
from tuner.plugins.fluxlike import keys as shared

FAMILY = FamilyInfo(
    name="flux",
    description="Flux.1 dev / schnell (CLIP-L + T5-XXL) [not trainable yet]",
    flavours={"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell"},
    default_flavour="dev",
    required_text_keys=("prompt_embeds", "attention_mask", "pooled_prompt_embeds"),
)

PRESETS = {
    **shared.PRESETS,
    "tiny": ["single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"],
    "nano": ["single_transformer_blocks.7.proj_out"],
}


@hookimpl
def register_families(register):
    register(FAMILY)


@hookimpl
def register_config_keys(register):
    for key in (shared.lora_target_key(PRESETS), shared.T5_PADDING, *shared.GUIDANCE_KEYS, shared.FAST_SCHEDULE):
        register(key)


@hookimpl
def load_model(config, component):
    raise PluginError("the flux family is registered but cannot train yet; use --plugin chroma")
