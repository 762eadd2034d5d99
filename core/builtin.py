"""The core's own plugin: core config keys, family-neutral defaults, and the JSONL training log.

Registered first and its defaults ``trylast``, so any installed plugin overrides them. It uses
the same ``@hookimpl`` as third-party plugins and keeps heavy imports inside the hooks.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuner.core import events, hookimpl
from tuner.core.config import NO_QUANTIZATION
from tuner.core.types import ConfigKey, LoraFormat, OptimizerInfo


def _colour_problem(value: str) -> str | None:
    from PIL import ImageColor

    try:
        ImageColor.getrgb(value)
    except ValueError:
        return f"{value!r} is not a colour; use a name (white, black, gray) or #RRGGBB"
    return None


# lora_type values (tuner.core.adapters says what each is; kept here, where no torch is imported)
ADAPTER_TYPES = ("lora", "dora", "lokr", "loha")

# torch seeds generators with 64-bit integers; validation adds the prompt's index to the seed
SEED_MAX = 2**63 - 1

CORE_KEYS = (
    # what and where
    ConfigKey("model_type", "str", "lora", "Only LoRA training is supported.", choices=("lora",)),
    ConfigKey("model_family", "str", None, "Model family; the same as --plugin.", resume_critical=True, recipe=True),
    ConfigKey(
        "model_flavour",
        "str",
        None,
        "Family flavour (e.g. chroma: base, hd, flash).",
        resume_critical=True,
        recipe=True,
    ),
    ConfigKey(
        "pretrained_model_name_or_path",
        "str",
        None,
        "Hub id or local diffusers folder; overrides the flavour.",
        resume_critical=True,
        recipe=True,
    ),
    ConfigKey(
        "revision", "str", None, "Hub revision (branch, tag or commit) of the model.", resume_critical=True, recipe=True
    ),
    ConfigKey("output_dir", "path", "output", "Where the LoRA, checkpoints, samples and logs go."),
    ConfigKey(
        "data_dir", "path", None, "Folder of images with same-stem .txt captions.", aliases=("instance_data_dir",)
    ),
    ConfigKey(
        "datasets",
        "mappings",
        None,
        "Several datasets instead of data_dir: a list of entries with data_dir and any of id, weight, kind "
        "(training or regularisation), resolution, resolution_type, repeats, caption_strategy, "
        "caption_dropout_probability, crop_style, aspect_bucket_max_ratio, aspect_bucket_alignment, "
        "minimum_image_size.",
    ),
    ConfigKey(
        "caption_strategy",
        "str",
        "textfile",
        "textfile: same-stem .txt captions; filename: the image's name is its caption.",
        choices=("textfile", "filename"),
    ),
    ConfigKey(
        "dataset_repeats", "int", 0, "Extra passes over each image per epoch (SimpleTuner's repeats).", minimum=0
    ),
    ConfigKey(
        "caption_dropout_probability",
        "float",
        0.0,
        "Train this share of samples with the empty caption (drawn per sample from the seed and the step), "
        "so the LoRA also works without its trigger words and with classifier-free guidance.",
        minimum=0,
        maximum=1,
    ),
    ConfigKey("cache_dir", "path", None, "Latent and text caches (default: $XDG_CACHE_HOME/tuner).", recipe=True),
    ConfigKey(
        "resolution",
        "int",
        512,
        "Training size in pixels: the side of the square bucket (resolution_type area: every bucket holds about "
        "resolution^2 pixels) or the shorter side (pixel).",
        minimum=16,
        multiple_of=16,
        recipe=True,
    ),
    ConfigKey(
        "resolution_type",
        "str",
        "area",
        "area: buckets of about resolution^2 pixels at each aspect ratio; pixel: the shorter side is resolution.",
        choices=("area", "pixel"),
    ),
    ConfigKey(
        "aspect_bucket_alignment",
        "int",
        64,
        "Bucket sides are multiples of this (SimpleTuner's default 64); a multiple of the family's latent "
        "alignment (16 for Chroma and Flux: the VAE's 8 times 2x2 patches).",
        minimum=8,
    ),
    ConfigKey(
        "aspect_bucket_max_ratio",
        "float",
        3.0,
        "Widest (and tallest) bucket, as long side / short side; wider images are cropped there, never "
        "stretched. 1.0: square only.",
        minimum=1.0,
    ),
    ConfigKey(
        "crop_style",
        "str",
        "center",
        "Where an image is cropped after it is resized to cover its bucket: center, or random (drawn per image "
        "and epoch from the seed; a crop is cached for each epoch the run reaches).",
        choices=("center", "random"),
    ),
    ConfigKey(
        "image_background",
        "str",
        "white",
        "Colour transparent images are composited on before encoding (a name or #RRGGBB), as other trainers "
        "do; the run says which images had transparency.",
        check=lambda value: _colour_problem(value),
    ),
    ConfigKey(
        "minimum_image_size",
        "int",
        0,
        "Skip images smaller than this (sqrt(width x height) with resolution_type area, the shorter side with "
        "pixel), with a warning and a count.",
        minimum=0,
    ),
    # LoRA
    ConfigKey(
        "lora_type",
        "str",
        "lora",
        "Adapter type (peft): lora; dora (LoRA with a magnitude per output row); lokr (Kronecker product, "
        "LyCORIS keys: ComfyUI loads it, diffusers cannot); loha (Hadamard product of two low-rank products, "
        "LyCORIS keys: ComfyUI only).",
        choices=ADAPTER_TYPES,
        resume_critical=True,
    ),
    ConfigKey(
        "lokr_factor",
        "int",
        -1,
        "LoKr: split each layer width into this factor and the rest (must divide every adapted width); -1: as "
        "square as possible.",
        minimum=-1,
        check=lambda value: "0 is not a factor; use -1 or a divisor such as 4, 8, 16" if value == 0 else None,
        resume_critical=True,
    ),
    ConfigKey("network_rank", "int", 16, "LoRA rank.", aliases=("lora_rank",), minimum=1, resume_critical=True),
    ConfigKey(
        "lora_alpha", "float", None, "LoRA alpha (default: the rank, i.e. scale 1).", minimum=0, resume_critical=True
    ),
    ConfigKey("lora_dropout", "float", 0.0, "Dropout on the LoRA input.", minimum=0, maximum=1, maximum_exclusive=True),
    ConfigKey(
        "base_model_precision",
        "str",
        NO_QUANTIZATION,
        "Quantize the frozen denoiser: no_change or a precision a plugin offers (int8-quanto, nf4-bnb).",
        resume_critical=True,
        recipe=True,  # validation rendered on the quantized base: `tuner sample --recipe` does too
    ),
    *(
        ConfigKey(
            f"text_encoder_{n}_precision",
            "str",
            NO_QUANTIZATION,
            f"Quantize text encoder {n} (SimpleTuner's numbering: Chroma's 1 is T5; Flux's 1 is CLIP, 2 is T5) "
            "while captions are encoded: no_change or a precision a plugin offers. Part of the text cache's key.",
            needs=f"text_encoder_{n}",
            recipe=True,
        )
        for n in (1, 2, 3)
    ),
    # loop
    ConfigKey("train_batch_size", "int", 1, "Images per step per process.", minimum=1),
    ConfigKey("gradient_accumulation_steps", "int", 1, "Micro-batches per optimizer step.", minimum=1),
    ConfigKey("max_train_steps", "int", 1000, "Optimizer steps.", minimum=1),
    ConfigKey("seed", "int", 42, "Seed for data order, noise, sigmas and LoRA init.", minimum=0, maximum=SEED_MAX),
    ConfigKey(
        "learning_rate", "float", 1e-4, "Learning rate (Prodigy: a factor on its own estimate; use 1.0).", minimum=0
    ),
    ConfigKey(
        "optimizer",
        "str",
        "adamw",
        "Optimizer by its registered name: adamw (torch), adamw8bit (bitsandbytes), adafactor (transformers), "
        "prodigy (prodigyopt), or one an installed plugin offers (tuner plugins lists them).",
        resume_critical=True,
    ),
    ConfigKey(
        "optimizer_config",
        "str",
        None,
        "Extra optimizer arguments, SimpleTuner's form: 'd_coef=2,safeguard_warmup=false' (values read as YAML).",
    ),
    ConfigKey(
        "lr_scheduler",
        "str",
        "constant",
        "Learning-rate schedule (diffusers' get_scheduler): constant, constant_with_warmup, linear, cosine, "
        "cosine_with_restarts (lr_num_cycles), polynomial (lr_power); all warm up over lr_warmup_steps.",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    ),
    ConfigKey("lr_num_cycles", "int", 1, "Hard restarts of cosine_with_restarts.", minimum=1),
    ConfigKey("lr_power", "float", 1.0, "Power of the polynomial decay (1.0: linear).", minimum=0),
    ConfigKey("lr_warmup_steps", "int", 0, "Linear warm-up steps.", minimum=0),
    ConfigKey("max_grad_norm", "float", 1.0, "Gradient clipping norm (0 disables).", minimum=0),
    ConfigKey(
        "adam_beta1",
        "float",
        0.9,
        "beta1 of adamw, adamw8bit and prodigy.",
        minimum=0,
        maximum=1,
        maximum_exclusive=True,
    ),
    ConfigKey(
        "adam_beta2",
        "float",
        0.999,
        "beta2 of adamw, adamw8bit and prodigy.",
        minimum=0,
        maximum=1,
        maximum_exclusive=True,
    ),
    ConfigKey("adam_weight_decay", "float", 1e-2, "Decoupled weight decay of adamw, adamw8bit and prodigy.", minimum=0),
    ConfigKey("adam_epsilon", "float", 1e-8, "Epsilon of adamw, adamw8bit and prodigy.", minimum=0),
    ConfigKey("mixed_precision", "str", "bf16", "accelerate precision.", choices=("no", "fp16", "bf16"), recipe=True),
    ConfigKey("gradient_checkpointing", "bool", True, "Recompute block activations in backward."),
    ConfigKey(
        "compile",
        "bool",
        False,
        "Regional compilation: torch.compile each repeated transformer block once (the first step pays the "
        "compile time, printed); same losses, faster steps on a GPU.",
    ),
    ConfigKey(
        "compile_backend",
        "str",
        "inductor",
        "torch.compile backend for compile: true (aot_eager: graph capture and autograd without code generation).",
    ),
    ConfigKey(
        "offload_during_startup",
        "bool",
        False,
        "Out of memory at start: while caches are built, keep the VAE's and text encoders' weights in system "
        "RAM and move them to the accelerator one layer at a time (accelerate's sequential offload); the "
        "denoiser is loaded only after caching.",
    ),
    ConfigKey("dataloader_num_workers", "int", 0, "Worker processes reading cached items.", minimum=0),
    ConfigKey(
        "memory_estimate",
        "bool",
        True,
        "Print the memory estimate (tuner estimate) at start; warn when it exceeds the free memory.",
    ),
    # flow matching
    ConfigKey("flow_sigmoid_scale", "float", 1.0, "Scale of the logit-normal sigma density.", minimum=0),
    ConfigKey("flow_schedule_shift", "float", None, "Static sigma shift s (s > 1: more noise).", minimum=0),
    ConfigKey("flow_schedule_auto_shift", "bool", False, "Resolution-dependent sigma shift."),
    # scheduled sampling (rollout), SimpleTuner's keys
    ConfigKey(
        "scheduled_sampling_max_step_offset",
        "int",
        0,
        "Scheduled sampling: a rolled-out sample starts this many inference steps (at most) above its training "
        "sigma and the model takes its own Euler steps down to it (0: off; 1-4 typical).",
        minimum=0,
    ),
    ConfigKey(
        "scheduled_sampling_probability",
        "float",
        0.0,
        "Share of samples rolled out (without a ramp).",
        minimum=0,
        maximum=1,
    ),
    ConfigKey(
        "scheduled_sampling_prob_start", "float", 0.0, "Rollout share at the start of the ramp.", minimum=0, maximum=1
    ),
    ConfigKey(
        "scheduled_sampling_prob_end", "float", 0.5, "Rollout share at the end of the ramp.", minimum=0, maximum=1
    ),
    ConfigKey(
        "scheduled_sampling_ramp_steps",
        "int",
        0,
        "Steps from prob_start to prob_end (0: no ramp; scheduled_sampling_probability holds).",
        minimum=0,
    ),
    ConfigKey("scheduled_sampling_start_step", "int", 0, "Optimizer step where the ramp starts.", minimum=0),
    ConfigKey("scheduled_sampling_ramp_shape", "str", "linear", "Shape of the ramp.", choices=("linear", "cosine")),
    ConfigKey(
        "scheduled_sampling_strategy",
        "str",
        "uniform",
        "How many steps a rollout takes, 1 to max_step_offset: uniform, biased_early (short ones more often) or "
        "biased_late (long ones more often).",
        choices=("uniform", "biased_early", "biased_late"),
    ),
    ConfigKey(
        "scheduled_sampling_num_inference_steps",
        "int",
        None,
        "Length of the inference schedule rollouts step on (default: validation_num_inference_steps).",
        minimum=1,
    ),
    # EMA of the adapter
    ConfigKey(
        "use_ema",
        "bool",
        False,
        "Keep an exponential moving average of the LoRA weights; saved beside the LoRA as *_ema.safetensors "
        "(self-tested too) and in checkpoints.",
        resume_critical=True,
    ),
    ConfigKey(
        "ema_decay",
        "float",
        0.995,
        "EMA decay per update: ema = decay * ema + (1 - decay) * weights (0.995: about the last 200 updates).",
        check=lambda value: None if 0 < value < 1 else "must lie strictly between 0 and 1, e.g. 0.995",
    ),
    ConfigKey("ema_update_interval", "int", 1, "Update the EMA every N optimizer steps.", minimum=1),
    ConfigKey(
        "ema_device",
        "str",
        "accelerator",
        "Where the EMA lives: accelerator (with the model; fastest) or cpu (system RAM; updates copy the "
        "adapter there).",
        choices=("accelerator", "cpu"),
    ),
    ConfigKey(
        "validation_use_ema",
        "bool",
        False,
        "Render validation (and the recipe's LoRA) with the EMA weights instead of the trained ones.",
    ),
    # held-out evaluation
    ConfigKey(
        "eval_steps",
        "int",
        0,
        "Every N steps (and at the end) compute the flow-matching loss on held-out images at fixed noise "
        "levels and fixed noise (0: off).",
        minimum=0,
    ),
    ConfigKey("eval_data_dir", "path", None, "Held-out images with captions for eval_steps."),
    ConfigKey("eval_split", "int", 0, "Or: hold out this many training images (chosen with a fixed seed).", minimum=0),
    ConfigKey("eval_sigma_levels", "int", 8, "Evenly spaced noise levels the eval loss is computed at.", minimum=1),
    # validation
    ConfigKey("validation_prompt", "str", None, "One validation prompt."),
    ConfigKey("validation_prompts", "str_list", None, "Several validation prompts."),
    ConfigKey("validation_negative_prompt", "str", None, "Negative prompt for real CFG."),
    ConfigKey("validation_steps", "int", 0, "Validate every N steps (0: only at the end).", minimum=0),
    ConfigKey("validation_num_inference_steps", "int", 20, "Sampler steps per image.", minimum=1),
    ConfigKey(
        "validation_seed",
        "int",
        None,
        "Seed of the first validation image (default: seed).",
        minimum=0,
        maximum=SEED_MAX,
    ),
    ConfigKey(
        "validation_resolution",
        "sizes",
        None,
        "Validation size(s): 1024, 768x1344, or a list to see the LoRA at the shapes it trained (default: "
        "resolution x resolution).",
        minimum=16,
        multiple_of=16,
    ),
    ConfigKey(
        "validation_init_image",
        "path",
        None,
        "Image for img2img validation (families that support img2img).",
        needs="img2img",
    ),
    # saving, resuming, surviving
    ConfigKey(
        "checkpointing_steps",
        "int",
        0,
        "Save a full-state checkpoint (LoRA, optimizer, scheduler, RNG, data position) every N steps.",
        minimum=0,
    ),
    ConfigKey(
        "lora_format",
        "str_or_list",
        "diffusers",
        "LoRA file format(s) to write: diffusers, comfyui (Flux lineage), all, or a list; each is reloaded and "
        "checked.",
    ),
    ConfigKey(
        "report_to",
        "str_or_list",
        "tensorboard",
        "Trackers fed by training events: tensorboard (when installed), none, or a tracker plugin's name.",
    ),
    ConfigKey("checkpoints_total_limit", "int", None, "Keep only the newest N checkpoints.", minimum=1),
    ConfigKey(
        "existing_output",
        "str",
        "refuse",
        "When output_dir holds an earlier run (and resume_from_checkpoint is not set): refuse (say what is "
        "there), new (write to output_dir-2, -3, ...) or overwrite (remove that run's checkpoints, log, images "
        "and LoRA files, then start over there).",
        choices=("refuse", "new", "overwrite"),
    ),
    ConfigKey(
        "resume_from_checkpoint",
        "str",
        None,
        "'latest' (the newest intact checkpoint in output_dir) or a checkpoint folder.",
    ),
    ConfigKey(
        "divergence_skip_limit",
        "int",
        3,
        "Non-finite steps in a row (each skipped) before rolling back to the last good checkpoint.",
        minimum=1,
    ),
    ConfigKey(
        "divergence_lr_factor", "float", 0.5, "Learning-rate factor applied at each rollback.", minimum=0, maximum=1
    ),
    ConfigKey("divergence_max_rollbacks", "int", 2, "Rollbacks before the run stops as diverged.", minimum=0),
)


# the central settings `tuner configure` asks for, in its order (families mark theirs with ask=True)
ASKED = (
    "model_flavour",
    "data_dir",
    "output_dir",
    "resolution",
    "network_rank",
    "learning_rate",
    "train_batch_size",
    "max_train_steps",
    "mixed_precision",
    "base_model_precision",
    "validation_prompts",
)


@hookimpl
def register_config_keys(register):
    for key in CORE_KEYS:
        register(replace(key, ask=key.name in ASKED))


TEXT_ENCODER_PRECISIONS = ("text_encoder_1_precision", "text_encoder_2_precision", "text_encoder_3_precision")


@hookimpl
def check_config(config, warn):
    from tuner.core.datasets import resolve

    config.set_default("lora_alpha", float(config.network_rank))
    check_dataset(config)
    for dataset in resolve(config):  # each entry of datasets: checked as the run's own keys are
        check_dataset(dataset.config)
    if config.eval_steps and not (config.eval_data_dir or config.eval_split):
        raise config.error("eval_steps", "needs held-out images: set eval_data_dir or eval_split")
    if config.eval_data_dir and config.eval_split:
        raise config.error("eval_split", "set either eval_data_dir or eval_split, not both")
    if config.flow_schedule_shift is not None and config.flow_schedule_auto_shift:
        raise config.error(
            "flow_schedule_shift", "set either flow_schedule_shift or flow_schedule_auto_shift, not both"
        )
    check_methods(config, warn)
    if config.validation_prompt and config.validation_prompts:
        warn("both validation_prompt and validation_prompts are set; validating with all of them")


def check_methods(config, warn) -> None:
    """Relations between the keys of scheduled sampling and of the EMA."""
    ramp = config.scheduled_sampling_ramp_steps > 0
    share = (
        max(config.scheduled_sampling_prob_start, config.scheduled_sampling_prob_end)
        if ramp
        else config.scheduled_sampling_probability
    )
    which = "the ramp's prob_start/prob_end" if ramp else "scheduled_sampling_probability"
    if config.scheduled_sampling_max_step_offset == 0 and share > 0:
        raise config.error(
            "scheduled_sampling_max_step_offset",
            f"is 0, so {which} {share:g} rolls nothing out; set it to the rollout steps (1-4), or the share to 0",
        )
    if config.scheduled_sampling_max_step_offset > 0 and share == 0:
        warn(
            f"{config.source}: scheduled_sampling_max_step_offset is {config.scheduled_sampling_max_step_offset} but "
            f"{which} is 0: nothing is rolled out"
        )
    if config.lora_type in ("lokr", "loha") and config.is_set("lora_dropout") and config.lora_dropout:
        warn(f"{config.source}: lora_dropout is ignored by lora_type {config.lora_type} (peft's LoKr/LoHa have none)")
    if config.validation_use_ema and not config.use_ema:
        raise config.error("validation_use_ema", "needs use_ema: true (there is no EMA to render with)")


def check_dataset(config) -> None:
    """Relations between the keys a dataset may set for itself."""
    if config.aspect_bucket_alignment > config.resolution:
        raise config.error(
            "aspect_bucket_alignment",
            f"{config.aspect_bucket_alignment} is larger than resolution {config.resolution}; lower it (16, 32, 64)",
        )
    if config.caption_dropout_probability >= 1:
        raise config.error(
            "caption_dropout_probability", f"{config.caption_dropout_probability} is not below 1; use 0 to 0.5"
        )


def validation_prompts(config) -> list[str]:
    prompts = [config.validation_prompt] if config.validation_prompt else []
    return prompts + list(config.validation_prompts or [])


def validation_sizes(config) -> list[tuple[int, int]]:
    """``(width, height)`` of every validation size: ``validation_resolution``, else the square."""
    return [tuple(size) for size in (config.validation_resolution or [[config.resolution, config.resolution]])]


@hookimpl(trylast=True)
def encode_images(vae, pixels):
    latents = vae.encode(pixels).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@hookimpl(trylast=True)
def sample_sigmas(config, batch_size, latent_shape, generator):
    from tuner.core import flow

    return flow.sample_shifted_logit_normal(config, batch_size, latent_shape, generator)


@hookimpl(trylast=True)
def inference_sigmas(config, scheduler, num_steps, latent_shape):
    import copy

    import numpy as np

    if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "sigmas"):
        return None
    scheduler = copy.deepcopy(scheduler)  # set_timesteps changes it; validation keeps its own
    options = {}
    if getattr(scheduler.config, "use_dynamic_shifting", False):  # the Flux lineage's resolution shift
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)  # 2x2 patches
        settings = scheduler.config
        options["mu"] = calculate_shift(
            tokens, settings.base_image_seq_len, settings.max_image_seq_len, settings.base_shift, settings.max_shift
        )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), **options)
    return scheduler.sigmas.float().cpu()


def _export_diffusers(export, transformer):
    from tuner.core.lora import diffusers_layout

    return {"pytorch_lora_weights.safetensors": diffusers_layout(export)}


def _read_diffusers(path, transformer, family):
    from tuner.core.selftest import read_with_diffusers

    return read_with_diffusers(path, transformer, family)  # LoKr/LoHa: with ComfyUI's arithmetic


DIFFUSERS_FORMAT = LoraFormat(
    "diffusers",
    "pytorch_lora_weights.safetensors: diffusers names with a scalar .alpha per module "
    "(diffusers' load_lora_weights; ComfyUI reads it too)",
    export=_export_diffusers,
    read=_read_diffusers,
    detect=lambda keys: any(k.startswith("transformer.") for k in keys),
)


@hookimpl
def register_lora_formats(register):
    register(DIFFUSERS_FORMAT)


def adam_settings(config) -> dict[str, Any]:
    """The adam_* keys as the keyword arguments of AdamW-like optimizers."""
    return {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }


def optimizer_options(config) -> dict[str, Any]:
    """``optimizer_config`` (``'d_coef=2,safeguard_warmup=false'``, SimpleTuner's form) as keyword
    arguments; each value is read as YAML (numbers, booleans, strings)."""
    import yaml

    options: dict[str, Any] = {}
    for part in (config.optimizer_config or "").split(","):
        if not part.strip():
            continue
        name, equals, value = part.partition("=")
        if not equals or not name.strip().isidentifier():
            raise config.error("optimizer_config", f"{part.strip()!r} is not name=value; e.g. 'd_coef=2,eps=1e-8'")
        try:
            options[name.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            raise config.error("optimizer_config", f"{part.strip()!r}: cannot read the value") from None
    return options


def _build_adamw(config, params, options):
    import torch

    # one kernel for every parameter on CUDA (the same state, so checkpoints do not change)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, **{**adam_settings(config), "fused": fused, **options})


@hookimpl
def register_optimizers(register):
    register(OptimizerInfo("adamw", "torch's AdamW (fused on CUDA); adam_* keys", _build_adamw))


class JsonlLog:
    """Appends one JSON object per optimizer step (and per skip or rollback) to ``output_dir/train_log.jsonl``."""

    def __init__(self) -> None:
        self.file: Any = None
        self.started = 0.0

    @hookimpl
    def training_event(self, event):
        if isinstance(event, events.RunStart):
            path = Path(event.config.output_dir) / "train_log.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if event.resumed_step is not None and path.exists():  # drop what the interrupted run logged after it
                rows = [_parsed(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
                kept = [json.dumps(row) for row in rows if row is not None and row.get("step", 0) <= event.resumed_step]
                if None in rows:  # a line torn by kill -9 or a full disk: the log is repaired
                    event.log(f"warning: {path}: dropped {rows.count(None)} damaged line(s)")
            self.file = path.open("w", encoding="utf-8")
            self.file.writelines(line + "\n" for line in kept)
            self.started = time.monotonic()
        elif isinstance(event, (events.StepEnd, events.Skip, events.Rollback, events.Evaluation)) and self.file:
            record = {
                "step": event.step,
                **events.payload(event),
                "elapsed_s": round(time.monotonic() - self.started, 3),
            }
            if not isinstance(event, events.StepEnd):
                record["event"] = event.name
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        elif isinstance(event, events.RunEnd) and self.file is not None:
            self.file.close()
            self.file = None


def _parsed(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def trackers(config) -> list[str]:
    value = config.report_to
    return [] if value in ("none", None) else [value] if isinstance(value, str) else list(value)


class TensorBoardLog:
    """Loss, learning rate, grad norm, sigma histogram and validation images to TensorBoard, through
    accelerate's tracker, in ``output_dir/logs``. On by default when tensorboard is installed."""

    REQUIRES = ("tensorboard",)  # what `tuner plugins` checks and names when missing
    INSTALL_HINT = "pip install tensorboard  (or: pip install 'tuner[tensorboard]')"

    def __init__(self) -> None:
        self.tracker: Any = None

    @hookimpl
    def training_event(self, event):
        if isinstance(event, events.RunStart):
            self.tracker = None
            if "tensorboard" not in trackers(event.config):
                return
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
                if event.config.is_set("report_to"):
                    event.log("warning: report_to: tensorboard is not installed (pip install tensorboard)")
                else:
                    event.log(
                        "note: TensorBoard logging is off: tensorboard is not installed (pip install tensorboard); "
                        "train_log.jsonl records every step"
                    )
                return
            from accelerate.tracking import TensorBoardTracker

            self.tracker = TensorBoardTracker("tuner", Path(event.config.output_dir) / "logs")
            self.tracker.start()
        elif self.tracker is None:
            return
        elif isinstance(event, events.StepEnd):
            import torch

            scalars = {"loss": event.loss, "lr": event.lr, "sigma_mean": event.sigma}
            if event.grad_norm is not None:
                scalars["grad_norm"] = event.grad_norm
            self.tracker.log(scalars, step=event.step)
            self.tracker.writer.add_histogram("sigma", torch.tensor(event.sigmas), event.step)
        elif isinstance(event, events.Evaluation):
            self.tracker.log({"eval_loss": event.eval_loss}, step=event.step)
            for sigma, loss in zip(event.eval_sigmas, event.eval_losses, strict=True):
                self.tracker.log({f"eval_loss_by_sigma/{sigma:.3f}": loss}, step=event.step)
        elif isinstance(event, events.Validation):
            import numpy as np
            from PIL import Image

            by_size: dict[tuple[int, ...], list] = {}  # one image tensor per validation size
            for path in event.images:
                image = np.asarray(Image.open(path).convert("RGB"))
                by_size.setdefault(image.shape, []).append(image)
            for shape, images in by_size.items():
                tag = "validation" if len(by_size) == 1 else f"validation/{shape[1]}x{shape[0]}"
                self.tracker.writer.add_images(tag, np.stack(images), event.step, dataformats="NHWC")
        elif isinstance(event, events.RunEnd):
            self.tracker.finish()
            self.tracker = None
