"""Chroma's heavy side: loading through diffusers, T5 encoding, masked prediction, validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tuner.core.config import model_source
from tuner.core.errors import ConfigError, PluginError
from tuner.core.lora import resolve_targets
from tuner.plugins.chroma.plugin import FAMILY
from tuner.plugins.fluxlike import latents as fl


@dataclass
class T5Encoder:
    """Chroma's text side: one T5 tokenizer and encoder."""

    tokenizer: Any
    encoder: Any

    def to(self, device: Any) -> T5Encoder:
        self.encoder.to(device)
        return self


def load(config: Any, component: str, dtype: torch.dtype) -> Any:
    """Load a component with diffusers/transformers ``from_pretrained`` from a hub id or local folder.

    The hub client honours ``HF_ENDPOINT`` (mirrors) and ``HF_HUB_OFFLINE``.
    """
    source = model_source(config, FAMILY.flavours)
    common = {"revision": config.revision} if config.revision else {}
    try:
        if component == "transformer":
            from diffusers import ChromaTransformer2DModel

            return ChromaTransformer2DModel.from_pretrained(
                source, subfolder="transformer", torch_dtype=dtype, **common
            )
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **common)
        if component == "text_encoders":
            from transformers import AutoTokenizer, T5EncoderModel

            tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
            encoder = T5EncoderModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **common)
            return T5Encoder(tokenizer, encoder.eval())
        if component == "scheduler":
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **common)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PluginError(f"chroma: cannot load the {component} of {source!r}: {first}") from None
    raise PluginError(f"chroma: unknown model component {component!r}")


def encode_prompts(encoders: T5Encoder, prompts: list[str], config: Any) -> dict[str, torch.Tensor]:
    tokens = encoders.tokenizer(
        prompts,
        padding="max_length",
        max_length=config.tokenizer_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = encoders.encoder.device
    tokenizer_mask = tokens.attention_mask.to(device)
    # T5 itself runs with the tokenizer's mask; the transformer later sees real tokens + one pad
    embeds = encoders.encoder(tokens.input_ids.to(device), attention_mask=tokenizer_mask)[0]
    return {"prompt_embeds": embeds, "attention_mask": fl.keep_first_pad(tokenizer_mask.bool())}


def lora_targets(
    config: Any, transformer: torch.nn.Module, presets: dict[str, list[str]], approximator: str
) -> list[str]:
    value = config.flux_lora_target
    patterns = presets[value] if isinstance(value, str) else value
    if not isinstance(value, str):
        touched = [n for n in resolve_targets(transformer, patterns) if n.startswith(approximator + ".")]
        if touched:
            raise ConfigError(
                f"{config.source}: flux_lora_target matches {touched[0]} in {approximator} (the approximator), "
                "which tuner never adapts: LoRAs on it break Chroma; remove that entry"
            )
    names = resolve_targets(transformer, patterns, exclude_prefixes=[approximator])
    if not names:
        raise ConfigError(
            f"{config.source}: flux_lora_target {value!r} matches no Linear module of the Chroma transformer"
        )
    return names


def predict_flow(
    transformer: torch.nn.Module,
    noisy_latents: torch.Tensor,
    sigmas: torch.Tensor,
    text: dict[str, torch.Tensor],
    config: Any,
) -> torch.Tensor:
    _, _, h, w = noisy_latents.shape
    dtype, device = noisy_latents.dtype, noisy_latents.device
    packed = fl.pack(noisy_latents)
    embeds, text_mask = fl.conditioning(text, config.flux_t5_padding)
    prediction = transformer(
        hidden_states=packed,
        encoder_hidden_states=embeds.to(dtype),
        timestep=sigmas.to(dtype),
        img_ids=fl.image_ids(h, w, device, dtype),
        txt_ids=fl.text_ids(embeds.shape[1], device, dtype),
        attention_mask=fl.joint_mask(text_mask, packed.shape[1]),
        return_dict=False,
    )[0]
    return fl.unpack(prediction, h, w)


def generate_images(request: Any) -> list[Any]:
    """Real CFG with ``validation_guidance_real`` through diffusers' ChromaPipeline, with boolean masks."""
    from diffusers import ChromaPipeline

    config = request.config
    pipe = ChromaPipeline(
        scheduler=request.scheduler,
        vae=request.vae,
        text_encoder=None,
        tokenizer=None,
        transformer=request.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    guidance = config.validation_guidance_real
    negative = (
        fl.pipeline_text_inputs(request.negative_text, config.flux_t5_padding, prefix="negative_")
        if guidance > 1 and request.negative_text is not None
        else {}
    )
    images = []
    for text, seed in zip(request.text, request.seeds, strict=True):
        out = pipe(
            **fl.pipeline_text_inputs(text, config.flux_t5_padding),
            **negative,
            guidance_scale=guidance,
            num_inference_steps=request.num_inference_steps,
            height=request.height,
            width=request.width,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
        )
        images.append(out.images[0])
    return images
