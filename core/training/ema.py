"""An exponential moving average of the adapter (``use_ema``): the trainable parameters only, never
the frozen base, so it costs one more copy of the LoRA (on the device or in system RAM).

Every ``ema_update_interval`` optimizer steps: ``ema = ema_decay * ema + (1 - ema_decay) * weights``,
starting from the adapter as initialised. The average goes into checkpoints (``ema.safetensors``),
into a second set of final files (``*_ema.safetensors``, self-tested like the first) and, with
``validation_use_ema``, into the weights validation renders with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config

EMA_FILE = "ema.safetensors"
EMA_SUFFIX = "_ema"


class AdapterEMA:
    """The moving average of ``model``'s trainable parameters, by their names in the model."""

    def __init__(self, model: torch.nn.Module, decay: float, interval: int, device: torch.device | str):
        self.decay, self.interval = decay, interval
        self.device = torch.device(device)
        self.names = [name for name, param in model.named_parameters() if param.requires_grad]
        self.average = {
            name: param.detach().to(self.device, torch.float32, copy=True)
            for name, param in model.named_parameters()
            if param.requires_grad
        }

    @classmethod
    def from_config(cls, config: Config, model: torch.nn.Module, device: torch.device) -> AdapterEMA | None:
        if not config.use_ema:
            return None
        where = device if config.ema_device == "accelerator" else torch.device("cpu")
        return cls(model, config.ema_decay, config.ema_update_interval, where)

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold the weights after optimizer step ``step`` into the average (every ``interval`` steps)."""
        if not self.due(step):
            return
        params = dict(model.named_parameters())
        averages = [self.average[name] for name in self.names]
        weights = [params[name].detach().to(self.device, torch.float32) for name in self.names]
        torch._foreach_lerp_(averages, weights, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.average)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(tensors)
        if missing:
            raise KeyError(f"the saved EMA lacks {len(missing)} adapter parameter(s), e.g. {sorted(missing)[0]}")
        for name in self.names:
            self.average[name].copy_(tensors[name])

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The model holds the averaged adapter inside the block and its own weights again after."""
        params = dict(model.named_parameters())
        kept = {name: params[name].detach().clone() for name in self.names}
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(kept[name])
