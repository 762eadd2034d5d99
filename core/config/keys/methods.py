"""Keys of the training methods beyond plain flow matching: the sigma density and shift, scheduled
sampling (rollout) and the EMA of the adapter."""

from __future__ import annotations

from tuner.core.host.records import ConfigKey, in_group

KEYS = in_group(
    "optimisation",
    (
        ConfigKey(
            "sigma_sampling",
            "str",
            "family",
            "The density training sigmas are drawn from, before the family's shift or remap: family (its own: "
            "logit-normal with flow_sigmoid_scale), uniform, logit_normal (sigma_sampling_mean, _std), mode "
            "(SD3's, sigma_sampling_scale) or inverted_parabola (6 s (1 - s): the middle, never the ends).",
            choices=("family", "uniform", "logit_normal", "mode", "inverted_parabola"),
            recipe=True,
        ),
        ConfigKey("sigma_sampling_mean", "float", 0.0, "logit_normal: mean of the normal in logit space.", recipe=True),
        ConfigKey("sigma_sampling_std", "float", 1.0, "logit_normal: its standard deviation.", minimum=0, recipe=True),
        ConfigKey(
            "sigma_sampling_scale",
            "float",
            1.29,
            "mode: how far mass moves to the middle (0: uniform; SD3's 1.29).",
            minimum=-1,
            maximum=1.75,
            recipe=True,
        ),
        ConfigKey("flow_sigmoid_scale", "float", 1.0, "Scale of the logit-normal sigma density.", minimum=0),
        ConfigKey("flow_schedule_shift", "float", None, "Static sigma shift s (s > 1: more noise).", minimum=0),
        ConfigKey("flow_schedule_auto_shift", "bool", False, "Resolution-dependent sigma shift."),
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
            "scheduled_sampling_prob_start",
            "float",
            0.0,
            "Rollout share at the start of the ramp.",
            minimum=0,
            maximum=1,
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
        ConfigKey(
            "use_ema",
            "bool",
            False,
            "Keep an exponential moving average of the LoRA weights; saved beside the LoRA as *_ema.safetensors "
            "(self-tested too) and in checkpoints.",
            resume_critical=True,
            memory=True,
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
    ),
)
