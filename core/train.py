"""The training loop: caches, model, LoRA, then steps on accelerate. No model family in here.

Read it top to bottom: every family-specific step is a hook call on ``host``. Every random draw
of a micro-batch (sigmas, noise, dropout, guidance) is seeded from (seed, micro-step, rank), and
the data order is a function of the micro-step too, so a resumed run continues exactly as an
uninterrupted one and N processes see what one process with the same global batch would.
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuner.core import __version__, checkpoint, flow
from tuner.core.builtin import validation_prompts
from tuner.core.cache import CachedDataset, PreparedData, collate, prepare_caches, text_key
from tuner.core.config import NO_QUANTIZATION, Config, model_source
from tuner.core.data import scan_dataset
from tuner.core.errors import ConfigError, DataError, Diverged, Interrupted, TunerError, first_line, warn_user
from tuner.core.fixes import checkpoint_blocks
from tuner.core.io import atomic_write, save_safetensors
from tuner.core.lora import add_lora, export_from, file_metadata, lora_parameters, resolve_targets
from tuner.core.types import TrainEvent, ValidationRequest

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.plugins import PluginHost

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_FILE = "pytorch_lora_weights.safetensors"


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


@dataclass
class Position:
    """Where the run is: optimizer steps done, micro-batches consumed, and the guard's state."""

    step: int = 0
    micro_step: int = 0
    lr_scale: float = 1.0
    rollbacks: int = 0


def step_seed(*parts: int) -> int:
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 1_000_003 + int(part) + 0x632BE59BD9B4E019) % (1 << 63)
    return value


class ShardedBatches(torch.utils.data.Sampler):
    """Endless batches of dataset indices for one process.

    Global micro-batch k holds ``local_batch * processes`` indices from epoch ``k // per_epoch``'s
    permutation (seeded by seed and epoch); process r takes its slice. A sampler starting at k
    yields what an uninterrupted one would from k on.
    """

    def __init__(self, size: int, local_batch: int, processes: int, rank: int, seed: int, start: int):
        self.size, self.local, self.rank, self.seed, self.start = size, local_batch, rank, seed, start
        self.global_batch = local_batch * processes
        self.per_epoch = size // self.global_batch
        self._epoch, self._perm = -1, None

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(step_seed(self.seed, epoch, 0xDA7A))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator)
        batch = self._perm[j * self.global_batch : (j + 1) * self.global_batch]
        return batch[self.rank * self.local : (self.rank + 1) * self.local].tolist()

    def __iter__(self):
        k = self.start
        while True:
            yield self.indices(k)
            k += 1


def build_optimizer(config: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The run's optimizer (``tuner estimate`` builds the same one to count its state)."""
    return torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


class Trainer:
    """One run. ``Trainer(host, config).train()``; the pieces are methods so tests can drive them."""

    def __init__(self, host: PluginHost, config: Config, warn: Callable[[str], None] = warn_user):
        from accelerate import Accelerator

        if config.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise config.error("mixed_precision", "fp16 needs a CUDA GPU; use bf16 or no")
        self.host, self.config, self.warn = host, config, warn
        self.output_dir = Path(config.output_dir)
        # cpu=True on a machine without an accelerator, so `torchrun`/`accelerate launch` start
        # gloo processes there too (accelerate only picks multi-CPU when told it is on the CPU)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not _has_accelerator_device())
        sharded = str(self.accelerator.distributed_type).split(".")[-1] in ("FSDP", "DEEPSPEED")
        if sharded and config.checkpointing_steps:
            raise config.error(
                "checkpointing_steps",
                f"full-state checkpoints are not supported under {self.accelerator.distributed_type} yet "
                "(they would read sharded tensors); set it to 0 (the final LoRA is still saved)",
            )
        self.weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        self.device = self.accelerator.device
        self.components: dict[str, Any] = {}  # vae / scheduler, loaded lazily for validation
        self.targets: list[str] = []
        self.model: torch.nn.Module | None = None  # the trained transformer, after train()
        self.position = Position()
        self.interrupted = False
        self.formats = self._lora_formats()

    def _lora_formats(self) -> list[str]:
        value = self.config.lora_format
        wanted = ["diffusers", "comfyui"] if value == "both" else [value] if isinstance(value, str) else list(value)
        known = sorted({f for answer in self.host.hook.lora_formats(config=self.config) for f in answer or []})
        unknown = [f for f in wanted if f not in known]
        if unknown or not wanted:
            raise self.config.error("lora_format", f"{unknown or wanted!r}: choose from {', '.join(known)} or both")
        return wanted

    # -- events -------------------------------------------------------------------------------

    def emit(self, name: str, step: int, **data: Any) -> None:
        if self.accelerator.is_main_process:
            self.host.hook.training_event(event=TrainEvent(name, step, self.config, data, self.log))

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(message)

    # -- setup --------------------------------------------------------------------------------

    def prepare_data(self) -> PreparedData:
        if self.config.data_dir is None:
            raise self.config.error("data_dir", "is required: a folder of images with .txt captions")
        items = scan_dataset(self.config.data_dir, self.warn, self.config.caption_strategy)
        prompts = validation_prompts(self.config)
        extra = prompts + [self.config.validation_negative_prompt or ""] if prompts else []
        with self.accelerator.main_process_first():
            prepared = prepare_caches(self.host, self.config, items, extra, self.device, self.weight_dtype, self.warn)
        prepared.entries = prepared.entries * (1 + self.config.dataset_repeats)
        global_batch = self.config.train_batch_size * self.accelerator.num_processes
        if len(prepared.entries) < global_batch:
            raise DataError(
                f"data_dir {self.config.data_dir} has {len(prepared.entries)} usable image(s), fewer than one "
                f"global batch ({self.config.train_batch_size} x {self.accelerator.num_processes} processes)"
            )
        return prepared

    def report_memory_estimate(self) -> Any:
        """Print what ``tuner estimate`` says for this run; warn when it exceeds the free memory.

        Advisory: a failure to estimate is a warning, never the end of the run."""
        if not (self.config.memory_estimate and self.accelerator.is_main_process):
            return None
        from tuner.core.estimate import available_ram, estimate, free_memory, shortfalls

        device_type = self.device.type
        try:
            found = estimate(self.host, self.config, device_type)
        except Exception as exc:  # advisory: no failure of it (a plugin's, a missing file) may stop a run
            self.warn(f"memory estimate unavailable: {first_line(exc)}")
            return None
        self.log(found.summary())
        for line in shortfalls(found, free_memory(device_type), available_ram()):
            self.warn(line)
        return found

    def load_transformer(self) -> torch.nn.Module:
        config, host = self.config, self.host
        if config.base_model_precision == NO_QUANTIZATION:
            transformer = host.provide("load_model", config=config, component="transformer", dtype=self.weight_dtype)
        else:  # streamed block by block, each block quantized as it arrives
            from tuner.core.quantize import load_quantized

            transformer = load_quantized(host, config, self.weight_dtype)
        transformer.to(self.device)
        patterns = host.provide("lora_target_modules", config=config, transformer=transformer)
        self.targets = resolve_targets(transformer, patterns)
        if not self.targets:
            raise ConfigError(f"{config.source}: LoRA targets {patterns!r} match no Linear module of the model")
        add_lora(transformer, self.targets, config)
        if config.gradient_checkpointing:
            checkpoint_blocks(transformer)
        transformer.train()
        return transformer

    def make_optimizer(self, params: list[torch.nn.Parameter]) -> tuple[torch.optim.Optimizer, Any]:
        from diffusers.optimization import get_scheduler

        config = self.config
        optimizer = build_optimizer(config, params)
        scheduler = get_scheduler(
            "cosine" if config.lr_scheduler == "cosine" else "constant_with_warmup",
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
        )
        return optimizer, scheduler

    # -- the run ------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        self.report_memory_estimate()
        torch.manual_seed(config.seed)  # LoRA initialisation
        prepared = self.prepare_data()
        transformer = self.load_transformer()
        params = lora_parameters(transformer)
        optimizer, lr_scheduler = self.make_optimizer(params)
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
        model = accelerator.unwrap_model(transformer)
        self.model = model

        result = TrainResult(self.output_dir, 0)
        if accelerator.is_main_process:
            checkpoint.prune(self.output_dir, 0)  # leftovers of saves cut off by a crash
        self.initial = self.snapshot(model, optimizer, lr_scheduler)  # rollback target before any checkpoint
        result.resumed_from = self.maybe_resume(model, optimizer, lr_scheduler)
        dataset = CachedDataset(prepared)
        processes = accelerator.num_processes
        effective_batch = config.train_batch_size * config.gradient_accumulation_steps * processes
        self.log(
            f"training {len(prepared.entries)} images, {len(self.targets)} LoRA modules, "
            f"{sum(p.numel() for p in params):,} trainable parameters, effective batch {effective_batch}"
            + (f" ({processes} processes)" if processes > 1 else "")
        )
        self.emit(
            "run_start",
            self.position.step,
            images=len(prepared.entries),
            targets=len(self.targets),
            effective_batch=effective_batch,
            resumed_step=self.position.step if result.resumed_from else None,
        )
        progress = tqdm(
            total=config.max_train_steps,
            initial=self.position.step,
            disable=not accelerator.is_local_main_process,
            desc="steps",
            mininterval=0.1 if sys.stderr.isatty() else 5.0,  # keep redirected logs readable
        )
        previous_handler = signal.signal(signal.SIGINT, self._on_interrupt) if _main_thread() else None
        try:
            batches = self.batches(dataset)
            consecutive_bad = 0
            while self.position.step < config.max_train_steps:
                loss, sigmas, grad_norm = self.optimizer_step(transformer, params, optimizer, batches)
                if loss is None:  # non-finite: skipped
                    consecutive_bad += 1
                    self.emit("skip", self.position.step, consecutive=consecutive_bad)
                    self.log(f"step {self.position.step + 1}: non-finite loss or gradient, step skipped")
                    if consecutive_bad >= config.divergence_skip_limit:
                        self.rollback(model, optimizer, lr_scheduler, consecutive_bad)
                        result.rollbacks = self.position.rollbacks
                        progress.n = self.position.step
                        batches, consecutive_bad = self.batches(dataset), 0
                    continue
                consecutive_bad = 0
                lr_scheduler.step()
                self.position.step += 1
                step = self.position.step
                result.losses.append(loss)
                lr = lr_scheduler.get_last_lr()[0]
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                self.emit(
                    "step_end",
                    step,
                    loss=loss,
                    lr=lr,
                    sigma=sum(sigmas) / len(sigmas),
                    sigmas=[round(s, 5) for s in sigmas],
                    grad_norm=grad_norm,
                )
                last = step == config.max_train_steps
                if self._interrupt_requested():
                    saved = self.save_checkpoint(model, optimizer, lr_scheduler)
                    raise Interrupted(
                        f"interrupted at step {step}; saved {saved}; continue with --set resume_from_checkpoint=latest"
                    )
                if config.checkpointing_steps and step % config.checkpointing_steps == 0 and not last:
                    result.checkpoints.append(self.save_checkpoint(model, optimizer, lr_scheduler))
                if config.validation_steps and step % config.validation_steps == 0 and not last:
                    result.validation_dirs += self.validate(model, prepared, step)
        finally:
            progress.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        result.steps = self.position.step
        if config.checkpointing_steps:  # the final state too, so a finished run can be extended
            result.checkpoints.append(self.save_checkpoint(model, optimizer, lr_scheduler))
        result.lora_files += self.save_lora(model, self.output_dir, self.position.step)
        final_validation = self.validate(model, prepared, self.position.step)
        result.validation_dirs += final_validation
        if final_validation and result.lora_files:
            self.write_recipe(result.lora_files)
        accelerator.wait_for_everyone()
        self.emit("run_end", self.position.step, lora_files=[str(p) for p in result.lora_files])
        accelerator.end_training()
        return result

    def batches(self, dataset: CachedDataset):
        sampler = ShardedBatches(
            len(dataset),
            self.config.train_batch_size,
            self.accelerator.num_processes,
            self.accelerator.process_index,
            self.config.seed,
            self.position.micro_step,
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.config.dataloader_num_workers
        )
        return iter(loader)

    def optimizer_step(self, transformer, params, optimizer, batches) -> tuple[float | None, list[float], float | None]:
        """``gradient_accumulation_steps`` micro-batches, then one optimizer step unless anything is
        non-finite (then the gradients are dropped and the loss returned is None)."""
        config, accelerator = self.config, self.accelerator
        accumulation = config.gradient_accumulation_steps
        losses, sigmas = [], []
        for index in range(accumulation):
            batch = next(batches)
            syncing = index == accumulation - 1
            with nullcontext() if syncing else accelerator.no_sync(transformer):
                loss, drawn = self.training_loss(transformer, batch, self.position.micro_step)
                accelerator.backward(loss / accumulation)
            self.position.micro_step += 1
            losses.append(loss.detach().float())
            sigmas += drawn.tolist()
        step_loss = torch.stack(losses).mean()
        if accelerator.num_processes > 1:
            step_loss = accelerator.reduce(step_loss.to(self.device), reduction="mean")
        limit = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(params, limit)
        if not (torch.isfinite(step_loss) and torch.isfinite(torch.as_tensor(grad_norm))):
            optimizer.zero_grad(set_to_none=True)
            return None, sigmas, None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(step_loss), sigmas, float(grad_norm)

    def training_loss(
        self, transformer: torch.nn.Module, batch: dict[str, Any], micro_step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch: sigmas and noise drawn for the whole global batch (this process takes its
        slice), the family's prediction, and the flow-matching loss."""
        config, accelerator = self.config, self.accelerator
        rollbacks = self.position.rollbacks
        latents = batch["latents"].to(self.device, torch.float32)
        local = latents.shape[0]
        global_shape = (local * accelerator.num_processes, *latents.shape[1:])
        shared = torch.Generator().manual_seed(step_seed(config.seed, micro_step, rollbacks, 0x5EED))
        sigmas = self.host.provide(
            "sample_sigmas", config=config, batch_size=global_shape[0], latent_shape=global_shape, generator=shared
        )
        noise = torch.randn(global_shape, generator=shared)
        mine = slice(accelerator.process_index * local, (accelerator.process_index + 1) * local)
        sigmas, noise = sigmas[mine], noise[mine].to(self.device)
        rank = accelerator.process_index
        own = torch.Generator().manual_seed(step_seed(config.seed, micro_step, rollbacks, 0x10CA1, rank))
        torch.manual_seed(step_seed(config.seed, micro_step, rollbacks, 0xD409, rank))  # LoRA dropout
        noisy, target = flow.noisy_and_target(latents, noise, sigmas.to(self.device))
        text = {k: v.to(self.device) for k, v in batch["text"].items()}
        with accelerator.autocast():
            prediction = self.host.provide(
                "predict_flow",
                transformer=transformer,
                noisy_latents=noisy.to(self.weight_dtype),
                sigmas=sigmas.to(self.device),
                text=text,
                config=config,
                generator=own,
            )
        return flow.flow_loss(prediction, target), sigmas

    # -- interruption, checkpoints, resume, rollback ------------------------------------------

    def _on_interrupt(self, signum, frame) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        self.log("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def _interrupt_requested(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self.interrupted
        flag = torch.tensor(float(self.interrupted), device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum") > 0)

    def snapshot(self, model, optimizer, lr_scheduler) -> dict[str, Any]:
        return {
            # in host memory: the rollback target must not take accelerator memory all run long
            "adapter": {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": checkpoint.optimizer_state(optimizer),
            "scheduler": lr_scheduler.state_dict(),
            "position": Position(),
        }

    def save_checkpoint(self, model, optimizer, lr_scheduler) -> Path:
        accelerator = self.accelerator
        folder = self.output_dir / f"checkpoint-{self.position.step}"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            export = export_from(model, self.config, self.metadata(self.position.step), self.host.family.lora_alpha_in)
            lora = {name: tensors for files in self.exported(export, model).values() for name, tensors in files.items()}
            opt_tensors, opt_state = checkpoint.optimizer_state(optimizer)
            rng_tensors, rng_scalars = checkpoint.rng_state()
            files = {name: (tensors, file_metadata(export)) for name, tensors in lora.items()}
            files["adapter.safetensors"] = (
                {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                None,
            )
            files["optimizer.safetensors"] = (opt_tensors, None)
            files["rng.safetensors"] = (rng_tensors, None)
            state = {
                "tuner_version": __version__,
                "position": vars(self.position),
                "optimizer": opt_state,
                "scheduler": lr_scheduler.state_dict(),
                "rng": rng_scalars,
                "resume_settings": checkpoint.resume_settings(self.config, self.targets),
                "config": self.config.to_dict(),
            }
            checkpoint.write_checkpoint(folder, files, state, lambda: self._last_good(folder))
            checkpoint.prune(self.output_dir, self.config.checkpoints_total_limit or 0)
            self.emit("save", self.position.step, files=[str(folder / name) for name in files], checkpoint=str(folder))
        accelerator.wait_for_everyone()
        return folder

    def _last_good(self, writing: Path) -> str:
        good = [p for _, p in checkpoint.checkpoints(self.output_dir) if p != writing and checkpoint.verify(p) is None]
        return good[-1].name if good else "no earlier checkpoint"

    def restore(self, model, optimizer, lr_scheduler, folder: Path) -> None:
        state, tensors = checkpoint.read_checkpoint(folder)
        checkpoint.check_resume_settings(state["resume_settings"], self.config, self.targets, folder)
        self._load(
            model,
            optimizer,
            lr_scheduler,
            tensors["adapter"],
            (tensors["optimizer"], state["optimizer"]),
            state["scheduler"],
            Position(**state["position"]),
        )
        checkpoint.restore_rng(tensors["rng"], state["rng"])

    def _load(self, model, optimizer, lr_scheduler, adapter, optimizer_state, scheduler_state, position) -> None:
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in adapter.items():
                parameters[name].copy_(value.to(parameters[name].device))
        checkpoint.restore_optimizer(optimizer, *optimizer_state)
        lr_scheduler.load_state_dict(scheduler_state)
        self.position = position

    def maybe_resume(self, model, optimizer, lr_scheduler) -> Path | None:
        wanted = self.config.resume_from_checkpoint
        if not wanted:
            return None
        if wanted == "latest":
            folder = checkpoint.latest_valid(self.output_dir, self.warn)
            if folder is None:
                self.warn(f"resume_from_checkpoint: latest: no checkpoint in {self.output_dir}; starting at step 0")
                return None
        else:
            folder = Path(wanted)
            if not folder.is_dir():
                raise self.config.error("resume_from_checkpoint", f"{folder} is not a checkpoint folder")
        self.restore(model, optimizer, lr_scheduler, folder)
        self.log(f"resumed from {folder} at step {self.position.step}")
        return folder

    def rollback(self, model, optimizer, lr_scheduler, consecutive: int) -> None:
        config = self.config
        rollbacks, scale = self.position.rollbacks, self.position.lr_scale
        if rollbacks >= config.divergence_max_rollbacks:
            raise Diverged(
                f"training diverged: {consecutive} non-finite steps in a row at step {self.position.step + 1} "
                f"after {rollbacks} rollback(s); lower learning_rate (now x{scale:g}), check the data, or raise "
                "divergence_max_rollbacks"
            )
        folder = checkpoint.latest_valid(self.output_dir, self.warn)
        if folder is not None:
            self.restore(model, optimizer, lr_scheduler, folder)
        else:
            start = self.initial
            self._load(
                model, optimizer, lr_scheduler, start["adapter"], start["optimizer"], start["scheduler"], Position()
            )
        self.position.rollbacks = rollbacks + 1
        self.position.lr_scale = scale * config.divergence_lr_factor
        lr_scheduler.base_lrs = [group["initial_lr"] * self.position.lr_scale for group in optimizer.param_groups]
        for group, base, factor in zip(
            optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(lr_scheduler.last_epoch)
        target = folder.name if folder is not None else "the start"
        self.log(f"rolled back to {target} (step {self.position.step}); learning rate x{self.position.lr_scale:g}")
        self.emit(
            "rollback",
            self.position.step,
            to=target,
            lr_scale=self.position.lr_scale,
            rollbacks=self.position.rollbacks,
        )

    # -- outputs ------------------------------------------------------------------------------

    def metadata(self, step: int) -> dict[str, Any]:
        config = self.config
        return {
            "tuner_version": __version__,
            "model_family": config.model_family,
            "model_flavour": config.model_flavour,
            "base_model": model_source(config, self.host.family.flavours),
            "rank": config.network_rank,
            "alpha": config.lora_alpha,
            "dropout": config.lora_dropout,
            "targets": self.targets,
            "steps": step,
            "resolution": config.resolution,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "base_model_precision": config.base_model_precision,
        }

    def exported(self, export: Any, model: torch.nn.Module) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """``{format: {file name: tensors}}`` for every requested format."""
        return {
            fmt: self.host.provide("export_lora", export=export, config=self.config, lora_format=fmt, transformer=model)
            for fmt in self.formats
        }

    def save_lora(self, model: torch.nn.Module, folder: Path, step: int) -> list[Path]:
        """Write the final LoRA in every format, then reread each file as its runtime would."""
        from tuner.core.selftest import self_test

        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return []
        export = export_from(model, self.config, self.metadata(step), self.host.family.lora_alpha_in)
        written: dict[str, list[Path]] = {}
        try:
            for fmt, files in self.exported(export, model).items():
                written[fmt] = [
                    save_safetensors(folder / name, tensors, file_metadata(export)) for name, tensors in files.items()
                ]
        except OSError as exc:
            raise TunerError(
                f"cannot write the LoRA to {folder}: {exc}; {self._last_good(folder)} in {self.output_dir} is intact"
            ) from None
        paths = [p for group in written.values() for p in group]
        self.emit("save", step, files=[str(p) for p in paths])
        self_test(self.host, self.config, model, written)
        self.log(f"self-test passed: {', '.join(p.name for p in paths)} reload as trained")
        return paths

    def validation_seeds(self, count: int) -> list[int]:
        first = self.config.seed if self.config.validation_seed is None else self.config.validation_seed
        return [first + i for i in range(count)]

    def write_recipe(self, lora_files: list[Path]) -> Path:
        """recipe.json and a README with a diffusers snippet, so the previews can be reproduced."""
        from tuner.core.sampling import make_recipe, write_recipe

        config = self.config
        prompts = validation_prompts(config)
        lora = next((p for p in lora_files if p.name == LORA_FILE), lora_files[0])
        size = config.validation_resolution or config.resolution
        recipe = make_recipe(
            self.host, config, lora, self.components["scheduler"], prompts, self.validation_seeds(len(prompts)), size
        )
        return write_recipe(self.output_dir, recipe, self.host.hook.recipe_snippet(recipe=recipe))

    def validate(self, model: torch.nn.Module, prepared: PreparedData, step: int) -> list[Path]:
        config = self.config
        prompts = validation_prompts(config)
        if not prompts or not self.accelerator.is_main_process:
            return []
        for component in ("vae", "scheduler"):
            if component not in self.components:
                loaded = self.host.provide("load_model", config=config, component=component, dtype=self.weight_dtype)
                self.components[component] = loaded.to(self.device) if component == "vae" else loaded
        size = config.validation_resolution or config.resolution
        request = ValidationRequest(
            transformer=model,
            vae=self.components["vae"],
            scheduler=self.components["scheduler"],
            prompts=prompts,
            text=[_batched(prepared.text.load(text_key(p)), self.device) for p in prompts],
            negative_text=_batched(prepared.text.load(text_key(config.validation_negative_prompt or "")), self.device),
            seeds=self.validation_seeds(len(prompts)),
            width=size,
            height=size,
            num_inference_steps=config.validation_num_inference_steps,
            config=config,
            device=self.device,
        )
        was_training = model.training
        model.eval()
        rng = torch.get_rng_state()  # validation must not disturb the training's random stream
        with torch.no_grad(), self.accelerator.autocast():
            images = self.host.provide("generate_images", request=request)
        torch.set_rng_state(rng)
        model.train(was_training)
        folder = self.output_dir / "validation" / f"step_{step:06d}"
        paths = [folder / f"{i:02d}.png" for i in range(len(images))]
        for path, image in zip(paths, images, strict=True):
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        atomic_write(folder / "grid.png", lambda tmp: image_grid(images).save(tmp, format="PNG"))
        atomic_write(
            folder / "prompts.txt",
            lambda tmp: Path(tmp).write_text(
                "".join(f"{i:02d} seed {s}: {p}\n" for i, (p, s) in enumerate(zip(prompts, request.seeds, strict=True)))
            ),
        )
        self.emit("validation", step, folder=str(folder), images=[str(p) for p in paths])
        return [folder]


def _has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return (
        torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu is not None and xpu.is_available())
    )


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _batched(entry: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.unsqueeze(0).to(device) for k, v in entry.items()}


def image_grid(images: list[Any]) -> Any:
    from PIL import Image

    columns = min(len(images), 4)
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def run(host: PluginHost, config: Config, warn: Callable[[str], None] = warn_user) -> TrainResult:
    return Trainer(host, config, warn).train()
