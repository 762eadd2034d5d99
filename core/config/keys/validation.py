"""Keys of what a run shows while it trains: the held-out eval loss and the validation images; and
the readers of the prompts and sizes validation renders."""

from __future__ import annotations

from typing import Any

from tuner.core.config.keys.optimization import SEED_MAX
from tuner.core.host.records import ConfigKey, in_group

KEYS = in_group(
    "validation",
    (
        ConfigKey(
            "validation_use_ema",
            "bool",
            False,
            "Render validation (and the recipe's LoRA) with the EMA weights instead of the trained ones.",
        ),
        ConfigKey(
            "eval_steps",
            "int",
            0,
            "Every N steps (and at the end) compute the flow-matching loss on held-out images at fixed noise "
            "levels and fixed noise (0: off).",
            minimum=0,
        ),
        ConfigKey(
            "eval_data_dir",
            "path",
            None,
            "Held-out images with captions for eval_steps.",
            group="data",
            image_folder=True,
        ),
        ConfigKey(
            "eval_split",
            "int",
            0,
            "Or: hold out this many training images (chosen with a fixed seed).",
            minimum=0,
            group="data",
        ),
        ConfigKey(
            "eval_sigma_levels",
            "int",
            8,
            "Evenly spaced noise levels the eval loss is computed at.",
            minimum=1,
            maximum=1000,
        ),
        ConfigKey("validation_prompt", "str", None, "One validation prompt."),
        ConfigKey("validation_prompts", "str_list", None, "Several validation prompts."),
        ConfigKey("validation_negative_prompt", "str", None, "Negative prompt for real CFG."),
        ConfigKey(
            "validation_steps", "int", 0, "Validate every N steps (0: only at the end).", minimum=0, central=True
        ),
        ConfigKey("validation_num_inference_steps", "int", 20, "Sampler steps per image.", minimum=1, maximum=1000),
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
            maximum=8192,
        ),
        ConfigKey(
            "validation_init_image",
            "path",
            None,
            "Image for img2img validation (families that support img2img): each validation image starts "
            "from it, resized to the validation size.",
            needs="img2img",
            recipe=True,
        ),
        ConfigKey(
            "validation_reference_image",
            "path",
            None,
            "Reference image of edit validation (families that support edits; required there): each prompt is "
            "the instruction applied to it.",
            needs="edit",
            recipe=True,
        ),
        ConfigKey(
            "validation_init_strength",
            "float",
            0.7,
            "How far img2img validation departs from validation_init_image: 0 keeps it, 1 ignores it.",
            minimum=0,
            maximum=1,
            needs="img2img",
            recipe=True,
        ),
    ),
)


def validation_prompts(config: Any) -> list[str]:
    prompts = [config.validation_prompt] if config.validation_prompt else []
    return prompts + list(config.validation_prompts or [])


def validation_sizes(config: Any) -> list[tuple[int, int]]:
    """``(width, height)`` of every validation size: ``validation_resolution``, else the square."""
    return [tuple(size) for size in (config.validation_resolution or [[config.resolution, config.resolution]])]
