"""How the core's keys must relate to each other (beyond each value's own kind and range): checked
for every config by the core's ``check_config`` (:mod:`tuner.core.builtin.defaults`)."""

from __future__ import annotations

from typing import Any

from tuner.core.config.datasets import resolve


def check_relations(config: Any, warn: Any) -> None:
    """Fill lora_alpha's default and refuse or warn about combinations of keys that cannot work."""
    config.set_default("lora_alpha", float(config.network_rank))
    check_dataset(config)
    for dataset in resolve(config):  # each entry of datasets: checked as the run's own keys are
        check_dataset(dataset.config)
    if config.regularisation_target != "noise" and config.datasets is None:
        raise config.error(
            "regularisation_target",
            "base_model applies to datasets entries of kind: regularisation; data_dir alone is training images",
        )
    if config.eval_steps and not (config.eval_data_dir or config.eval_split):
        raise config.error("eval_steps", "needs held-out images: set eval_data_dir or eval_split")
    if config.eval_data_dir and config.eval_split:
        raise config.error("eval_split", "set either eval_data_dir or eval_split, not both")
    if config.flow_schedule_shift is not None and config.flow_schedule_auto_shift:
        raise config.error(
            "flow_schedule_shift", "set either flow_schedule_shift or flow_schedule_auto_shift, not both"
        )
    check_methods(config, warn)
    check_combinations(config, warn)
    check_model_type(config)
    check_sharding(config)
    if config.get("pretrained_transformer_model_name_or_path") and config.base_model_precision != "no_change":
        raise config.error(
            "base_model_precision",
            "quantized loading streams the base model's own denoiser; unset pretrained_transformer_model_name_or_path "
            "or base_model_precision",
        )
    if config.validation_prompt and config.validation_prompts:
        warn("both validation_prompt and validation_prompts are set; validating with all of them")
    for key in ("validation_init_image", "validation_reference_image"):  # read now: validation comes later
        if config.get(key):
            check_image(config, key)


def check_image(config: Any, key: str) -> None:
    """The image ``key`` names opens (its header is read, not the pixels)."""
    from PIL import Image

    from tuner.core.errors import first_line
    from tuner.core.fixes import READ_ERRORS

    try:
        with Image.open(config[key]):
            pass
    except READ_ERRORS as exc:
        raise config.error(key, f"{config[key]}: cannot read it as an image: {first_line(exc)}") from None


def check_combinations(config: Any, warn: Any) -> None:
    """Settings that contradict each other (refused) or that a switched-off method ignores (said)."""
    from pathlib import Path

    folders = [str(Path(d.config.data_dir).resolve()) for d in resolve(config) if d.config.data_dir]
    twice = sorted({folder for folder in folders if folders.count(folder) > 1})
    if twice:
        raise config.error("datasets", f"{twice[0]} is listed twice; list a folder once and give it a weight")
    if config.eval_data_dir and str(Path(config.eval_data_dir).resolve()) in folders:
        warn(f"{config.source}: eval_data_dir {config.eval_data_dir} is also a training folder: the eval loss "
             "measures how well the LoRA memorises it, not how it does on images it has not seen")  # fmt: skip
    if config.eval_split and not config.eval_steps:
        warn(f"{config.source}: eval_split holds {config.eval_split} image(s) out of training, but eval_steps is 0: "
             "no eval loss is computed (set eval_steps, or drop eval_split)")  # fmt: skip
    if config.lr_warmup_steps >= config.max_train_steps:
        warn(f"{config.source}: lr_warmup_steps {config.lr_warmup_steps} is not shorter than max_train_steps "
             f"{config.max_train_steps}: the learning rate never reaches learning_rate")  # fmt: skip
    if config.compile:
        import torch

        backends = torch.compiler.list_backends(exclude_tags=())
        if config.compile_backend not in backends:
            raise config.error(
                "compile_backend",
                f"{config.compile_backend!r} is not a torch.compile backend here; e.g. inductor, aot_eager",
            )
    rollout_off = config.scheduled_sampling_max_step_offset == 0
    sampling = config.sigma_sampling
    ignored = [
        *(
            (key, sampling != "logit_normal", f"sigma_sampling is {sampling}")
            for key in ("sigma_sampling_mean", "sigma_sampling_std")
        ),
        ("sigma_sampling_scale", sampling != "mode", f"sigma_sampling is {sampling}"),
        ("flow_sigmoid_scale", sampling != "family", f"sigma_sampling is {sampling}"),
        *((key, not config.use_ema, "use_ema is off") for key in ("ema_decay", "ema_update_interval", "ema_device")),
        ("lr_num_cycles", config.lr_scheduler != "cosine_with_restarts", f"lr_scheduler is {config.lr_scheduler}"),
        ("lr_power", config.lr_scheduler != "polynomial", f"lr_scheduler is {config.lr_scheduler}"),
        ("eval_sigma_levels", not config.eval_steps, "eval_steps is 0"),
        ("compile_backend", not config.compile, "compile is off"),
        *(
            (key, rollout_off, "scheduled_sampling_max_step_offset is 0")
            for key in (
                "scheduled_sampling_ramp_steps",
                "scheduled_sampling_start_step",
                "scheduled_sampling_ramp_shape",
                "scheduled_sampling_strategy",
                "scheduled_sampling_num_inference_steps",
            )
        ),
    ]
    for key, off, why in ignored:
        if off and config.is_set(key):
            warn(f"{config.source}: {key} is ignored because {why}")


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
    if config.validation_use_ema and not config.use_ema:
        raise config.error("validation_use_ema", "needs use_ema: true (there is no EMA to render with)")


def check_dataset(config) -> None:
    """Relations between the keys a dataset may set for itself."""
    if config.caption_strategy == "instanceprompt" and not (config.instance_prompt or "").strip():
        raise config.error(
            "instance_prompt", "is required with caption_strategy instanceprompt: the caption of every image"
        )
    bad = [e for e in config.caption_extensions if not e.startswith(".") or len(e) < 2]
    if bad:
        raise config.error("caption_extensions", f"{bad[0]!r} is no file extension; write e.g. .txt or .caption")
    if config.aspect_bucket_alignment > config.resolution:
        raise config.error(
            "aspect_bucket_alignment",
            f"{config.aspect_bucket_alignment} is larger than resolution {config.resolution}; lower it (16, 32, 64)",
        )
    if config.caption_dropout_probability >= 1:
        raise config.error(
            "caption_dropout_probability", f"{config.caption_dropout_probability} is not below 1; use 0 to 0.5"
        )


# keys that shape a LoRA only: set explicitly with model_type: full, they are refused
LORA_ONLY = ("network_rank", "lora_alpha", "lora_type", "lora_dropout", "lora_format")


def check_model_type(config: Any) -> None:
    """model_type: full refuses what only a LoRA has or what assumes a frozen base; its own keys are
    refused with a LoRA."""
    if config.model_type != "full":
        for key in ("full_frozen_modules", "bf16_stochastic_rounding"):
            if config.is_set(key) and config[key] not in (None, False):
                raise config.error(key, "applies to model_type: full only")
        return
    lora_keys = [k for k in LORA_ONLY if k in config and config.is_set(k)]
    lora_keys += [k for k in config.keys if k.endswith("_lora_target") and config.is_set(k)]
    if lora_keys:
        raise config.error(lora_keys[0], "is a LoRA setting; model_type: full trains the weights themselves")
    for key, refused, why in (
        (
            "base_model_precision",
            config.base_model_precision != "no_change",
            "a quantized base cannot be fine-tuned fully; train a LoRA on it instead",
        ),
        (
            "blocks_to_swap",
            bool(config.get("blocks_to_swap")),
            "block swap keeps frozen weights in host memory; model_type: full trains them",
        ),
        (
            "memory_budget",
            bool(config.get("memory_budget")),
            "its plans quantize and swap the base, which model_type: full trains; `tuner estimate` shows what fits",
        ),
        (
            "regularisation_target",
            any(d.config.regularisation_target != "noise" for d in resolve(config)),
            "base_model needs the untouched base beside the trained weights",
        ),
    ):
        if refused:
            raise config.error(key, why)
    if config.bf16_stochastic_rounding and config.mixed_precision != "bf16":
        raise config.error("bf16_stochastic_rounding", "needs mixed_precision: bf16 (the weights are bf16)")
    if config.bf16_stochastic_rounding and config.optimizer == "prodigy":
        raise config.error(
            "optimizer",
            "prodigy estimates one step size from all parameters at once; bf16_stochastic_rounding steps them "
            "one at a time: use adamw, adamw8bit or adafactor",
        )


def check_sharding(config: Any) -> None:
    """fsdp_enable refuses what keeps whole weights outside the shards or steps them by hand."""
    if not config.fsdp_enable:
        return
    for key, refused, why in (
        (
            "base_model_precision",
            config.base_model_precision != "no_change",
            "a quantized base cannot be sharded by FSDP2 here; shard the bf16 base, or train the quantized one "
            "with DDP (fsdp_enable: false)",
        ),
        (
            "blocks_to_swap",
            bool(config.get("blocks_to_swap")),
            "block swap moves whole blocks to host memory; FSDP2 shards them: use one or the other",
        ),
        (
            "memory_budget",
            bool(config.get("memory_budget")),
            "its plans quantize and swap the base for one process; `tuner estimate --processes N` shows FSDP2's share",
        ),
        (
            "lora_type",
            config.get("lora_type") == "dora",
            "a DoRA's files read every adapted layer's whole base weight; under FSDP2 use lora, lokr or loha",
        ),
        (
            "ema_device",
            config.get("use_ema") and config.get("ema_device") == "cpu",
            "under FSDP2 each process keeps the EMA of its own shards beside them: use accelerator",
        ),
        (
            "compile",
            bool(config.get("compile")),
            "compiled blocks under FSDP2 are not tested yet; train sharded without compile",
        ),
    ):
        if refused:
            raise config.error(key, why)
