"""What a run tells its user and its observers: the memory estimate before anything loads, the
start line (images, modules, batch, adapter), the progress bar, and a StepEnd event per step."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.core.data.cache import default_cache_dir
from tuner.core.errors import first_line
from tuner.core.host import events

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.data.cache import PreparedData
    from tuner.core.training.state import RunContext, TrainState
    from tuner.core.training.stepper import StepOutcome


def report_memory_estimate(ctx: RunContext) -> Any:
    """Print what ``tuner estimate`` says for this run; warn when it exceeds the free memory.

    Advisory: a failure to estimate is a warning, never the end of the run."""
    config = ctx.config
    if not (config.memory_estimate and ctx.is_main):
        return None
    from tuner.core.estimate import available_ram, free_memory, shortfalls
    from tuner.core.estimate.cached import cached_estimate
    from tuner.core.estimate.sharded import per_process

    device_type = ctx.device.type
    try:  # remembered under cache_dir: a second start with the same settings skips the tracing
        found, _ = cached_estimate(ctx.host, config, device_type, config.cache_dir or default_cache_dir())
        found = per_process(found, config, ctx.accelerator.num_processes)  # fsdp_enable: this process's share
    except Exception as exc:  # advisory: no failure of it (a plugin's, a missing file) may stop a run
        ctx.warn(f"memory estimate unavailable: {first_line(exc)}")
        return None
    ctx.log(found.summary())
    full = config.get("model_type", "lora") == "full"
    for line in shortfalls(found, free_memory(device_type), available_ram(), full):
        if full and f" of {device_type} memory (train)" in line:  # its training step cannot fit: refused now
            from tuner.core.errors import ConfigError

            raise ConfigError(f"{config.source}: model_type: full: {line}")
        ctx.warn(line)
    return found


def announce(ctx: RunContext, state: TrainState, prepared: PreparedData, resumed_from: Path | None) -> None:
    """The start line, the bucket table, and the RunStart event."""
    config, processes, images = ctx.config, ctx.accelerator.num_processes, len(prepared.entries)
    effective_batch = config.train_batch_size * config.gradient_accumulation_steps * processes
    trainable = sum(p.numel() for p in state.params)
    full = config.model_type == "full"
    ctx.log(
        f"training {images} images, {len(state.targets)} {'modules in full' if full else 'LoRA modules'}, "
        f"{trainable:,} trainable parameters, effective batch {effective_batch}"
        + (f" ({processes} processes)" if processes > 1 else "")
    )
    ctx.log(prepared.table)
    if full:
        frozen = [p for p, _ in state.model.named_parameters() if not _.requires_grad]
        weights = "bf16 weights, stochastic rounding" if config.bf16_stochastic_rounding else "fp32 master weights"
        ctx.log(f"model_type: full, {weights}; {len(frozen)} tensors frozen; writes transformer/ (diffusers)")
    else:
        loaded_by_line(ctx)
    ctx.emit(
        events.RunStart,
        state.position.step,
        images=images,
        lora_modules=len(state.targets),
        effective_batch=effective_batch,
        resumed_step=state.position.step if resumed_from else None,
        model=state.model,
    )


def loaded_by_line(ctx: RunContext) -> None:
    """Which runtimes load the LoRA file (and where ComfyUI needs its own)."""
    config = ctx.config
    adapter = ctx.host.adapter_types[config.lora_type]
    loaded_by = adapter.loaded_by
    if not ctx.host.family.comfyui_reads_diffusers_files and loaded_by.startswith("diffusers and ComfyUI"):
        loaded_by = f"diffusers; ComfyUI loads {ctx.host.family.name}'s diffusers file only in part: " + (
            "give it the comfyui file" if "comfyui" in config.lora_format else "set lora_format comfyui (or all)"
        )
    ctx.log(f"adapter: {adapter.name}; pytorch_lora_weights.safetensors loads in {loaded_by}")


@contextmanager
def progress_bar(ctx: RunContext, state: TrainState) -> Iterator[Any]:
    from tqdm.auto import tqdm

    progress = tqdm(
        total=ctx.config.max_train_steps,
        initial=state.position.step,
        disable=not ctx.accelerator.is_local_main_process,
        desc="steps",
        mininterval=0.1 if sys.stderr.isatty() else 5.0,  # keep redirected logs readable
    )
    try:
        yield progress
    finally:
        progress.close()


def report_step(ctx: RunContext, state: TrainState, outcome: StepOutcome, progress: Any) -> None:
    """A finished step on the progress bar and as a StepEnd event."""
    lr = state.lr_scheduler.get_last_lr()[0]
    progress.update(1)
    progress.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{lr:.2e}", refresh=False)  # redrawn at its interval
    ctx.emit(
        events.StepEnd,
        state.position.step,
        loss=outcome.loss,
        lr=lr,
        sigma=sum(outcome.sigmas) / len(outcome.sigmas),
        sigmas=[round(s, 5) for s in outcome.sigmas],
        grad_norm=outcome.grad_norm,
        sizes=outcome.sizes,
        datasets=outcome.datasets,
    )
