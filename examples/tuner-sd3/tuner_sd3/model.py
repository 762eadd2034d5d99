"""SD3's hooks (FAMILY.implementation), through diffusers: loading, the pipeline's own prompt
encoding, prediction, validation with StableDiffusion3Pipeline. tuner registers this module with
the family when a run selects it, so it may import torch and diffusers at the top."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from tuner.core import hookimpl
from tuner.core.api import ConfigError, PluginError, first_line, model_source, partial_pipeline, render, resolve_targets
from tuner_sd3.plugin import FAMILY, PRESETS


@hookimpl
def load_model(config: Any, component: str, dtype: torch.dtype) -> Any:
    source = model_source(config, FAMILY.flavours)
    kw = {"revision": config.revision} if config.revision else {}
    loaders = {
        "transformer": lambda: SD3Transformer2DModel.from_pretrained(
            source, subfolder="transformer", torch_dtype=dtype, use_safetensors=True, **kw
        ),
        "vae": lambda: AutoencoderKL.from_pretrained(
            source, subfolder="vae", torch_dtype=dtype, use_safetensors=True, **kw
        ),
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kw),
        # the three text encoders and tokenizers, held by a pipeline so its encode_prompt does the work
        "text_encoders": lambda: StableDiffusion3Pipeline.from_pretrained(
            source, transformer=None, vae=None, torch_dtype=dtype, use_safetensors=True, **kw
        ),
    }
    if component not in loaders:
        raise PluginError(f"sd3: unknown model component {component!r}")
    try:
        return loaders[component]()
    except (OSError, ValueError) as exc:
        raise PluginError(f"sd3: cannot load the {component} of {source!r}: {first_line(exc)}") from None


@hookimpl
def cache_fingerprint(config: Any, kind: str) -> dict[str, Any] | None:
    return {"tokenizer_max_length": config.tokenizer_max_length, "text": "sd3-v1"} if kind == "text" else None


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
def lora_target_modules(config: Any, transformer: torch.nn.Module) -> list[str]:
    value = config.sd3_lora_target
    names = resolve_targets(transformer, PRESETS[value] if isinstance(value, str) else value)
    if not names:
        raise ConfigError(f"{config.source}: sd3_lora_target {value!r} matches no Linear module of the SD3 transformer")
    return names


@hookimpl
def high_precision_modules(transformer: torch.nn.Module) -> list[str]:
    keep = ("pos_embed", "context_embedder", "time_text_embed", "norm_out", "proj_out")
    return [name for name, _ in transformer.named_modules() if name in keep]


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
