"""Flux.1's hooks (its ``FamilyInfo.implementation``, registered with the family when a run
selects it): two text encoders, guidance, sigma schedules and FluxPipeline validation."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from tuner.core import hookimpl
from tuner.core.api import PluginError, first_line, flow, model_source, partial_pipeline, render
from tuner.plugins.flux.plugin import FAMILY
from tuner.plugins.fluxlike import latents as fl
from tuner.plugins.fluxlike import model as shared

# schnell's distillation schedule: sigma 1.0 seven times in ten, else 0.75, 0.5 or 0.25
FAST_SCHEDULE = (1.0,) * 7 + (0.75, 0.5, 0.25)


@dataclass
class ClipT5Encoders:
    clip_tokenizer: Any
    clip: Any
    t5_tokenizer: Any
    t5: Any

    def to(self, device: Any) -> ClipT5Encoders:
        self.clip.to(device)
        self.t5.to(device)
        return self


@hookimpl
def load_model(config: Any, component: str, dtype: torch.dtype) -> Any:
    if component != "text_encoders":
        return None  # the core loads the classes FAMILY declares
    from transformers import CLIPTextModel, T5EncoderModel

    def text_encoders(hub: Any) -> ClipT5Encoders:
        return ClipT5Encoders(
            hub.tokenizer("tokenizer"),
            hub.encoder(CLIPTextModel, "text_encoder"),
            hub.tokenizer("tokenizer_2"),
            hub.encoder(T5EncoderModel, "text_encoder_2"),
        )

    return shared.load_text_encoders(FAMILY, config, dtype, text_encoders)


@hookimpl
def encode_prompts(
    text_encoders: ClipT5Encoders, prompts: list[str], config: Any, device: Any
) -> dict[str, torch.Tensor]:
    """As FluxPipeline encodes: CLIP's pooled output, and T5 run without a mask."""
    encoders = text_encoders
    clip_tokens = encoders.clip_tokenizer(
        prompts,
        padding="max_length",
        max_length=encoders.clip_tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    pooled = encoders.clip(clip_tokens.input_ids.to(device), output_hidden_states=False).pooler_output
    t5_tokens = encoders.t5_tokenizer(
        prompts, padding="max_length", max_length=config.tokenizer_max_length, truncation=True, return_tensors="pt"
    )
    embeds = encoders.t5(t5_tokens.input_ids.to(device), output_hidden_states=False)[0]
    return {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "attention_mask": t5_tokens.attention_mask.to(device).bool(),
    }


@functools.lru_cache(maxsize=8)
def _scheduler_constants(source: str, revision: str | None) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler", revision=revision))
    except (OSError, ValueError) as exc:
        raise PluginError(f"flux: cannot read the scheduler config of {source!r}: {first_line(exc)}") from None


@hookimpl
def example_text(config: Any, transformer: Any, batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return shared.t5_example_text(config, transformer, batch_size, dtype, pooled=True)


@hookimpl
def high_precision_modules(transformer: torch.nn.Module) -> list[str]:
    # FAMILY.high_precision, and every norm (Flux's differ from Chroma's: they are Linear here)
    return [name for name, _ in transformer.named_modules() if name in FAMILY.high_precision or ".norm" in name]


@hookimpl
def sample_sigmas(
    config: Any, batch_size: int, latent_shape: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    if config.flux_fast_schedule:
        index = torch.randint(len(FAST_SCHEDULE), (batch_size,), generator=generator)
        return torch.tensor(FAST_SCHEDULE)[index]
    constants = None
    if config.flow_schedule_auto_shift:  # diffusers' calculate_shift constants, from the model itself
        constants = _scheduler_constants(model_source(config, FAMILY.flavours), config.revision)
    return flow.sample_shifted_logit_normal(config, batch_size, latent_shape, generator, constants)


@hookimpl
def predict_flow(transformer, noisy_latents, sigmas, text, config, generator) -> torch.Tensor:
    batch, device = noisy_latents.shape[0], noisy_latents.device
    embeds, text_mask = fl.conditioning(text, config.flux_t5_padding)
    extra: dict[str, Any] = {"pooled_projections": text["pooled_prompt_embeds"].to(noisy_latents.dtype)}
    if shared.unwrap(transformer).config.guidance_embeds:  # dev has a guidance embedding, schnell none
        extra["guidance"] = shared.guidance_values(config, batch, generator).to(device)
    if config.flux_attention_masked_training:
        tokens = (noisy_latents.shape[-2] // 2) * (noisy_latents.shape[-1] // 2)
        extra["joint_attention_kwargs"] = {"attention_mask": fl.joint_mask(text_mask, tokens)[:, None, None, :]}
    return shared.predict_packed(transformer, noisy_latents, sigmas, embeds, **extra)


@hookimpl
def generate_images(request: Any) -> list[Any]:
    """FluxPipeline: ``validation_guidance`` as distilled guidance (dev), ``validation_guidance_real`` > 1
    as real CFG with the negative prompt."""
    from diffusers import FluxPipeline

    config = request.config
    pipe = partial_pipeline(FluxPipeline, scheduler=request.scheduler, vae=request.vae, transformer=request.transformer)
    negative: dict[str, Any] = {}
    if config.validation_guidance_real > 1 and request.negative_text is not None:
        negative = {
            "negative_prompt_embeds": fl.conditioning(request.negative_text, config.flux_t5_padding)[0],
            "negative_pooled_prompt_embeds": request.negative_text["pooled_prompt_embeds"],
        }

    def per_prompt(text: dict[str, torch.Tensor]) -> dict[str, Any]:
        embeds, mask = fl.conditioning(text, config.flux_t5_padding)
        inputs = {"prompt_embeds": embeds, "pooled_prompt_embeds": text["pooled_prompt_embeds"], **negative}
        if config.flux_attention_masked_training:  # only without real CFG (check_config)
            joint = fl.joint_mask(mask, shared.image_tokens(request.height, request.width))
            inputs["joint_attention_kwargs"] = {"attention_mask": joint[:, None, None, :]}
        return inputs

    return render(
        pipe,
        request,
        per_prompt,
        guidance_scale=config.validation_guidance,
        true_cfg_scale=config.validation_guidance_real,
        max_sequence_length=config.tokenizer_max_length,
    )


@hookimpl
def export_full_model(transformer, config):
    """model_type: full: flux_comfyui.safetensors, BFL's single-file layout (ComfyUI, from_single_file)."""
    return shared.export_full_model(transformer, "flux")
