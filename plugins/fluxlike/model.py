"""Heavy code the Flux lineage shares: the text side's loading, packed prediction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tuner.core.api import Pretrained, load_component, model_source
from tuner.plugins.fluxlike import latents as fl


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model inside a DDP/compile wrapper (to read its config)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def load_text_encoders(family: Any, config: Any, dtype: torch.dtype, build: Callable[[Pretrained], Any]) -> Any:
    """The text side of a Flux-lineage family, ``build(pretrained)``, with the core's one-line
    errors; the core loads the other components from the family's record (``load_model`` returns
    None for them)."""
    hub = Pretrained(model_source(config, family.flavours), config.revision, dtype)
    return load_component(family.name, hub.source, "text_encoders", {"text_encoders": lambda: build(hub)})


def predict_packed(
    transformer: torch.nn.Module, noisy_latents: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor, **extra: Any
) -> torch.Tensor:
    """Pack the latents, add position ids, call the transformer, unpack its velocity prediction."""
    _, _, h, w = noisy_latents.shape
    dtype, device = noisy_latents.dtype, noisy_latents.device
    prediction = transformer(
        hidden_states=fl.pack(noisy_latents),
        encoder_hidden_states=embeds.to(dtype),
        timestep=sigmas.to(dtype),
        img_ids=fl.image_ids(h, w, device, dtype),
        txt_ids=fl.text_ids(embeds.shape[1], device, dtype),
        return_dict=False,
        **extra,
    )[0]
    return fl.unpack(prediction, h, w)


def guidance_values(config: Any, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The distilled guidance a guidance-embedding model trains with, per sample (``flux_guidance_*``)."""
    if config.flux_guidance_mode == "random-range":
        low, high = config.flux_guidance_min, config.flux_guidance_max
        return low + (high - low) * torch.rand(batch_size, generator=generator)
    return torch.full((batch_size,), float(config.flux_guidance_value))


def image_tokens(height: int, width: int) -> int:
    """Packed image tokens of a ``height`` x ``width`` image (8x VAE, 2x2 patches)."""
    return (height // 16) * (width // 16)


def t5_example_text(config: Any, transformer: Any, batch_size: int, dtype: torch.dtype, pooled: bool) -> dict:
    """``example_text`` for the Flux lineage: T5 embeddings and their mask, and for Flux the pooled
    CLIP vector, as ``torch.zeros``/``torch.ones`` (no text encoder)."""
    tokens, model = config.tokenizer_max_length, transformer.config
    text = {
        "prompt_embeds": torch.zeros(batch_size, tokens, model.joint_attention_dim, dtype=dtype),
        "attention_mask": torch.ones(batch_size, tokens, dtype=torch.bool),
    }
    if pooled:
        text["pooled_prompt_embeds"] = torch.zeros(batch_size, model.pooled_projection_dim, dtype=dtype)
    return text


def export_full_model(
    transformer: torch.nn.Module, family: str, generation: str = "flux1", prefix: str | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """A full fine-tune's single file for ComfyUI (and diffusers' from_single_file): BFL's layout."""
    from tuner.plugins.fluxlike.bfl import NAMES
    from tuner.plugins.fluxlike.checkpoint import CHECKPOINT_PREFIX, bfl_checkpoint

    state = bfl_checkpoint(transformer, NAMES[generation], CHECKPOINT_PREFIX if prefix is None else prefix)
    return {f"{family}_comfyui.safetensors": state}
