"""What a run passes around: the run's context (plugins, config, accelerate, where outputs go) and
the training state (model, optimizer, schedule, position, guard) as one object each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuner.core.training.guard import DivergenceGuard

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config
    from tuner.core.host.events import TrainEvent
    from tuner.core.host.manager import PluginHost
    from tuner.core.training.ema import AdapterEMA


@dataclass
class RunContext:
    """The fixed surroundings of one run, shared by the loop, checkpoints, exports and validation."""

    host: PluginHost
    config: Config
    accelerator: Any
    weight_dtype: torch.dtype
    warn: Callable[[str], None]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, message: str) -> None:
        """A line for the user that does not break the progress bar (main process only)."""
        if self.is_main:
            from tqdm.auto import tqdm

            tqdm.write(message)

    def emit(self, event_type: type[TrainEvent], step: int, **fields: Any) -> None:
        """Send a typed event to every plugin's ``training_event`` (main process only)."""
        if self.is_main:
            self.host.hook.training_event(event=event_type(step=step, config=self.config, log=self.log, **fields))

    def autocast(self):
        return self.accelerator.autocast()


@dataclass
class Position:
    """Where the run is: optimizer steps done and micro-batches consumed (the data order and every
    random draw are functions of these)."""

    step: int = 0
    micro_step: int = 0


@dataclass
class TrainState:
    """Everything that changes while training, in one object: checkpoints save and restore it."""

    model: torch.nn.Module  # the denoiser with its adapters (unwrapped)
    wrapped: torch.nn.Module  # what accelerate prepared (DDP around ``model`` on several processes)
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    params: list[torch.nn.Parameter]
    targets: list[str]  # full names of the adapted modules
    guard: DivergenceGuard
    position: Position = field(default_factory=Position)
    ema: AdapterEMA | None = None  # use_ema: the moving average of the adapter

    def adapter(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by their names in the model."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
