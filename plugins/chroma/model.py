"""Chroma's hooks (its ``FamilyInfo.implementation``, registered with the family when a run
selects it): what differs from Flux. T5 only (encoded with its mask), the transformer always sees
real tokens + one pad, sigmas remapped to heavier tails, and validation is real CFG through
ChromaPipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tuner.core import hookimpl
from tuner.core.api import partial_pipeline, render
from tuner.plugins.chroma import sigmas as chroma_sigmas
from tuner.plugins.chroma import snippet
from tuner.plugins.chroma.plugin import FAMILY
from tuner.plugins.fluxlike import latents as fl
from tuner.plugins.fluxlike import model as shared


@dataclass
class T5Encoder:
    """Chroma's text side: one T5 tokenizer and encoder."""

    tokenizer: Any
    encoder: Any

    def to(self, device: Any) -> T5Encoder:
        self.encoder.to(device)
        return self


@hookimpl
def load_model(config: Any, component: str, dtype: torch.dtype) -> Any:
    if component != "text_encoders":
        return None  # the core loads the classes FAMILY declares
    from transformers import T5EncoderModel

    def text_encoders(hub: Any) -> T5Encoder:
        return T5Encoder(hub.tokenizer("tokenizer"), hub.encoder(T5EncoderModel, "text_encoder"))

    return shared.load_text_encoders(FAMILY, config, dtype, text_encoders)


@hookimpl
def encode_prompts(text_encoders: T5Encoder, prompts: list[str], config: Any, device: Any) -> dict[str, torch.Tensor]:
    tokens = text_encoders.tokenizer(
        prompts, padding="max_length", max_length=config.tokenizer_max_length, truncation=True, return_tensors="pt"
    )
    tokenizer_mask = tokens.attention_mask.to(device)
    # unlike Flux, T5 itself runs with the tokenizer's mask; the transformer later sees real tokens + one pad
    embeds = text_encoders.encoder(tokens.input_ids.to(device), attention_mask=tokenizer_mask)[0]
    return {"prompt_embeds": embeds, "attention_mask": fl.keep_first_pad(tokenizer_mask.bool())}


@hookimpl
def example_text(config: Any, transformer: Any, batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return shared.t5_example_text(config, transformer, batch_size, dtype, pooled=False)


@hookimpl
def sample_sigmas(config: Any, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return chroma_sigmas.sample(config, batch_size, generator)


@hookimpl
def predict_flow(transformer, noisy_latents, sigmas, text, config) -> torch.Tensor:
    embeds, text_mask = fl.conditioning(text, config.flux_t5_padding)
    tokens = (noisy_latents.shape[-2] // 2) * (noisy_latents.shape[-1] // 2)
    return shared.predict_packed(
        transformer, noisy_latents, sigmas, embeds, attention_mask=fl.joint_mask(text_mask, tokens)
    )


def init_image(path: str) -> Any:
    """The img2img start image as RGB, EXIF rotation applied; a one-line error naming the key."""
    from PIL import Image, ImageOps

    from tuner.core.api import READ_ERRORS, ConfigError, first_line

    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except READ_ERRORS as exc:
        raise ConfigError(f"validation_init_image: {path}: cannot read it as an image: {first_line(exc)}") from None


@hookimpl
def generate_images(request: Any) -> list[Any]:
    """Real CFG with ``validation_guidance_real`` through diffusers' ChromaPipeline, with boolean masks;
    with ``validation_init_image``, ChromaImg2ImgPipeline from that image at ``validation_init_strength``."""
    from diffusers import ChromaImg2ImgPipeline, ChromaPipeline

    config = request.config
    start: dict[str, Any] = {}
    if config.validation_init_image:
        start = {"image": init_image(config.validation_init_image), "strength": config.validation_init_strength}
    pipe = partial_pipeline(
        ChromaImg2ImgPipeline if start else ChromaPipeline,
        scheduler=request.scheduler,
        vae=request.vae,
        transformer=request.transformer,
    )
    guidance = config.validation_guidance_real
    negative = {}
    if guidance > 1 and request.negative_text is not None:
        negative = fl.pipeline_text_inputs(request.negative_text, config.flux_t5_padding, prefix="negative_")
    return render(
        pipe,
        request,
        lambda text: {**fl.pipeline_text_inputs(text, config.flux_t5_padding), **negative},
        guidance_scale=guidance,
        **start,
    )


@hookimpl
def recipe_snippet(recipe: dict[str, Any]) -> str:
    return snippet.render(recipe)


@hookimpl
def export_full_model(transformer, config):
    """model_type: full: chroma_comfyui.safetensors, BFL's single-file layout (ComfyUI, from_single_file)."""
    return shared.export_full_model(transformer, "chroma")
