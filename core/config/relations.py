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
