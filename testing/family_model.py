"""The hooks of tuner.testing's miniature family (its ``FamilyInfo.implementation``): its T5 text
side, encoding with a mean-pooled vector, SD3-style prediction, validation through
StableDiffusion3Pipeline. The core loads the other components from the family's record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tuner.core import hookimpl
from tuner.core.api import Pretrained, load_component, model_source, partial_pipeline, render


@dataclass
class T5Text:
    """The text side: one T5 tokenizer and encoder (``FamilyInfo.text_encoders`` names ``encoder``)."""

    tokenizer: Any
    encoder: Any

    def to(self, device: Any) -> T5Text:
        self.encoder.to(device)
        return self


@hookimpl
def load_model(config: Any, component: str, dtype: torch.dtype, family: Any) -> Any:
    if component != "text_encoders":
        return None  # the core loads what the record declares
    from transformers import T5EncoderModel

    hub = Pretrained(model_source(config, family.flavours), config.revision, dtype)
    load = {component: lambda: T5Text(hub.tokenizer("tokenizer_3"), hub.encoder(T5EncoderModel, "text_encoder_3"))}
    return load_component(family.name, hub.source, component, load)


@hookimpl
def encode_prompts(text_encoders: Any, prompts: list[str], config: Any, device: Any) -> dict[str, torch.Tensor]:
    tokens = text_encoders.tokenizer(
        prompts, padding="max_length", max_length=config.tokenizer_max_length, truncation=True, return_tensors="pt"
    )
    embeds = text_encoders.encoder(tokens.input_ids.to(device))[0]
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": embeds.mean(dim=1)}


@hookimpl
def example_text(config: Any, transformer: Any, batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model = transformer.config
    return {
        "prompt_embeds": torch.zeros(batch_size, config.tokenizer_max_length, model.joint_attention_dim, dtype=dtype),
        "pooled_prompt_embeds": torch.zeros(batch_size, model.pooled_projection_dim, dtype=dtype),
    }


@hookimpl
def predict_flow(transformer, noisy_latents, sigmas, text) -> torch.Tensor:
    dtype = noisy_latents.dtype
    return transformer(
        hidden_states=noisy_latents,
        encoder_hidden_states=text["prompt_embeds"].to(dtype),
        pooled_projections=text["pooled_prompt_embeds"].to(dtype),
        timestep=sigmas.to(dtype) * 1000,  # the MMDiT takes timesteps in [0, 1000]
        return_dict=False,
    )[0]


@hookimpl
def generate_images(request: Any) -> list[Any]:
    """A single pass per step (no negative prompt): enough to show validation runs."""
    from diffusers import StableDiffusion3Pipeline

    pipe = partial_pipeline(
        StableDiffusion3Pipeline, transformer=request.transformer, scheduler=request.scheduler, vae=request.vae
    )
    return render(
        pipe,
        request,
        lambda text: {"prompt_embeds": text["prompt_embeds"], "pooled_prompt_embeds": text["pooled_prompt_embeds"]},
        guidance_scale=1.0,
    )
