"""What training and ``tuner estimate`` run alike: the LoRA put on the denoiser, and the
flow-matching loss of one micro-batch. The estimate runs these same functions on fake tensors, so
what it counts is what a run does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tuner.core import flow
from tuner.core.errors import ConfigError
from tuner.core.fixes import checkpoint_blocks
from tuner.core.lora import add_lora, resolve_targets

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config import Config
    from tuner.core.plugins import PluginHost


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, micro-step, rank, a purpose tag, ...): every random draw
    of a run is seeded from where it happens, never from what ran before."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 1_000_003 + int(part) + 0x632BE59BD9B4E019) % (1 << 63)
    return value


def attach_lora(host: PluginHost, config: Config, transformer: torch.nn.Module) -> list[str]:
    """Put the run's LoRA on ``transformer`` (the family's targets, possibly wrapped by extensions),
    turn on gradient checkpointing when configured, and return the adapted modules' full names."""
    patterns = host.provide("lora_target_modules", config=config, transformer=transformer)
    targets = resolve_targets(transformer, patterns)
    if not targets:
        raise ConfigError(f"{config.source}: LoRA targets {patterns!r} match no Linear module of the model")
    add_lora(transformer, targets, config)
    if config.gradient_checkpointing:
        checkpoint_blocks(transformer)
    if config.compile:
        compile_blocks(transformer, config.compile_backend)
    return targets


def compile_blocks(transformer: torch.nn.Module, backend: str) -> int:
    """Regional compilation: ``torch.compile`` each repeated block (the classes the diffusers model
    lists in ``_repeated_blocks``) in place, LoRA and checkpointing included, so one compiled graph
    serves every block of a class and the module names (LoRA export, self-test) stay as they are.
    Returns how many blocks were compiled."""
    classes = set(getattr(transformer, "_repeated_blocks", None) or [])
    blocks = [m for m in transformer.modules() if type(m).__name__ in classes]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def flow_matching_loss(
    host: PluginHost,
    config: Config,
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    text: dict[str, torch.Tensor],
    generator: torch.Generator,
    dtype: torch.dtype,
    autocast: Any,
    noisy_and_target: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Noise ``latents`` to ``sigmas``, ask the family for the velocity, and return the MSE against
    ``noise - latents``. ``autocast`` is the context the prediction runs in. ``noisy_and_target``
    replaces both (scheduled sampling's rolled-out latents, at the same ``sigmas``)."""
    noisy, target = noisy_and_target or flow.noisy_and_target(latents, noise, sigmas)
    with autocast:
        prediction = host.provide(
            "predict_flow",
            transformer=transformer,
            noisy_latents=noisy.to(dtype),
            sigmas=sigmas,
            text=text,
            config=config,
            generator=generator,
        )
    return flow.flow_loss(prediction, target)
