"""What training and ``tuner estimate`` run alike: the LoRA put on the denoiser, and the
flow-matching loss of one micro-batch. The estimate runs these same functions on fake tensors, so
what it counts is what a run does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tuner.core.errors import ConfigError
from tuner.core.fixes import checkpoint_blocks
from tuner.core.model import flow
from tuner.core.model.activations import offload_activations
from tuner.core.model.lora import add_lora, resolve_targets

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config
    from tuner.core.host.manager import PluginHost


def attach_lora(host: PluginHost, config: Config, transformer: torch.nn.Module) -> list[str]:
    """Make ``transformer`` trainable as the run says: put the run's LoRA on it (the family's
    targets, possibly wrapped by extensions), or with ``model_type: full`` let its own weights train
    (all but the frozen modules); turn on gradient checkpointing when configured, and return the
    adapted (or trained) modules' full names."""
    if config.get("model_type", "lora") == "full":
        from tuner.core.training.full import frozen_modules, make_trainable

        targets = make_trainable(transformer, frozen_modules(config, host.family))
    else:
        patterns = host.provide("lora_target_modules", config=config, transformer=transformer)
        targets = resolve_targets(transformer, patterns)
        if not targets:
            raise ConfigError(f"{config.source}: LoRA targets {patterns!r} match no Linear module of the model")
        add_lora(transformer, targets, config, host.adapter_types)
    if config.gradient_checkpointing:
        checkpoint_blocks(transformer)
    if config.activation_offload:
        offload_activations(transformer)
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


@dataclass
class Prediction:
    """The denoiser as the loss and the rollout ask it: the family's ``predict_flow`` through the host,
    the noisy latents in ``dtype``, each call inside a fresh ``autocast()`` context."""

    host: PluginHost
    config: Config
    transformer: torch.nn.Module
    dtype: torch.dtype
    autocast: Callable[[], Any]

    def __call__(
        self, noisy: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        with self.autocast():
            return self.host.provide(
                "predict_flow",
                transformer=self.transformer,
                noisy_latents=noisy.to(self.dtype),
                sigmas=sigmas,
                text=text,
                config=self.config,
                generator=generator,
            )


@dataclass
class MicroBatch:
    """One micro-batch as the loss sees it: clean latents, the noise and sigmas drawn for them, the
    text conditioning, and the generator of the family's own draws (e.g. guidance)."""

    latents: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    text: dict[str, torch.Tensor]
    generator: torch.Generator
    mask: torch.Tensor | None = None  # loss weights on the latent grid, [B, 1, h, w] (masked loss)
    mask_floor: float = 0.0


def flow_matching_loss(
    model: Prediction,
    batch: MicroBatch,
    noisy_and_target: tuple[torch.Tensor, torch.Tensor] | None = None,
    base: Prediction | None = None,
) -> torch.Tensor:
    """Noise the latents to the sigmas, ask the family for the velocity, and return the MSE against
    ``noise - latents``. ``noisy_and_target`` replaces both (scheduled sampling's rolled-out latents,
    at the same sigmas). With ``base`` (``regularisation_target: base_model``) the target is the
    base model's own prediction on the same input: every adapter off, no gradient, the family's
    draws (guidance) the same as the trained forward's."""
    noisy, target = noisy_and_target or flow.noisy_and_target(batch.latents, batch.noise, batch.sigmas)
    if base is not None:
        draws = torch.Generator().set_state(batch.generator.get_state())
        with torch.no_grad(), adapters_off(base.transformer):
            target = base(noisy, batch.sigmas, batch.text, draws).float()
    prediction = model(noisy, batch.sigmas, batch.text, batch.generator)
    if batch.mask is not None:
        return flow.masked_flow_loss(prediction, target, batch.mask, batch.mask_floor)
    return flow.flow_loss(prediction, target)


@contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """Every peft adapter layer of ``model`` (any adapter type) passes its base layer's output only."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
