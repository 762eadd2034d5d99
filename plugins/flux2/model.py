"""Flux.2's hooks (its ``FamilyInfo.implementation``, registered with the family when a run selects
it). Every semantic is the pipelines' own (diffusers' ``pipeline_flux2.py`` and
``pipeline_flux2_klein.py``); docs/flux2.md lists each with its source."""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from tuner.core import hookimpl
from tuner.core.api import flow, model_source, partial_pipeline, render
from tuner.plugins.flux2.plugin import FAMILY
from tuner.plugins.fluxlike import model as fluxlike

KLEIN = "Flux2KleinPipeline"
# the steps whose resolution shift training uses: compute_empirical_mu depends on the step count
# below 4300 image tokens (1024x1024 has 4096), and 50 is both pipelines' default
SHIFT_REFERENCE_STEPS = 50


@functools.lru_cache(maxsize=8)
def _pipeline_name(source: str, revision: str | None) -> str | None:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(source, revision=revision).get("_class_name")
    except (OSError, ValueError):
        return None


def pipeline_class(config: Any) -> type:
    """The model's own pipeline: what its model_index.json names (dev: Flux2Pipeline, klein:
    Flux2KleinPipeline), else what its flavour is."""
    import diffusers

    name = _pipeline_name(model_source(config, FAMILY.flavours), config.revision)
    if name not in ("Flux2Pipeline", KLEIN):
        name = KLEIN if config.model_flavour.startswith("klein") else "Flux2Pipeline"
    return getattr(diffusers, name)


@hookimpl
def load_model(config: Any, component: str, dtype: torch.dtype) -> Any:
    if component != "text_encoders":
        return None  # the core loads the classes FAMILY declares
    # the pipeline without transformer and VAE: Mistral3 + processor (dev) or Qwen3 + tokenizer (klein)
    return fluxlike.load_text_encoders(FAMILY, config, dtype, lambda hub: hub.text_pipeline(pipeline_class(config)))


@hookimpl
def encode_prompts(text_encoders: Any, prompts: list[str], config: Any, device: Any) -> dict[str, torch.Tensor]:
    """The pipeline's encode_prompt: the chat template (dev: with BFL's system message), padded to
    ``tokenizer_max_length`` and masked in the encoder, hidden states of three layers stacked on
    the feature axis (dev 10/20/30, klein 9/18/27)."""
    embeds, _ = text_encoders.encode_prompt(
        prompt=prompts, device=device, max_sequence_length=config.tokenizer_max_length
    )
    return {"prompt_embeds": embeds}


@hookimpl
def example_text(config: Any, transformer: Any, batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    width = transformer.config.joint_attention_dim  # three encoder layers side by side
    return {"prompt_embeds": torch.zeros(batch_size, config.tokenizer_max_length, width, dtype=dtype)}


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2]: 2x2 patches on the channel axis, index c*4 + dy*2 + dx."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


@hookimpl
def encode_images(vae: Any, pixels: torch.Tensor, config: Any) -> torch.Tensor:
    """As the pipelines encode reference images: the latent mode, in 2x2 patches, normalised by the
    VAE's batch-norm running statistics. Training and noise live in this 128-channel space."""
    patches = patchify(vae.encode(pixels).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patches)
    return (patches - mean) / std


def image_tokens(latent_shape: tuple[int, ...]) -> int:
    return latent_shape[-2] * latent_shape[-1]  # the latents are patchified already: one token each


@hookimpl
def sample_sigmas(config: Any, batch_size: int, latent_shape: tuple[int, ...], generator: torch.Generator):
    """Sigmas from ``sigma_sampling`` (the family's: logit-normal), shifted by the pipelines'
    resolution shift exp(mu) at 50 steps (``flow_schedule_auto_shift``, on by default), else by
    ``flow_schedule_shift`` if set."""
    sigmas = flow.base_sigmas(config, batch_size, generator)
    if config.flow_schedule_auto_shift:
        sigmas = flow.shift_sigmas(
            sigmas, math.exp(compute_empirical_mu(image_tokens(latent_shape), SHIFT_REFERENCE_STEPS))
        )
    elif config.flow_schedule_shift is not None:
        sigmas = flow.shift_sigmas(sigmas, config.flow_schedule_shift)
    return flow.clamp_open_unit(sigmas)


@hookimpl
def inference_sigmas(config: Any, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The pipelines' schedule: linspace(1, 1/n, n) shifted by mu = compute_empirical_mu(tokens, n)."""
    import numpy as np

    scheduler = copy.deepcopy(scheduler)  # set_timesteps changes it; validation keeps its own
    mu = compute_empirical_mu(image_tokens(latent_shape), num_steps)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.float().cpu()


def position_ids(height: int, width: int, text_tokens: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipelines' 4-axis (t, h, w, l) position ids: image tokens (0, row, col, 0) in row-major
    order, text tokens (0, 0, 0, index)."""
    image = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
    text = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_tokens))
    return image.to(device), text.to(device)


@hookimpl
def predict_flow(transformer, noisy_latents, sigmas, text, config, generator) -> torch.Tensor:
    """The packed latents (one token per 2x2 patch), the text as cached (the pipelines do not mask
    text attention in the transformer), sigma as the timestep, dev's distilled guidance."""
    b, c, h, w = noisy_latents.shape
    dtype, device = noisy_latents.dtype, noisy_latents.device
    embeds = text["prompt_embeds"].to(dtype)
    image_ids, text_ids = position_ids(h, w, embeds.shape[1], device)
    guidance = None
    if fluxlike.unwrap(transformer).config.guidance_embeds:  # dev; klein has no guidance embedding
        guidance = fluxlike.guidance_values(config, b, generator).to(device)
    prediction = transformer(
        hidden_states=noisy_latents.reshape(b, c, h * w).permute(0, 2, 1),
        encoder_hidden_states=embeds,
        timestep=sigmas.to(dtype),
        img_ids=image_ids,
        txt_ids=text_ids,
        guidance=guidance,
        return_dict=False,
    )[0]
    return prediction.permute(0, 2, 1).reshape(b, c, h, w)


@hookimpl
def generate_images(request: Any) -> list[Any]:
    """The model's pipeline with the cached embeddings: dev with distilled guidance
    ``validation_guidance``, klein with real CFG against the negative prompt when it is above 1."""
    config = request.config
    cls = pipeline_class(config)
    pipe = partial_pipeline(cls, scheduler=request.scheduler, vae=request.vae, transformer=request.transformer)
    shared: dict[str, Any] = {"guidance_scale": config.validation_guidance}
    if cls.__name__ == KLEIN and request.negative_text is not None:
        shared["negative_prompt_embeds"] = request.negative_text["prompt_embeds"]
    return render(pipe, request, lambda text: {"prompt_embeds": text["prompt_embeds"]}, **shared)


@hookimpl
def export_full_model(transformer, config):
    """model_type: full: flux2_comfyui.safetensors, BFL's Flux.2 layout without a prefix (as BFL
    publishes it; ComfyUI detects either, diffusers' Flux.2 converter strips none)."""
    return fluxlike.export_full_model(transformer, "flux2", "flux2", prefix="")
