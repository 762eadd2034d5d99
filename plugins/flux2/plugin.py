"""Flux.2's manifest: the family, its config keys and LoRA formats. Import-cheap; the hooks that
load, encode, predict and render live in ``tuner.plugins.flux2.model``.

Flux.2 dev: Mistral Small 3.1 as text encoder (Flux2Pipeline), a guidance embedding (distilled
guidance). Flux.2 klein 4B / 9B base: Qwen3 (Flux2KleinPipeline), no guidance embedding, real CFG.
Both: 128-channel latents (the VAE's 32 channels in 2x2 patches, batch-normalised), a 1x1-patch
transformer with double blocks and fused single blocks; docs/flux2.md has the semantics and their
sources."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.api import ConfigKey, FamilyInfo, manifest_hooks
from tuner.plugins.fluxlike import keys as fluxlike
from tuner.plugins.fluxlike.formats import comfyui_format

DOUBLE_ATTENTION = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
# a single block's two Linears each fuse attention and MLP (q, k, v, MLP in; attention, MLP out)
SINGLE = ["attn.to_qkv_mlp_proj", "attn.to_out"]
MLP = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
# shared by every block of a kind: a LoRA here changes all of them at once
MODULATION = [
    "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear",
    "single_stream_modulation.linear",
]
EMBEDDERS = ["x_embedder", "context_embedder", "proj_out", "norm_out.linear"]
# no preset touches the timestep and guidance embedding (time_guidance_embed): it conditions every
# modulation; list its Linears by name to adapt it anyway
PRESETS = {
    "attention": DOUBLE_ATTENTION + SINGLE,
    "attention+mlp": DOUBLE_ATTENTION + SINGLE + MLP,
    "all-linear": DOUBLE_ATTENTION + SINGLE + MLP + MODULATION + EMBEDDERS,
}

FAMILY = FamilyInfo(
    name="flux2",
    description="Flux.2 dev (Mistral Small 3.1) and klein 4B / 9B base (Qwen3)",
    flavours={
        "dev": "black-forest-labs/FLUX.2-dev",
        "klein-4b": "black-forest-labs/FLUX.2-klein-base-4B",
        "klein-9b": "black-forest-labs/FLUX.2-klein-base-9B",
    },
    default_flavour="dev",
    transformer_class="diffusers.Flux2Transformer2DModel",
    vae_class="diffusers.AutoencoderKLFlux2",
    scheduler_class="diffusers.FlowMatchEulerDiscreteScheduler",
    pipeline_class="diffusers.Flux2Pipeline",  # its LoRA loader (Flux2LoraLoaderMixin) is klein's too
    other_pipeline_classes=("diffusers.Flux2KleinPipeline",),
    # diffusers' Flux.2 loader reads lora_alpha from the file's metadata, not from .alpha tensors
    lora_alpha_in="metadata",
    comfyui_reads_diffusers_files=False,  # ComfyUI 0.3 maps Flux.2 through Flux.1's diffusers names
    text_encoders=("text_encoder",),
    required_text_keys=("prompt_embeds",),
    text_cache_keys=("tokenizer_max_length",),
    text_encoding="flux2-pipeline-encode-prompt-v1",
    latent_layout=(128, 16),
    lora_target_key="flux2_lora_target",
    lora_presets=PRESETS,
    high_precision=(
        "x_embedder",
        "context_embedder",
        "proj_out",
        "norm_out",
        "time_guidance_embed",
        *(m.removesuffix(".linear") for m in MODULATION),
    ),
    # the pipelines shift by image size (compute_empirical_mu); training does too unless told otherwise
    defaults={"flow_schedule_auto_shift": True},
    implementation="tuner.plugins.flux2.model",
)

KEYS = (
    ConfigKey(
        "flux2_lora_target",
        "str_or_list",
        "attention+mlp",
        "LoRA targets: attention, attention+mlp or all-linear, or a list of module names.",
        choices=tuple(PRESETS),
        ask=True,
        resume_critical=True,
        group="LoRA",
    ),
    ConfigKey(
        "tokenizer_max_length",
        "int",
        512,
        "Text tokens per caption, chat template included (the pipelines' 512).",
        minimum=1,
        recipe=True,
    ),
    *fluxlike.GUIDANCE_KEYS,  # the distilled guidance dev trains with (klein has no guidance embedding)
    ConfigKey(
        "validation_guidance",
        "float",
        4.0,
        "Guidance at validation: distilled guidance for dev, real CFG with the negative prompt for klein.",
        minimum=0,
        recipe=True,
        group="validation",
    ),
)


register_families, register_config_keys, register_lora_formats = manifest_hooks(FAMILY, KEYS, [comfyui_format("flux2")])


@hookimpl
def check_config(config, warn):
    fluxlike.check_guidance_range(config)
