"""SD3's heavy side, through diffusers: loading, the pipeline's own prompt encoding, prediction,
validation with StableDiffusion3Pipeline."""

from __future__ import annotations

from typing import Any

import torch

from tuner.core.config import model_source
from tuner.core.errors import ConfigError, PluginError, first_line
from tuner.core.lora import resolve_targets
from tuner_sd3.plugin import FAMILY, PRESETS


def load(config: Any, component: str, dtype: torch.dtype) -> Any:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    source = model_source(config, FAMILY.flavours)
    kw = {"revision": config.revision} if config.revision else {}
    loaders = {
        "transformer": lambda: SD3Transformer2DModel.from_pretrained(
            source, subfolder="transformer", torch_dtype=dtype, **kw
        ),
        "vae": lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw),
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kw),
        # the three text encoders and tokenizers, held by a pipeline so its encode_prompt does the work
        "text_encoders": lambda: StableDiffusion3Pipeline.from_pretrained(
            source, transformer=None, vae=None, torch_dtype=dtype, **kw
        ),
    }
    if component not in loaders:
        raise PluginError(f"sd3: unknown model component {component!r}")
    try:
        return loaders[component]()
    except (OSError, ValueError) as exc:
        raise PluginError(f"sd3: cannot load the {component} of {source!r}: {first_line(exc)}") from None


def encode_prompts(pipe: Any, prompts: list[str], config: Any) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=pipe.text_encoder.device,
        do_classifier_free_guidance=False,
        max_sequence_length=config.tokenizer_max_length,
    )
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def lora_targets(config: Any, transformer: torch.nn.Module) -> list[str]:
    value = config.sd3_lora_target
    names = resolve_targets(transformer, PRESETS[value] if isinstance(value, str) else value)
    if not names:
        raise ConfigError(f"{config.source}: sd3_lora_target {value!r} matches no Linear module of the SD3 transformer")
    return names


def predict_flow(transformer, noisy_latents, sigmas, text) -> torch.Tensor:
    dtype = noisy_latents.dtype
    return transformer(
        hidden_states=noisy_latents,  # SD3 patchifies inside the model
        encoder_hidden_states=text["prompt_embeds"].to(dtype),
        pooled_projections=text["pooled_prompt_embeds"].to(dtype),
        timestep=sigmas.to(dtype) * 1000,  # SD3 takes timesteps in [0, 1000]
        return_dict=False,
    )[0]


def generate_images(request: Any) -> list[Any]:
    from diffusers import StableDiffusion3Pipeline

    from tuner.core.pipelines import partial_pipeline, render

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
