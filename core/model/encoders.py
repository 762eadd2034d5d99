"""The VAE and the text encoders as caching (and ``tuner sample``) use them: loaded through the
family, text encoders optionally quantized (``text_encoder_N_precision``), and placed on
the device, or, with ``offload_during_startup``, kept in system RAM and moved to the device one
layer at a time while they run (accelerate's ``cpu_offload``, what diffusers' sequential CPU
offload uses). The denoiser is loaded only after caching, so it never shares the device with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tuner.core.config.keys.model import NO_QUANTIZATION

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config
    from tuner.core.host.manager import PluginHost


def text_encoder_modules(host: PluginHost, encoders: Any) -> list[torch.nn.Module]:
    """The text encoder modules the family names (``FamilyInfo.text_encoders``), in order."""
    found = [getattr(encoders, name, None) for name in host.family.text_encoders]
    return [m for m in found if isinstance(m, torch.nn.Module)]


def text_encoder_precisions(config: Config) -> list[str]:
    """``text_encoder_N_precision`` for N = 1, 2, 3."""
    from tuner.core.config.keys.model import text_encoder_precision_keys

    return [config.get(key, NO_QUANTIZATION) for key in text_encoder_precision_keys(config.keys)]


def offload(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Keep ``module``'s weights in system RAM and move each layer's to ``device`` only while it runs."""
    from accelerate import cpu_offload

    module.to("cpu")
    return cpu_offload(module, execution_device=device)


def load_vae(host: PluginHost, config: Config, device: torch.device, dtype: torch.dtype) -> Any:
    vae = host.provide("load_model", config=config, component="vae", dtype=dtype)
    return offload(vae, device) if config.offload_during_startup else vae.to(device)


def no_loading_bars() -> None:
    """transformers 5 draws a "Loading weights" bar for every encoder it loads, from memory in a
    blink; a run's output is tuner's (the hub's download bars, which say something, stay)."""
    from transformers.utils import logging as transformers_logging

    set_hook = getattr(transformers_logging, "set_tqdm_hook", None)  # transformers 5
    if set_hook is not None:
        set_hook(
            lambda factory, args, kwargs: (
                factory(*args, **{**kwargs, "disable": True})
                if kwargs.get("desc") == "Loading weights"
                else factory(*args, **kwargs)
            )
        )


def load_text_encoders(
    host: PluginHost, config: Config, device: torch.device, dtype: torch.dtype, warn: Any = None
) -> Any:
    no_loading_bars()
    encoders = host.provide("load_model", config=config, component="text_encoders", dtype=dtype)
    modules = text_encoder_modules(host, encoders)
    for module, precision in zip(modules, text_encoder_precisions(config), strict=False):
        if precision != NO_QUANTIZATION:
            from tuner.core.model.quantize import require_backend

            info = host.precisions[precision]
            require_backend(info)
            module.requires_grad_(False)
            info.quantize(module, "", [])
    if config.offload_during_startup and modules:
        for module in modules:
            offload(module, device)
        return encoders
    if config.offload_during_startup and warn is not None:
        warn(f"offload_during_startup: {host.family.name} names no text encoders (FamilyInfo.text_encoders); "
             "they run on the device whole")  # fmt: skip
    return encoders.to(device) if hasattr(encoders, "to") else encoders
