"""Where and in what precision a run computes, and what it optimizes with: one rule for training,
``tuner estimate`` and ``tuner sample``.

* the device type: CUDA, then MPS, then XPU, else the CPU;
* the weight dtype of frozen weights: what ``mixed_precision`` names (``no`` is fp32), the same
  on every device, so `tuner sample` renders in the dtype validation rendered in;
* the optimizer (by its registered name) and the learning-rate schedule of the run.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# lr_scheduler values and the diffusers schedule each one builds
# lr_scheduler -> diffusers' get_scheduler name ("constant" warms up too when lr_warmup_steps is set)
SCHEDULES = {
    "constant": "constant_with_warmup",
    "constant_with_warmup": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_restarts": "cosine_with_restarts",
    "polynomial": "polynomial",
}


def weight_dtype(config: Config) -> torch.dtype:
    """The dtype frozen weights are loaded in and activations run in under autocast."""
    return WEIGHT_DTYPES[config.mixed_precision]


def trained_dtype(config: Config) -> torch.dtype:
    """The dtype the denoiser is loaded in: the frozen weights' (a LoRA trains in fp32 beside
    them); model_type: full trains fp32 master weights, or bf16 with bf16_stochastic_rounding."""
    if config.get("model_type", "lora") != "full":
        return weight_dtype(config)
    return torch.bfloat16 if config.get("bf16_stochastic_rounding") else torch.float32


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


def new_accelerator(mixed_precision: str, timeout_s: int | None = None, unused_weights: bool = False) -> Any:
    """An ``accelerate.Accelerator`` for one run (``cpu=True`` on a machine without an accelerator,
    so ``torchrun``/``accelerate launch`` start gloo processes there too).

    accelerate keeps its state per process and refuses a second Accelerator with another
    mixed precision ("AcceleratorState has already been initialized"); a process that runs several
    trainings or samples (tests, a notebook, the web UI's tests) gets a fresh state each time. A
    launched multi-process run trains once per process and keeps its state as it is. ``timeout_s``:
    how long a collective waits for the other processes (``process_group_timeout``);
    ``unused_weights``: the family's ``FamilyInfo.unused_weights`` (DDP looks for them each step)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)  # noqa: SLF001 - accelerate offers no public reset (see the docstring)
    handlers = []
    if timeout_s is not None:
        from tuner.core.training.sharding import process_group_timeout

        handlers.append(process_group_timeout(timeout_s))
    if unused_weights:
        from accelerate.utils import DistributedDataParallelKwargs

        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(mixed_precision=mixed_precision, cpu=not has_accelerator(), kwargs_handlers=handlers)


def has_accelerator() -> bool:
    return device_type() != "cpu"


def build_optimizer(host: Any, config: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The run's optimizer, by its registered name (``tuner estimate`` builds the same one to count
    its state). An argument the optimizer does not take is a one-line error naming it."""
    from tuner.core.config.keys.optimization import optimizer_options

    info = host.optimizers[config.optimizer]
    options = optimizer_options(config)
    try:
        return info.build(config, params, options)
    except TypeError as exc:  # an optimizer_config name the constructor does not take
        if not options:
            raise
        from tuner.core.errors import first_line

        raise config.error("optimizer_config", f"{config.optimizer}: {first_line(exc)}") from None
    except ValueError as exc:  # a value the optimizer rejects (a negative lr, betas out of range)
        from tuner.core.errors import first_line

        raise config.error("optimizer", f"{config.optimizer} refuses its settings: {first_line(exc)}") from None


def build_lr_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        SCHEDULES[config.lr_scheduler],
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
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


# -- CPU threads ----------------------------------------------------------------------------------


def idle_cores(interval: float = 0.1) -> float | None:
    """How many of this machine's cores were idle over ``interval`` seconds (from /proc/stat), or
    None where that cannot be read."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (idle1 - idle0) / max(1, total1 - total0)


def threads_for(usable: int, idle: float | None) -> int:
    """Intra-op threads for a CPU run: the cores this process may use that are not busy now. A
    thread pool larger than the idle cores spins against the other work and collapses (the tiny
    example: 4.6x slower with 2 threads beside one busy process, 1.0x with 1)."""
    if idle is None:
        return usable
    return max(1, min(usable, int(idle + 0.5)))


def choose_cpu_threads(resumed: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads unless the user chose (``OMP_NUM_THREADS``); returns them and
    the line the run prints. A resumed run takes the threads of the run it continues (``resumed``):
    CPU kernels may sum in another order with another thread count, and a resume is bit-exact."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    usable = max(1, usable // int(os.environ.get("LOCAL_WORLD_SIZE") or 1))  # processes of one machine share
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"CPU threads: {torch.get_num_threads()} (OMP_NUM_THREADS)"
    if resumed:
        torch.set_num_threads(resumed)
        return resumed, f"CPU threads: {resumed} (as the run it resumes, for an exact resume)"
    idle = idle_cores()
    threads = threads_for(usable, idle)
    torch.set_num_threads(threads)
    seen = f", {idle:.1f} idle now" if idle is not None else ""
    return threads, f"CPU threads: {threads} ({usable} usable cores{seen}; OMP_NUM_THREADS to choose)"


def attention_kernel(dtype: torch.dtype) -> str:
    """Which scaled-dot-product-attention kernel a masked attention gets on this GPU, said once at
    start (Chroma and masked Flux pass a boolean mask, which flash attention does not take)."""
    try:
        q = torch.zeros(1, 2, 64, 64, device="cuda", dtype=dtype)
        mask = torch.ones(1, 1, 64, 64, device="cuda", dtype=torch.bool)
        params = torch.backends.cuda.SDPAParams(q, q, q, mask, 0.0, False, False)
        if torch.backends.cuda.can_use_flash_attention(params, False):
            kernel = "flash"
        elif torch.backends.cuda.can_use_efficient_attention(params, False):
            kernel = "memory-efficient"
        else:
            kernel = "math (slow)"
    except Exception as exc:  # an API that moved between torch versions: say so, never stop a run
        return f"attention: masked attention kernel unknown ({type(exc).__name__})"
    return f"attention: masked scaled-dot-product attention uses the {kernel} kernel"
