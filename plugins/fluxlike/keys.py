"""Config keys and LoRA presets shared by Flux-lineage families (import-cheap)."""

from __future__ import annotations

from tuner.core.api import ConfigKey

ATTENTION = [
    "to_k",
    "to_q",
    "to_v",
    "to_qkv",
    "add_qkv_proj",
    "add_k_proj",
    "add_q_proj",
    "add_v_proj",
    "to_out.0",
    "to_add_out",
]
CONTEXT = ["add_k_proj", "add_q_proj", "add_v_proj", "add_qkv_proj", "to_add_out"]
CONTEXT_FFS = ["ff_context.net.0.proj", "ff_context.net.2"]
# `proj_out` matches the single blocks' output and the root output projection (as SimpleTuner).
FFS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]

# `flux_lora_target` presets: peft target_modules suffixes
PRESETS: dict[str, list[str]] = {
    "all": ATTENTION,
    "context": CONTEXT,
    "context+ffs": CONTEXT + CONTEXT_FFS,
    "all+ffs": ATTENTION + FFS,
    "all+ffs+embedder": ATTENTION + FFS + ["x_embedder"],
}


def lora_target_key(presets: dict[str, list[str]], default: str = "all") -> ConfigKey:
    return ConfigKey(
        "flux_lora_target",
        "str_or_list",
        default,
        "LoRA targets: a preset name or a list of module names/suffixes.",
        choices=tuple(presets),
        ask=True,
        resume_critical=True,
        group="LoRA",
    )


T5_PADDING = ConfigKey(
    "flux_t5_padding",
    "str",
    "unmodified",
    "'zero' multiplies T5 embeddings by the attention mask (zeroes masked tokens).",
    aliases=("t5_padding",),
    choices=("unmodified", "zero"),
    recipe=True,
)

GUIDANCE_KEYS = (
    ConfigKey(
        "flux_guidance_mode",
        "str",
        "constant",
        "Training guidance value: constant or random-range.",
        choices=("constant", "random-range"),
        group="optimisation",
    ),
    ConfigKey(
        "flux_guidance_value",
        "float",
        1.0,
        "Guidance value with flux_guidance_mode constant.",
        minimum=0,
        group="optimisation",
    ),
    ConfigKey(
        "flux_guidance_min", "float", 1.0, "Lower bound of random-range guidance.", minimum=0, group="optimisation"
    ),
    ConfigKey(
        "flux_guidance_max", "float", 4.0, "Upper bound of random-range guidance.", minimum=0, group="optimisation"
    ),
)

FAST_SCHEDULE = ConfigKey("flux_fast_schedule", "bool", False, "Schnell's four-level sigma schedule.")


def check_guidance_range(config) -> None:
    if config.flux_guidance_mode == "random-range" and config.flux_guidance_min > config.flux_guidance_max:
        raise config.error(
            "flux_guidance_min", f"{config.flux_guidance_min} is above flux_guidance_max {config.flux_guidance_max}"
        )
