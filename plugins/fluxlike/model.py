"""Heavy code the Flux lineage shares: loading, LoRA targets, packed prediction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tuner.core.api import READ_ERRORS, ConfigError, PluginError, first_line, model_source, resolve_targets
from tuner.plugins.fluxlike import latents as fl


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model inside a DDP/compile wrapper (to read its config)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def load_component(family: str, source: str, component: str, loaders: dict[str, Callable[[], Any]]) -> Any:
    """Call the loader of ``component`` (a ``from_pretrained`` call) with one-line errors."""
    if component not in loaders:
        raise PluginError(f"{family}: unknown model component {component!r}")
    try:
        return loaders[component]()
    except READ_ERRORS as exc:  # with safetensors' own error for a truncated file (tuner.core.fixes)
        if ".safetensors" in str(exc) or "use_safetensors" in str(exc):
            raise PluginError(
                f"{family}: the {component} of {source!r} has no .safetensors weights (tuner never unpickles "
                f".bin files; convert them to safetensors): {first_line(exc)}"
            ) from None
        raise PluginError(f"{family}: cannot load the {component} of {source!r}: {first_line(exc)}") from None


class Pretrained:
    """``from_pretrained`` on one model source (a hub id or a local diffusers folder, at the run's
    revision): safetensors only, weights in the run's dtype (the hub client honours HF_ENDPOINT)."""

    def __init__(self, source: str, revision: str | None, dtype: torch.dtype):
        self.source, self.dtype = source, dtype
        self.options = {"revision": revision} if revision else {}

    def model(self, cls: Any, subfolder: str) -> Any:
        """A diffusers model (``torch_dtype``)."""
        return cls.from_pretrained(
            self.source, subfolder=subfolder, torch_dtype=self.dtype, use_safetensors=True, **self.options
        )

    def encoder(self, cls: Any, subfolder: str) -> Any:
        """A transformers text encoder (``dtype``), in eval mode."""
        return cls.from_pretrained(
            self.source, subfolder=subfolder, dtype=self.dtype, use_safetensors=True, **self.options
        ).eval()

    def tokenizer(self, subfolder: str) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.source, subfolder=subfolder, **self.options)


def load_flux_lineage(
    family: Any, config: Any, component: str, dtype: torch.dtype, transformer: Any, text_encoders: Any
) -> Any:
    """``load_model`` for a family laid out like Flux: ``transformer`` (its diffusers class), the
    Flux VAE, the flow-matching Euler scheduler, and ``text_encoders(pretrained)`` for the text side."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    hub = Pretrained(model_source(config, family.flavours), config.revision, dtype)
    loaders = {
        "transformer": lambda: hub.model(transformer, "transformer"),
        "vae": lambda: hub.model(AutoencoderKL, "vae"),
        "text_encoders": lambda: text_encoders(hub),
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(
            hub.source, subfolder="scheduler", **hub.options
        ),
    }
    return load_component(family.name, hub.source, component, loaders)


def lora_targets(
    config: Any, transformer: torch.nn.Module, presets: dict[str, list[str]], family: str, never: str | None = None
) -> list[str]:
    """Full module names for ``flux_lora_target`` (a preset or a list), never under ``never``."""
    value = config.flux_lora_target
    patterns = presets[value] if isinstance(value, str) else value
    if never and not isinstance(value, str):
        touched = [n for n in resolve_targets(transformer, patterns) if n.startswith(never + ".")]
        if touched:
            raise ConfigError(
                f"{config.source}: flux_lora_target matches {touched[0]} in {never} (the approximator), "
                f"which tuner never adapts: LoRAs on it break {family.capitalize()}; remove that entry"
            )
    names = resolve_targets(transformer, patterns, exclude_prefixes=[never] if never else [])
    if not names:
        raise ConfigError(
            f"{config.source}: flux_lora_target {value!r} matches no Linear module of the {family} transformer"
        )
    return names


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
