"""The training loop: caches, model, LoRA, then steps on accelerate. No model family in here.

Read :meth:`Trainer.train` top to bottom: every family-specific step is a hook call on the plugin
host, and each other concern has its own module: the training state (:mod:`tuner.core.state`),
checkpoints, resume and rollback (:mod:`tuner.core.resume`), the divergence guard
(:mod:`tuner.core.guard`), LoRA files (:mod:`tuner.core.export`), validation
(:mod:`tuner.core.validation`) and the loss shared with ``tuner estimate`` (:mod:`tuner.core.step`).

Every random draw of a micro-batch (sigmas, noise, dropout, guidance) is seeded from (seed,
micro-step, rank), and the data order is a function of the micro-step too, so a resumed run
continues exactly as an uninterrupted one and N processes see what one process with the same
global batch would.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuner.core import events, rollout
from tuner.core.builtin import validation_prompts
from tuner.core.cache import CachedDataset, PreparedData, collate, default_cache_dir, prepare_caches, text_key
from tuner.core.config import NO_QUANTIZATION, Config
from tuner.core.data import scan_dataset
from tuner.core.datasets import choose as choose_dataset
from tuner.core.datasets import describe as describe_datasets
from tuner.core.datasets import resolve as resolve_datasets
from tuner.core.ema import EMA_SUFFIX, AdapterEMA
from tuner.core.errors import DataError, Interrupted, first_line, warn_user
from tuner.core.evaluation import Evaluator, split_off
from tuner.core.export import save_final
from tuner.core.fixes import no_cudnn_attention
from tuner.core.guard import DivergenceGuard
from tuner.core.io import check_model_folder, folder_problem
from tuner.core.lora import lora_parameters
from tuner.core.resume import Checkpoints
from tuner.core.runinfo import OutputLock, RunRecord, read_run, settle_output_dir
from tuner.core.runtime import (
    attention_kernel,
    build_lr_scheduler,
    build_optimizer,
    choose_cpu_threads,
    new_accelerator,
    weight_dtype,
)
from tuner.core.sampler import DatasetBatches
from tuner.core.state import Position, RunContext, TrainState
from tuner.core.step import attach_lora, flow_matching_loss, step_seed
from tuner.core.validation import Validator

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.plugins import PluginHost


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


@dataclass
class StepOutcome:
    loss: float
    sigmas: list[float]
    grad_norm: float
    sizes: list[list[int]]  # [height, width] in pixels of each micro-batch
    datasets: list[str]  # the dataset of each micro-batch


def _record(record: RunRecord | None, **fields: Any) -> None:
    if record is not None:
        record.update(**fields)


def due(every: int | None, step: int) -> bool:
    return bool(every) and step % every == 0


class Trainer:
    """One run: ``Trainer(host, config).train()``. :meth:`setup`, :meth:`batches` and
    :meth:`optimizer_step` are public so benchmarks and tests can drive single steps."""

    def __init__(self, host: PluginHost, config: Config, warn: Callable[[str], None] = warn_user):
        accelerator = new_accelerator(config.mixed_precision)  # cpu=True without an accelerator (gloo)
        sharded = str(accelerator.distributed_type).split(".")[-1] in ("FSDP", "DEEPSPEED")
        if sharded and config.checkpointing_steps:  # the launch, not the config, decides this
            raise config.error(
                "checkpointing_steps",
                f"full-state checkpoints are not supported under {accelerator.distributed_type} yet "
                "(they would read sharded tensors); set it to 0 (the final LoRA is still saved)",
            )
        self.ctx = RunContext(host, config, accelerator, weight_dtype(config), warn)
        if self.ctx.device.type == "cuda":  # TF32 for the fp32 parts (LoRA, optimizer math, losses)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            no_cudnn_attention()
        self.checkpoints = Checkpoints(self.ctx)
        self.state: TrainState | None = None
        self.empty_caption: dict[str, torch.Tensor] = {}  # the cached "" encoding (caption dropout)
        self.held_out: PreparedData | None = None  # cached images of the eval loss (eval_steps)
        self.datasets: list = []  # the run's datasets (tuner.core.datasets.Dataset), from prepare_data
        self._stop = False
        self.phase = "starting"  # what a Ctrl-C would interrupt, for its message
        self.grids: dict[tuple[int, ...], torch.Tensor] = {}  # scheduled sampling: inference sigmas per size
        self.scheduler: Any = None  # the family's inference scheduler, loaded for the first rollout

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
        self._stop = True

    # -- the run ------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        self.check_folders()  # before any heavy work
        threads = None
        if self.ctx.device.type == "cuda":
            self.ctx.log(attention_kernel(self.ctx.weight_dtype))
        if self.ctx.device.type == "cpu":
            before = read_run(self.config.output_dir) if self.config.resume_from_checkpoint else None
            threads, line = choose_cpu_threads((before or {}).get("cpu_threads"))
            self.ctx.log(line)
        with OutputLock(self.config) if self.ctx.is_main else nullcontext():
            return self._recorded(threads)

    def _recorded(self, threads: int | None) -> TrainResult:
        record = RunRecord(self.config) if self.ctx.is_main else None
        _record(record, cpu_threads=threads)
        try:
            result = self._train(record)
        except Interrupted as exc:
            _record(record, status="stopped", error=str(exc))
            raise
        except KeyboardInterrupt:
            message = self._interrupted_message()
            _record(record, status="interrupted", error=message)
            raise Interrupted(message) from None
        except BaseException as exc:
            _record(record, status="failed", error=first_line(exc))
            raise
        _record(record, status="finished", lora_files=[str(p) for p in result.lora_files], step=result.steps)
        return result

    def _interrupted_message(self) -> str:
        """What a Ctrl-C outside the loop's graceful stop (or a second one) interrupted, and what is safe."""
        if self.phase != "training":
            return f"interrupted while {self.phase}; nothing was trained yet" + (
                " (finished cache entries are kept)" if self.phase == "caching latents and captions" else ""
            )
        step = self.state.position.step if self.state else 0
        good = self.checkpoints.last_good()
        resume = "; continue with --set resume_from_checkpoint=latest" if good.startswith("checkpoint-") else ""
        return f"aborted at step {step} without saving; the last good checkpoint is {good}{resume}"

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
        evaluator = Evaluator(ctx, self.held_out) if config.eval_steps and self.held_out else None
        result = TrainResult(ctx.output_dir, 0, resumed_from=self.checkpoints.resume(state))
        dataset = CachedDataset(prepared)
        self.announce(state, prepared, result.resumed_from)
        self.phase = "training"
        _record(record, status="training", resumed_step=state.position.step if result.resumed_from else None)
        with self.progress_bar(state) as progress, self.stop_on_interrupt():
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
                step, loss = state.position.step, outcome.loss
                if state.ema is not None:
                    state.ema.update(state.model, step)
                result.losses.append(loss)
                lr = state.lr_scheduler.get_last_lr()[0]
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)  # redrawn at its interval
                ctx.emit(
                    events.StepEnd,
                    step,
                    loss=loss,
                    lr=lr,
                    sigma=sum(outcome.sigmas) / len(outcome.sigmas),
                    sigmas=[round(s, 5) for s in outcome.sigmas],
                    grad_norm=outcome.grad_norm,
                    sizes=outcome.sizes,
                    datasets=outcome.datasets,
                )
                last = step == config.max_train_steps
                if self._stop_requested():
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
        ctx, step = self.ctx, state.position.step
        if self.config.checkpointing_steps:  # the final state too, so a finished run can be extended
            result.checkpoints.append(self.checkpoints.save(state))
        ctx.accelerator.wait_for_everyone()
        if ctx.is_main:
            result.lora_files += save_final(ctx, state.model, state.targets, step, self.checkpoints.last_good)
            if state.ema is not None:  # the average as a second set of files, self-tested the same way
                with state.ema.applied(state.model):
                    result.lora_files += save_final(
                        ctx, state.model, state.targets, step, self.checkpoints.last_good, EMA_SUFFIX
                    )
            ctx.emit(events.Save, step, files=[str(p) for p in result.lora_files])
            ctx.log(f"self-test passed: {', '.join(p.name for p in result.lora_files)} reload as trained")
        final_validation = self.validate(validator, state, step)
        result.validation_dirs += final_validation
        if final_validation and result.lora_files:
            validator.write_recipe(result.lora_files, EMA_SUFFIX if self.config.validation_use_ema else "")
        ctx.accelerator.wait_for_everyone()
        ctx.emit(events.RunEnd, step, lora_files=[str(p) for p in result.lora_files])
        ctx.accelerator.end_training()

    def validate(self, validator: Validator, state: TrainState, step: int) -> list[Path]:
        """Validation images, rendered with the EMA weights under ``validation_use_ema`` (the
        trained weights are back in the model afterwards)."""
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
        check_model_folder(self.ctx.host, config)

    def report_memory_estimate(self) -> Any:
        """Print what ``tuner estimate`` says for this run; warn when it exceeds the free memory.

        Advisory: a failure to estimate is a warning, never the end of the run."""
        ctx = self.ctx
        if not (self.config.memory_estimate and ctx.is_main):
            return None
        from tuner.core.estimate import available_ram, free_memory, shortfalls
        from tuner.core.estimate.cached import cached_estimate

        device_type = ctx.device.type
        try:  # remembered under cache_dir: a second start with the same settings skips the tracing
            found, _ = cached_estimate(ctx.host, self.config, device_type, self.config.cache_dir or default_cache_dir())
        except Exception as exc:  # advisory: no failure of it (a plugin's, a missing file) may stop a run
            ctx.warn(f"memory estimate unavailable: {first_line(exc)}")
            return None
        ctx.log(found.summary())
        for line in shortfalls(found, free_memory(device_type), available_ram()):
            ctx.warn(line)
        return found

    def prepare_data(self) -> PreparedData:
        """Every dataset's images in buckets, cached; captions and prompts cached; held-out images
        for the eval loss split off and cached too."""
        ctx, config = self.ctx, self.config
        self.datasets = resolve_datasets(config)
        if not self.datasets:
            raise config.error("data_dir", "is required: a folder of images with .txt captions (or datasets:)")
        prompts = validation_prompts(config)
        extra = prompts + [config.validation_negative_prompt or ""] if prompts else []
        if any(d.config.caption_dropout_probability > 0 for d in self.datasets):
            extra.append("")  # what a dropped caption trains with
        global_batch = config.train_batch_size * ctx.accelerator.num_processes
        scanned = [self.scan(d) for d in self.datasets]
        held_out: list = []
        if config.eval_split:  # from the first dataset
            if config.eval_split >= len(scanned[0]):
                raise config.error(
                    "eval_split", f"{config.eval_split} would hold out every one of the {len(scanned[0])} images"
                )
            scanned[0], held_out = split_off(scanned[0], config.eval_split, config.seed)
        elif config.eval_data_dir:
            held_out = scan_dataset(config.eval_data_dir, ctx.warn, config.caption_strategy)
        parts = []
        micro_batches = config.max_train_steps * config.gradient_accumulation_steps
        weights = [d.weight for d in self.datasets]
        drawn = (  # global batches each dataset gives: how many epochs of random crops to cache
            Counter(choose_dataset(config.seed, k, weights) for k in range(micro_batches))
            if len(weights) > 1
            else {0: micro_batches}
        )
        with ctx.accelerator.main_process_first():
            for number, (dataset, items) in enumerate(zip(self.datasets, scanned, strict=True)):
                with self.naming(dataset):  # no usable image after the filters, or too few for a batch
                    part = prepare_caches(
                        ctx.host, dataset.config, items, extra, ctx.device, ctx.weight_dtype, ctx.warn, global_batch,
                        batch_count=drawn[number],
                    )  # fmt: skip
                    entries = [replace(e, dataset=number) for e in part.entries] * (1 + dataset.config.dataset_repeats)
                    if len(entries) < global_batch:
                        raise DataError(
                            f"data_dir {dataset.config.data_dir} has {len(entries)} usable image(s), fewer than one "
                            f"global batch ({config.train_batch_size} x {ctx.accelerator.num_processes} processes)"
                        )
                parts.append(replace(part, entries=entries))
            if held_out:
                self.held_out = prepare_caches(ctx.host, config, held_out, [], ctx.device, ctx.weight_dtype, ctx.warn)
        if "" in extra:
            self.empty_caption = parts[0].text.load(text_key(""))
        if len(parts) == 1:
            return parts[0]
        shares = describe_datasets(self.datasets)
        table = "\n".join(
            f"{d.label}, {shares[d.id]['share']:.0%} of batches: {p.plan.table()}"
            for d, p in zip(self.datasets, parts, strict=True)
        )
        entries = [e for part in parts for e in part.entries]
        return replace(parts[0], entries=entries, skipped=sum(p.skipped for p in parts), table=table)

    def scan(self, dataset: Any) -> list:
        """A dataset's images and captions."""
        with self.naming(dataset):
            return scan_dataset(dataset.config.data_dir, self.ctx.warn, dataset.config.caption_strategy)

    @contextmanager
    def naming(self, dataset: Any) -> Iterator[None]:
        """With several datasets, a DataError raised inside names the entry."""
        try:
            yield
        except DataError as exc:
            if len(self.datasets) == 1:
                raise
            raise DataError(f"{dataset.label}: {exc}") from None

    def load_transformer(self) -> torch.nn.Module:
        """The frozen denoiser on the device (streamed and quantized when a precision is set)."""
        ctx, config = self.ctx, self.config
        if config.base_model_precision == NO_QUANTIZATION:
            transformer = ctx.host.provide("load_model", config=config, component="transformer", dtype=ctx.weight_dtype)
        else:  # streamed block by block, each block quantized as it arrives
            from tuner.core.quantize import load_quantized

            transformer = load_quantized(ctx.host, config, ctx.weight_dtype, ctx.device)
        return transformer.to(ctx.device)

    def setup(self, transformer: torch.nn.Module | None = None) -> TrainState:
        """Load the denoiser (unless given, from :meth:`load_transformer`), put the LoRA on it,
        build optimizer and schedule, hand them to accelerate, and remember the start as the first
        rollback target."""
        ctx, config = self.ctx, self.config
        transformer = transformer if transformer is not None else self.load_transformer()
        targets = attach_lora(ctx.host, config, transformer)
        transformer.train()
        params = lora_parameters(transformer)
        optimizer = build_optimizer(ctx.host, config, params)
        lr_scheduler = build_lr_scheduler(config, optimizer)
        wrapped, optimizer = ctx.accelerator.prepare(transformer, optimizer)
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

    def announce(self, state: TrainState, prepared: PreparedData, resumed_from: Path | None) -> None:
        ctx, processes, images = self.ctx, self.ctx.accelerator.num_processes, len(prepared.entries)
        effective_batch = self.config.train_batch_size * self.config.gradient_accumulation_steps * processes
        trainable = sum(p.numel() for p in state.params)
        ctx.log(
            f"training {images} images, {len(state.targets)} LoRA modules, {trainable:,} trainable parameters, "
            f"effective batch {effective_batch}" + (f" ({processes} processes)" if processes > 1 else "")
        )
        ctx.log(prepared.table)
        if self.config.lora_type != "lora":
            from tuner.core.adapters import LOADED_BY

            ctx.log(
                f"adapter: {self.config.lora_type}; pytorch_lora_weights.safetensors loads in {LOADED_BY[self.config.lora_type]}"
            )
        ctx.emit(
            events.RunStart,
            state.position.step,
            images=images,
            lora_modules=len(state.targets),
            effective_batch=effective_batch,
            resumed_step=state.position.step if resumed_from else None,
            model=state.model,
        )

    @contextmanager
    def progress_bar(self, state: TrainState) -> Iterator[Any]:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=self.config.max_train_steps,
            initial=state.position.step,
            disable=not self.ctx.accelerator.is_local_main_process,
            desc="steps",
            mininterval=0.1 if sys.stderr.isatty() else 5.0,  # keep redirected logs readable
        )
        try:
            yield progress
        finally:
            progress.close()

    @contextmanager
    def stop_on_interrupt(self) -> Iterator[None]:
        """Ctrl-C, or SIGTERM (what schedulers, ``docker stop`` and a web UI's stop send), requests a
        stop at the end of the step: a checkpoint is saved. A second signal stops at once."""

        def on_signal(signum, frame) -> None:
            self.request_stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.default_int_handler)  # the second one raises KeyboardInterrupt
            name = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
            self.ctx.log(f"{name}: finishing this step, then saving a checkpoint (again to abort)")

        previous = (
            {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
        )
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        accelerator = self.ctx.accelerator
        if accelerator.num_processes == 1:
            return self._stop
        flag = torch.tensor(float(self._stop), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)

    # -- steps --------------------------------------------------------------------------------

    def batches(self, dataset: CachedDataset, position: Position):
        ctx = self.ctx
        sampler = DatasetBatches(
            [e.dataset for e in dataset.prepared.entries],
            dataset.buckets(),
            [d.weight for d in self.datasets] if self.datasets else [1.0],
            self.config.train_batch_size,
            ctx.accelerator.num_processes,
            ctx.accelerator.process_index,
            self.config.seed,
            position.micro_step,
        )
        loader = torch.utils.data.DataLoader(  # pinned on CUDA: the copies below do not block
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.config.dataloader_num_workers,
            pin_memory=ctx.device.type == "cuda",
        )
        return iter(loader)

    def optimizer_step(self, state: TrainState, batches) -> StepOutcome | None:
        """``gradient_accumulation_steps`` micro-batches, then one optimizer step; None when
        anything was non-finite (the gradients are then dropped)."""
        config, accelerator = self.config, self.ctx.accelerator
        accumulation = config.gradient_accumulation_steps
        losses, sigmas, sizes, used = [], [], [], []
        for index in range(accumulation):
            batch = next(batches)
            sizes.append(list(batch["size"]))
            used.append(self.datasets[batch["dataset"]].id if self.datasets else "default")
            syncing = index == accumulation - 1
            with nullcontext() if syncing else accelerator.no_sync(state.wrapped):
                loss, drawn = self.training_loss(state, batch, state.position.micro_step)
                accelerator.backward(loss / accumulation)
            state.position.micro_step += 1
            losses.append(loss.detach().float())
            sigmas += drawn.tolist()
        step_loss = torch.stack(losses).mean()
        if accelerator.num_processes > 1:
            step_loss = accelerator.reduce(step_loss.to(accelerator.device), reduction="mean")
        limit = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(state.params, limit)
        if not (torch.isfinite(step_loss) and torch.isfinite(torch.as_tensor(grad_norm))):
            state.optimizer.zero_grad(set_to_none=True)
            return None
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(float(step_loss), sigmas, float(grad_norm), sizes, used)

    def training_loss(
        self, state: TrainState, batch: dict[str, Any], micro_step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch: sigmas and noise drawn for the whole global batch (this process takes its
        slice), the family's prediction, and the flow-matching loss."""
        ctx, config, accelerator = self.ctx, self.config, self.ctx.accelerator
        rollbacks, rank, device = state.guard.rollbacks, accelerator.process_index, ctx.device
        latents = batch["latents"].to(device, torch.float32, non_blocking=True)
        local = latents.shape[0]
        global_shape = (local * accelerator.num_processes, *latents.shape[1:])
        shared = torch.Generator().manual_seed(step_seed(config.seed, micro_step, rollbacks, 0x5EED))
        sigmas = ctx.host.provide(
            "sample_sigmas", config=config, batch_size=global_shape[0], latent_shape=global_shape, generator=shared
        )
        noise = torch.randn(global_shape, generator=shared)
        mine = slice(rank * local, (rank + 1) * local)
        sigmas, noise = sigmas[mine], noise[mine].to(device)
        text = batch["text"]
        dropout = self.datasets[batch["dataset"]].config.caption_dropout_probability if self.datasets else 0.0
        if dropout > 0:  # drawn for the global batch, like the noise
            dropped = (torch.rand(global_shape[0], generator=shared) < dropout)[mine]
            text = {
                name: torch.where(_rows(dropped, value), self.empty_caption[name], value)
                for name, value in text.items()
            }
        text = {k: v.to(device, non_blocking=True) for k, v in text.items()}
        rolled = None
        if rollout.enabled(config):  # drawn for the global batch, like the noise
            offsets = rollout.draw_offsets(config, state.position.step, global_shape[0], shared)[mine]
            if bool(offsets.any()):
                steps = torch.Generator().manual_seed(step_seed(config.seed, micro_step, rollbacks, 0x2011, rank))
                rolled = rollout.roll_out(
                    ctx.host, config, state.model, latents, noise, sigmas.to(device), offsets,
                    self.inference_grid(global_shape), text, steps, ctx.weight_dtype, accelerator.autocast,
                )  # fmt: skip
        own = torch.Generator().manual_seed(step_seed(config.seed, micro_step, rollbacks, 0x10CA1, rank))
        torch.manual_seed(step_seed(config.seed, micro_step, rollbacks, 0xD409, rank))  # LoRA dropout
        loss = flow_matching_loss(
            ctx.host, config, state.wrapped, latents, noise, sigmas.to(device), text, own, ctx.weight_dtype,
            accelerator.autocast(), rolled,
        )  # fmt: skip
        return loss, sigmas

    def inference_grid(self, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The family's inference sigmas at this bucket's size, for scheduled sampling (kept per size)."""
        key = tuple(latent_shape[1:])
        if key not in self.grids:
            ctx = self.ctx
            if self.scheduler is None:
                self.scheduler = ctx.host.provide(
                    "load_model", config=self.config, component="scheduler", dtype=ctx.weight_dtype
                )
            self.grids[key] = rollout.inference_grid(ctx.host, self.config, self.scheduler, latent_shape)
        return self.grids[key]


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample boolean mask shaped to broadcast over ``like``'s trailing dimensions."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run(host: PluginHost, config: Config, warn: Callable[[str], None] = warn_user) -> TrainResult:
    """A run as `tuner run` starts it: an output_dir holding an earlier run is dealt with first
    (``existing_output``), then the Trainer trains."""
    main = os.environ.get("RANK", "0") == "0"  # every process decides (the same); the first one says so
    config = settle_output_dir(config, print if main else lambda message: None)
    return Trainer(host, config, warn).train()
