"""SD3's hooks (FAMILY.implementation): only where SD3 differs from what tuner derives from the
family's record. The pipeline's own prompt encoding, prediction, validation with
StableDiffusion3Pipeline. Registered with the family when a run selects it, so it may import torch
and diffusers at the top."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from tuner.core import hookimpl
from tuner.core.api import partial_pipeline, render


@hookimpl
def encode_prompts(text_encoders: Any, prompts: list[str], config: Any, device: Any) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = text_encoders.encode_prompt(  # the pipeline holding the three encoders
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=device,
        do_classifier_free_guidance=False,
        max_sequence_length=config.tokenizer_max_length,
    )
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


@hookimpl
def example_text(config: Any, transformer: Any, batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # SD3's pipeline pads CLIP prompts to CLIP's 77 positions and appends the T5 tokens
    tokens, model = 77 + config.tokenizer_max_length, transformer.config
    return {
        "prompt_embeds": torch.zeros(batch_size, tokens, model.joint_attention_dim, dtype=dtype),
        "pooled_prompt_embeds": torch.zeros(batch_size, model.pooled_projection_dim, dtype=dtype),
    }


@hookimpl
def predict_flow(transformer, noisy_latents, sigmas, text) -> torch.Tensor:
    dtype = noisy_latents.dtype
    return transformer(
        hidden_states=noisy_latents,  # SD3 patchifies inside the model
        encoder_hidden_states=text["prompt_embeds"].to(dtype),
        pooled_projections=text["pooled_prompt_embeds"].to(dtype),
        timestep=sigmas.to(dtype) * 1000,  # SD3 takes timesteps in [0, 1000]
        return_dict=False,
    )[0]


@hookimpl
def generate_images(request: Any) -> list[Any]:
    pipe = partial_pipeline(
        StableDiffusion3Pipeline, transformer=request.transformer, scheduler=request.scheduler, vae=request.vae
    )
    negative = request.negative_text
    return render(
        pipe,
        request,
        lambda text: {"prompt_embeds": text["prompt_embeds"], "pooled_prompt_embeds": text["pooled_prompt_embeds"]},
        negative_prompt_embeds=negative["prompt_embeds"],
        negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"],
        guidance_scale=request.config.validation_guidance,
    )
