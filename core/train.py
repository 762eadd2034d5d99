"""The training loop: caches, model, LoRA, then steps on accelerate. No model family in here.

Read it top to bottom: every family-specific step is a hook call on ``host``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuner.core import __version__, flow
from tuner.core.builtin import validation_prompts
from tuner.core.cache import CachedDataset, PreparedData, collate, prepare_caches, text_key
from tuner.core.config import NO_QUANTIZATION, Config, model_source
from tuner.core.data import scan_dataset
from tuner.core.errors import ConfigError, DataError, warn_user
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


class Trainer:
    """One run. ``Trainer(host, config).train()``; the pieces are methods so tests can drive them."""

    def __init__(self, host: PluginHost, config: Config, warn: Callable[[str], None] = warn_user):
        from accelerate import Accelerator

        if config.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise config.error("mixed_precision", "fp16 needs a CUDA GPU; use bf16 or no")
        self.host, self.config, self.warn = host, config, warn
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        self.weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        self.device = self.accelerator.device
        self.components: dict[str, Any] = {}  # vae / scheduler, loaded lazily for validation
        self.targets: list[str] = []
        self.model: torch.nn.Module | None = None  # the trained transformer, after train()

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
        items = scan_dataset(self.config.data_dir, self.warn)
        prompts = validation_prompts(self.config)
        extra = prompts + [self.config.validation_negative_prompt or ""] if prompts else []
        with self.accelerator.main_process_first():
            prepared = prepare_caches(self.host, self.config, items, extra, self.device, self.weight_dtype, self.warn)
        if len(prepared.entries) < self.config.train_batch_size:
            raise DataError(
                f"data_dir {self.config.data_dir} has {len(prepared.entries)} usable image(s), "
                f"fewer than train_batch_size {self.config.train_batch_size}"
            )
        return prepared

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

    # -- the run ------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        set_seed(config.seed)
        prepared = self.prepare_data()
        transformer = self.load_transformer()
        params = lora_parameters(transformer)
        optimizer = torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
        )
        loader = torch.utils.data.DataLoader(
            CachedDataset(prepared),
            batch_size=config.train_batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate,
            num_workers=config.dataloader_num_workers,
            generator=torch.Generator().manual_seed(config.seed),
        )
        processes = accelerator.num_processes
        lr_scheduler = get_scheduler(
            "cosine" if config.lr_scheduler == "cosine" else "constant_with_warmup",
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps * processes,
            num_training_steps=config.max_train_steps * processes,
        )
        transformer, optimizer, loader, lr_scheduler = accelerator.prepare(transformer, optimizer, loader, lr_scheduler)

        result = TrainResult(self.output_dir, 0)
        effective_batch = config.train_batch_size * config.gradient_accumulation_steps * processes
        self.log(
            f"training {len(prepared.entries)} images, {len(self.targets)} LoRA modules, "
            f"{sum(p.numel() for p in params):,} trainable parameters, effective batch {effective_batch}"
        )
        self.emit("run_start", 0, images=len(prepared.entries), targets=len(self.targets))
        generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
        batches = _forever(loader)
        progress = tqdm(
            total=config.max_train_steps,
            disable=not accelerator.is_local_main_process,
            desc="steps",
            mininterval=0.1 if sys.stderr.isatty() else 5.0,  # keep redirected logs readable
        )
        step, micro_losses, micro_sigmas = 0, [], []
        while step < config.max_train_steps:
            batch = next(batches)
            with accelerator.accumulate(transformer):
                loss, sigmas = self.training_loss(transformer, batch, generator)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach().float().item())
            micro_sigmas += sigmas.tolist()
            if not accelerator.sync_gradients:
                continue
            step += 1
            step_loss = sum(micro_losses) / len(micro_losses)
            result.losses.append(step_loss)
            if not math.isfinite(step_loss):
                raise DataError(f"loss became {step_loss} at step {step}; lower learning_rate or check the data")
            lr = lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            self.emit(
                "step_end",
                step,
                loss=step_loss,
                lr=lr,
                sigma=sum(micro_sigmas) / len(micro_sigmas),
                sigmas=[round(s, 5) for s in micro_sigmas],
                grad_norm=None if grad_norm is None else float(grad_norm),
            )
            micro_losses, micro_sigmas = [], []
            last = step == config.max_train_steps
            if config.checkpointing_steps and step % config.checkpointing_steps == 0 and not last:
                result.lora_files += self.save_lora(transformer, self.output_dir / f"checkpoint-{step}", step)
            if config.validation_steps and step % config.validation_steps == 0 and not last:
                result.validation_dirs += self.validate(transformer, prepared, step)
        progress.close()
        result.steps = step
        result.lora_files += self.save_lora(transformer, self.output_dir, step)
        result.validation_dirs += self.validate(transformer, prepared, step)
        accelerator.wait_for_everyone()
        self.model = accelerator.unwrap_model(transformer)
        self.emit("run_end", step, lora_files=[str(p) for p in result.lora_files])
        accelerator.end_training()
        return result

    def training_loss(
        self, transformer: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch: draw sigmas and noise, ask the family for the prediction, flow-matching loss."""
        latents = batch["latents"].to(self.device, torch.float32)
        sigmas = self.host.provide(
            "sample_sigmas",
            config=self.config,
            batch_size=latents.shape[0],
            latent_shape=tuple(latents.shape),
            generator=generator,
        )
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        noisy, target = flow.noisy_and_target(latents, noise, sigmas.to(self.device))
        text = {k: v.to(self.device) for k, v in batch["text"].items()}
        with self.accelerator.autocast():
            prediction = self.host.provide(
                "predict_flow",
                transformer=transformer,
                noisy_latents=noisy.to(self.weight_dtype),
                sigmas=sigmas.to(self.device),
                text=text,
                config=self.config,
                generator=generator,
            )
        return flow.flow_loss(prediction, target), sigmas

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

    def save_lora(self, transformer: torch.nn.Module, folder: Path, step: int) -> list[Path]:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return []
        export = export_from(self.accelerator.unwrap_model(transformer), self.config, self.metadata(step))
        files = self.host.provide("export_lora", export=export, config=self.config)
        written = [save_safetensors(folder / name, tensors, file_metadata(export)) for name, tensors in files.items()]
        self.emit("save", step, files=[str(p) for p in written])
        return written

    def validate(self, transformer: torch.nn.Module, prepared: PreparedData, step: int) -> list[Path]:
        config = self.config
        prompts = validation_prompts(config)
        if not prompts or not self.accelerator.is_main_process:
            return []
        for component in ("vae", "scheduler"):
            if component not in self.components:
                loaded = self.host.provide("load_model", config=config, component=component, dtype=self.weight_dtype)
                self.components[component] = loaded.to(self.device) if component == "vae" else loaded
        model = self.accelerator.unwrap_model(transformer)
        first_seed = config.seed if config.validation_seed is None else config.validation_seed
        size = config.validation_resolution or config.resolution
        request = ValidationRequest(
            transformer=model,
            vae=self.components["vae"],
            scheduler=self.components["scheduler"],
            prompts=prompts,
            text=[_batched(prepared.text.load(text_key(p)), self.device) for p in prompts],
            negative_text=_batched(prepared.text.load(text_key(config.validation_negative_prompt or "")), self.device),
            seeds=[first_seed + i for i in range(len(prompts))],
            width=size,
            height=size,
            num_inference_steps=config.validation_num_inference_steps,
            config=config,
            device=self.device,
        )
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            images = self.host.provide("generate_images", request=request)
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


def _forever(loader):
    while True:
        yield from loader


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
