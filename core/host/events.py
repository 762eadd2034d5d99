"""What :func:`training_event` observers receive: one dataclass per event, like pytest's reports.

Every event carries the optimizer ``step`` it happened at, the run's ``config`` and ``log`` (print
a line without breaking the progress bar). Dispatch on the type::

    @hookimpl
    def training_event(event):
        if isinstance(event, StepEnd):
            my_tracker.log({"loss": event.loss}, step=event.step)

Import-cheap: no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config


@dataclass(kw_only=True)
class TrainEvent:
    """Base class of every training event."""

    name: ClassVar[str] = "event"  # the JSONL log's ``event`` field
    step: int
    config: Config
    log: Callable[[str], None] = print


@dataclass(kw_only=True)
class RunStart(TrainEvent):
    """Training is about to begin (after caching, model load and any resume)."""

    name: ClassVar[str] = "run_start"
    images: int
    lora_modules: int
    effective_batch: int
    resumed_step: int | None  # the checkpoint's step when the run resumed, else None
    model: Any = None  # the trained denoiser (adapters attached); read it, never replace it


@dataclass(kw_only=True)
class StepEnd(TrainEvent):
    """An optimizer step finished."""

    name: ClassVar[str] = "step_end"
    loss: float
    lr: float
    sigma: float  # mean sigma of the step's samples
    sigmas: list[float] = field(default_factory=list)
    grad_norm: float | None = None
    sizes: list[list[int]] = field(default_factory=list)  # [height, width] in pixels per micro-batch
    datasets: list[str] = field(default_factory=list)  # the dataset id of each micro-batch


@dataclass(kw_only=True)
class Skip(TrainEvent):
    """A step with a non-finite loss or gradient was dropped."""

    name: ClassVar[str] = "skip"
    consecutive: int


@dataclass(kw_only=True)
class Rollback(TrainEvent):
    """The divergence guard restored an earlier state with a lower learning rate."""

    name: ClassVar[str] = "rollback"
    to: str  # a checkpoint folder's name, or "the start"
    lr_scale: float
    rollbacks: int


@dataclass(kw_only=True)
class Validation(TrainEvent):
    """Validation images were written."""

    name: ClassVar[str] = "validation"
    folder: str
    images: list[str]


@dataclass(kw_only=True)
class Evaluation(TrainEvent):
    """The held-out eval loss was computed (``eval_steps``): its mean and its value per noise level."""

    name: ClassVar[str] = "evaluation"
    eval_loss: float
    eval_sigmas: list[float]
    eval_losses: list[float]


@dataclass(kw_only=True)
class Save(TrainEvent):
    """Files were written: a checkpoint (``checkpoint`` is its folder) or the final LoRA."""

    name: ClassVar[str] = "save"
    files: list[str]
    checkpoint: str | None = None


@dataclass(kw_only=True)
class RunEnd(TrainEvent):
    """The run finished and its final LoRA files passed the self-test."""

    name: ClassVar[str] = "run_end"
    lora_files: list[str]


def payload(event: TrainEvent) -> dict[str, Any]:
    """The event's own fields (not step, config, log or model), for logs."""
    skip = {"step", "config", "log", "model"}
    return {k: v for k, v in vars(event).items() if k not in skip}
