"""The training loop: caches, model, LoRA, then steps on accelerate. No model family in here.

Read :meth:`Trainer.train` top to bottom. Every family-specific step is a hook call on the plugin
host, and every other concern has its own room: the data made ready (:mod:`tuner.core.run.preparation`),
one optimizer step and its loss, shared with ``tuner estimate`` (:mod:`tuner.core.training.stepper`),
stopping on a signal (:mod:`tuner.core.run.stopping`), what the run reports
(:mod:`tuner.core.run.reporting`), checkpoints, resume and rollback (:mod:`tuner.core.outputs.resume`),
the LoRA files (:mod:`tuner.core.outputs.export`) and validation (:mod:`tuner.core.run.validation`).

Every random draw of a micro-batch is seeded from where it happens and the data order is a function
of the micro-step, so a resumed run continues exactly as an uninterrupted one and N processes train
what one process with the same global batch would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuner.core.config.keys.model import NO_QUANTIZATION
from tuner.core.data.cache import CachedDataset, PreparedData, default_cache_dir
from tuner.core.errors import Interrupted, first_line, warn_user
from tuner.core.fixes import no_cudnn_attention
from tuner.core.host import events
from tuner.core.io import folder_problem
from tuner.core.model.hub import check_model_folder
from tuner.core.model.lora import lora_parameters
from tuner.core.model.swap import move_unswapped, swap_blocks
from tuner.core.outputs.export import save_final
from tuner.core.outputs.resume import Checkpoints
from tuner.core.outputs.runinfo import OutputLock, RunRecord, forget_untrained_run, read_run, settle_output_dir
from tuner.core.run import reporting
from tuner.core.run.evaluation import Evaluator
from tuner.core.run.planning import apply_memory_budget
from tuner.core.run.preparation import RunData, check_data_folders, prepare_data
from tuner.core.run.stopping import StopRequest, interrupted_message
from tuner.core.run.validation import Validator
from tuner.core.training.ema import EMA_SUFFIX, AdapterEMA
from tuner.core.training.full import enable_stochastic_rounding
from tuner.core.training.guard import DivergenceGuard
from tuner.core.training.runtime import (
    attention_kernel,
    build_lr_scheduler,
    build_optimizer,
    choose_cpu_threads,
    new_accelerator,
    trained_dtype,
    weight_dtype,
)
from tuner.core.training.sharding import gathered, in_turns, shard
from tuner.core.training.state import Position, RunContext, TrainState
from tuner.core.training.step import attach_lora
from tuner.core.training.stepper import StepOutcome, Stepper

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config
    from tuner.core.host.manager import PluginHost


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    lora_files: list[Path] = field(default_factory=list)
    validation_dirs: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: Path | None = None
    rollbacks: int = 0
    eval_losses: list[float | None] = field(default_factory=list)  # mean eval loss per evaluation (main process)


def due(every: int | None, step: int) -> bool:
    return bool(every) and step % every == 0


class Trainer:
    """One run: ``Trainer(host, config).train()``. :meth:`prepare_data`, :meth:`setup`,
    :meth:`batches` and :meth:`optimizer_step` are public so benchmarks and tests can drive steps."""

    def __init__(self, host: PluginHost, config: Config, warn: Callable[[str], None] = warn_user):
        # cpu=True without an accelerator (gloo)
        accelerator = new_accelerator(config.mixed_precision, config.process_group_timeout, host.family.unused_weights)
        check_launch(accelerator, config)
        self.ctx = RunContext(host, config, accelerator, weight_dtype(config), warn)
        self.fsdp = bool(config.fsdp_enable) and accelerator.num_processes > 1
        if config.fsdp_enable and not self.fsdp:
            self.ctx.warn("fsdp_enable: one process, nothing to shard; training unsharded")
        if self.ctx.device.type == "cuda":  # TF32 for the fp32 parts (LoRA, optimizer math, losses)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            no_cudnn_attention()
        self.checkpoints = Checkpoints(self.ctx)
        self.state: TrainState | None = None
        self.data: RunData | None = None
        self.stepper = Stepper(self.ctx, [], {})
        self.stop = StopRequest(self.ctx.log)
        self.phase = "starting"  # what a Ctrl-C would interrupt, for its message

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def model(self) -> torch.nn.Module | None:
        """The trained transformer, once set up."""
        return self.state.model if self.state else None

    @property
    def targets(self) -> list[str]:
        return self.state.targets if self.state else []

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and stop (what Ctrl-C does)."""
        self.stop.request()

    # -- the run ------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        created = self.ctx.is_main and not self.ctx.output_dir.exists()
        try:
            return self._run()
        except BaseException:
            if created and self.phase != "training":  # nothing trained: the folder goes as it came
                forget_untrained_run(self.ctx.output_dir)
            raise

    def _run(self) -> TrainResult:
        self.check_folders()  # before any heavy work
        threads = None
        if self.ctx.device.type == "cuda":
            self.ctx.log(attention_kernel(self.ctx.weight_dtype))
        if self.ctx.device.type == "cpu":
            before = read_run(self.config.output_dir) if self.config.resume_from_checkpoint else None
            threads, line = choose_cpu_threads((before or {}).get("cpu_threads"))
            self.ctx.log(line)
        apply_memory_budget(self.ctx)  # memory_budget: the plan's keys, before the run is recorded
        with OutputLock(self.config) if self.ctx.is_main else nullcontext():
            record = RunRecord(self.config) if self.ctx.is_main else None
            _record(record, cpu_threads=threads)
            try:
                result = self._train(record)
            except Interrupted as exc:
                _record(record, status="stopped", error=str(exc))
                raise
            except KeyboardInterrupt:
                step = self.state.position.step if self.state else 0
                message = interrupted_message(self.phase, step, self.checkpoints.last_good())
                _record(record, status="interrupted", error=message)
                raise Interrupted(message) from None
            except BaseException as exc:
                _record(record, status="failed", error=first_line(exc))
                raise
            _record(record, status="finished", lora_files=[str(p) for p in result.lora_files], step=result.steps)
            return result

    def _train(self, record: RunRecord | None) -> TrainResult:
        ctx, config = self.ctx, self.config
        self.phase = "estimating memory"
        self.report_memory_estimate()
        torch.manual_seed(config.seed)  # LoRA initialisation
        self.phase = "caching latents and captions"
        prepared = self.prepare_data()
        self.phase = "loading the model"
        state = self.setup()
        validator = Validator(ctx, prepared)
        held_out = self.data.held_out if self.data else None
        evaluator = Evaluator(ctx, held_out) if config.eval_steps and held_out else None
        result = TrainResult(ctx.output_dir, 0, resumed_from=self.checkpoints.resume(state))
        dataset = CachedDataset(prepared, config.seed)
        reporting.announce(ctx, state, prepared, result.resumed_from)
        self.phase = "training"
        _record(record, status="training", resumed_step=state.position.step if result.resumed_from else None)
        with reporting.progress_bar(ctx, state) as progress, self.stop.on_signals():
            batches = self.batches(dataset, state.position)
            first_step = time.perf_counter()
            while state.position.step < config.max_train_steps:
                outcome = self.optimizer_step(state, batches)
                if config.compile and first_step:  # compile: true pays its compile time here
                    ctx.log(f"compile: the first step took {time.perf_counter() - first_step:.1f} s (compiling)")
                    first_step = 0.0
                if outcome is None:  # non-finite: the step was dropped
                    roll_back = state.guard.skipped_step()
                    ctx.emit(events.Skip, state.position.step, consecutive=state.guard.consecutive)
                    ctx.log(f"step {state.position.step + 1}: non-finite loss or gradient, step skipped")
                    if roll_back:
                        self.checkpoints.roll_back(state)
                        result.rollbacks = state.guard.rollbacks
                        progress.n = state.position.step
                        batches = self.batches(dataset, state.position)
                    continue
                state.guard.finite_step()
                state.lr_scheduler.step()
                state.position.step += 1
                step = state.position.step
                if state.ema is not None:
                    state.ema.update(state.model, step)
                result.losses.append(outcome.loss)
                reporting.report_step(ctx, state, outcome, progress)
                last = step == config.max_train_steps
                if self.stop.agreed(ctx.accelerator):
                    saved = self.checkpoints.save(state)
                    raise Interrupted(
                        f"interrupted at step {step}; saved {saved}; continue with --set resume_from_checkpoint=latest"
                    )
                if due(config.checkpointing_steps, step) and not last:
                    result.checkpoints.append(self.checkpoints.save(state))
                if evaluator and due(config.eval_steps, step) and not last:
                    result.eval_losses.append(evaluator.run(state.model, step))
                if due(config.validation_steps, step) and not last:
                    result.validation_dirs += self.validate(validator, state, step)
        result.steps = state.position.step
        if evaluator:
            result.eval_losses.append(evaluator.run(state.model, state.position.step))
        self.finish(state, validator, result)
        return result

    def finish(self, state: TrainState, validator: Validator, result: TrainResult) -> None:
        """The final checkpoint, the LoRA files (self-tested), the last validation and the recipe."""
        ctx, step, config = self.ctx, state.position.step, self.config
        if self.config.checkpointing_steps:  # the final state too, so a finished run can be extended
            result.checkpoints.append(self.checkpoints.save(state))
        ctx.accelerator.wait_for_everyone()
        # sharded (FSDP2): every process gathers, the main one writes (a LoRA: the adapter; full: everything)
        trainable_only = config.model_type != "full"
        with gathered(state.model, trainable_only, keep=ctx.is_main):
            if ctx.is_main:
                result.lora_files += save_final(ctx, state.model, state.targets, step, self.checkpoints.last_good)
        if state.ema is not None:  # the average as a second set of files, self-tested the same way
            with state.ema.applied(state.model), gathered(state.model, trainable_only, keep=ctx.is_main):
                if ctx.is_main:
                    result.lora_files += save_final(
                        ctx, state.model, state.targets, step, self.checkpoints.last_good, EMA_SUFFIX
                    )
        if ctx.is_main:
            ctx.emit(events.Save, step, files=[str(p) for p in result.lora_files])
            ctx.log(f"self-test passed: {', '.join(p.name for p in result.lora_files)} reload as trained")
        final_validation = self.validate(validator, state, step)
        result.validation_dirs += final_validation
        if final_validation and result.lora_files and config.model_type != "full":  # recipes apply a LoRA
            validator.write_recipe(result.lora_files, EMA_SUFFIX if self.config.validation_use_ema else "")
        ctx.accelerator.wait_for_everyone()
        ctx.emit(events.RunEnd, step, lora_files=[str(p) for p in result.lora_files])
        ctx.accelerator.end_training()

    def validate(self, validator: Validator, state: TrainState, step: int) -> list[Path]:
        """Validation images, rendered with the EMA weights under ``validation_use_ema`` (the
        trained weights are back in the model afterwards)."""
        held = 0
        if self.swap is not None and self.config.validation_blocks_to_swap is not None:
            held = self.config.blocks_to_swap - min(self.config.validation_blocks_to_swap, self.config.blocks_to_swap)
        with self.swap.holding(held) if held else nullcontext():  # validation swaps fewer blocks
            if state.ema is not None and self.config.validation_use_ema:
                with state.ema.applied(state.model):
                    return validator.run(state.model, step)
            return validator.run(state.model, step)

    # -- setup --------------------------------------------------------------------------------

    def check_folders(self) -> None:
        """output_dir and cache_dir must be folders tuner can write to: a one-line error naming the
        key now, not after caching and loading."""
        config = self.config
        for key, path in (("output_dir", config.output_dir), ("cache_dir", config.cache_dir or default_cache_dir())):
            problem = folder_problem(path)
            if problem is not None:
                raise config.error(key, problem)
        check_data_folders(config)  # before the estimate and any hub look-up: seconds, not a minute
        check_model_folder(self.ctx.host, config)

    def report_memory_estimate(self) -> Any:
        return reporting.report_memory_estimate(self.ctx)

    def prepare_data(self) -> PreparedData:
        """Every dataset cached (:func:`tuner.core.run.preparation.prepare_data`); the steps draw from it."""
        self.data = prepare_data(self.ctx)
        self.stepper = Stepper(self.ctx, self.data.datasets, self.data.dropped_captions)
        return self.data.prepared

    def load_transformer(self) -> torch.nn.Module:
        """The frozen denoiser on the device (streamed and quantized when a precision is set)."""
        ctx, config = self.ctx, self.config
        if config.base_model_precision == NO_QUANTIZATION:
            dtype = trained_dtype(config)  # a full fine-tune's master weights: fp32 (or bf16, rounded stochastically)
            transformer = ctx.host.provide("load_model", config=config, component="transformer", dtype=dtype)
        else:  # streamed block by block, each block quantized as it arrives
            from tuner.core.model.quantize import load_quantized

            transformer = load_quantized(ctx.host, config, ctx.weight_dtype, ctx.device)
        if config.blocks_to_swap or self.fsdp:  # setup moves it: swapped blocks stay in RAM; FSDP2 moves shards
            return transformer
        return transformer.to(ctx.device)

    def setup(self, transformer: torch.nn.Module | None = None) -> TrainState:
        """Load the denoiser (unless given, from :meth:`load_transformer`), put the LoRA on it,
        build optimizer and schedule, hand them to accelerate, and remember the start as the first
        rollback target."""
        ctx, config = self.ctx, self.config
        if transformer is None and self.fsdp:  # fsdp_cpu_ram_efficient_loading: a machine's processes take turns
            transformer, targets = in_turns(ctx.accelerator, self.load_trainable, config.fsdp_cpu_ram_efficient_loading)
        else:
            transformer = transformer if transformer is not None else self.load_transformer()
            targets = self.make_trainable(transformer)
        params = lora_parameters(transformer)
        optimizer = build_optimizer(ctx.host, config, params)
        if config.get("bf16_stochastic_rounding"):
            enable_stochastic_rounding(optimizer, config.seed)
        lr_scheduler = build_lr_scheduler(config, optimizer)
        if self.fsdp:  # sharded already: accelerate prepares the optimizer only
            wrapped, optimizer = transformer, ctx.accelerator.prepare(optimizer)
        else:  # placed above (accelerate's own .to() would copy the swapped blocks' emptied storages)
            wrapped, optimizer = ctx.accelerator.prepare(transformer, optimizer, device_placement=[False, True])
        self.state = TrainState(
            model=ctx.accelerator.unwrap_model(wrapped),
            wrapped=wrapped,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            params=params,
            targets=targets,
            guard=DivergenceGuard.from_config(config),
            ema=AdapterEMA.from_config(config, transformer, ctx.device),
        )
        self.checkpoints.remember_start(self.state)
        return self.state

    def load_trainable(self) -> tuple[torch.nn.Module, list[str]]:
        transformer = self.load_transformer()
        return transformer, self.make_trainable(transformer)

    def make_trainable(self, transformer: torch.nn.Module) -> list[str]:
        """The LoRA (or the full model's trainable weights) on ``transformer``, block swap, then the
        model on the device, or sharded (FSDP2); returns the adapted modules."""
        ctx, config = self.ctx, self.config
        targets = attach_lora(ctx.host, config, transformer)
        self.swap = swap_blocks(transformer, config.blocks_to_swap, ctx.device, config.error)
        if self.swap is not None and ctx.device.type == "cpu":
            ctx.warn("blocks_to_swap: on a CPU the weights stay in RAM either way; swapping saves nothing here")
        elif self.swap is not None and not self.swap.pinned:
            ctx.warn(
                "blocks_to_swap: the system refused to lock host memory (pinning: ulimit -l); the swapped "
                "blocks are copied unpinned, more slowly and without overlapping the compute"
            )
        if config.activation_offload and ctx.device.type == "cpu":
            ctx.warn("activation_offload: on a CPU activations are in RAM either way; offloading saves nothing here")
        transformer.train()
        if self.fsdp:  # before the optimizer (it steps the shards); each process moves only its shards to the device
            blocks = shard(transformer, ctx.weight_dtype, config.fsdp_reshard_after_forward)
            if not blocks:
                ctx.warn("fsdp_enable: the denoiser lists no blocks (_repeated_blocks): one unit, gathered whole")
            turns = " (each machine's processes load it in turns)" if config.fsdp_cpu_ram_efficient_loading else ""
            ctx.log(
                f"FSDP2: {blocks} blocks and the rest sharded across {ctx.accelerator.num_processes} processes{turns}"
            )
        else:
            move_unswapped(transformer, ctx.device)  # a swapped block's weights stay in host memory
        return targets

    # -- steps (tuner.core.training.stepper) ----------------------------------------------------

    def batches(self, dataset: CachedDataset, position: Position):
        return self.stepper.batches(dataset, position)

    def optimizer_step(self, state: TrainState, batches) -> StepOutcome | None:
        return self.stepper.optimizer_step(state, batches)


def check_launch(accelerator: Any, config: Config) -> None:
    """accelerate's own FSDP and DeepSpeed plugins are not how tuner shards (the launch, not the
    config, selects them): one line that says what to launch instead."""
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind in ("FSDP", "DEEPSPEED"):
        raise config.error(
            "fsdp_enable",
            f"the run was launched with accelerate's {kind} plugin; tuner shards with FSDP2 itself: launch as for "
            "DDP (accelerate launch --multi_gpu, or torchrun) with fsdp_enable: true",
        )


def _record(record: RunRecord | None, **fields: Any) -> None:
    if record is not None:
        record.update(**fields)


def run(host: PluginHost, config: Config, warn: Callable[[str], None] = warn_user) -> TrainResult:
    """A run as `tuner run` starts it: an output_dir holding an earlier run is dealt with first
    (``existing_output``), then the Trainer trains."""
    main = os.environ.get("RANK", "0") == "0"  # every process decides (the same); the first one says so
    config = settle_output_dir(config, print if main else lambda message: None, main)
    return Trainer(host, config, warn).train()
