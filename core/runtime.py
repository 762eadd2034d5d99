"""Where and in what precision a run computes, and what it optimizes with: one rule for training,
``tuner estimate`` and ``tuner sample``.

* the device type: CUDA, then MPS, then XPU, else the CPU;
* the weight dtype of frozen weights: what ``mixed_precision`` names (``no`` is fp32), the same
  on every device, so `tuner sample` renders in the dtype validation rendered in;
* the optimizer and the learning-rate schedule of the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config import Config

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# lr_scheduler values and the diffusers schedule each one builds
SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}


def weight_dtype(config: Config) -> torch.dtype:
    """The dtype frozen weights are loaded in and activations run in under autocast."""
    return WEIGHT_DTYPES[config.mixed_precision]


def device_type() -> str:
    """``cuda``, ``mps``, ``xpu`` or ``cpu``: the accelerator this process would train on."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    return "cpu"


def has_accelerator() -> bool:
    return device_type() != "cpu"


def build_optimizer(config: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The run's optimizer (``tuner estimate`` builds the same one to count its state)."""
    return torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


def build_lr_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        SCHEDULES[config.lr_scheduler],
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )


def scale_learning_rate(optimizer: torch.optim.Optimizer, lr_scheduler: Any, factor: float) -> None:
    """Multiply the learning rate from now on by ``factor``: the schedule's base rates (through its
    own state dict, so later steps follow the scaled schedule) and the optimizer's current rate."""
    state = lr_scheduler.state_dict()
    state["base_lrs"] = [lr * factor for lr in state["base_lrs"]]
    if "_last_lr" in state:
        state["_last_lr"] = [lr * factor for lr in state["_last_lr"]]
    lr_scheduler.load_state_dict(state)
    for group in optimizer.param_groups:
        group["lr"] *= factor


def autocast(device: str, dtype: torch.dtype):
    """torch's autocast for the compute dtype; off for fp32."""
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
