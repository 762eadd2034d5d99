"""Keys of what is trained: the family, its flavour or model folder, and the precision of the frozen
weights (the denoiser's and each text encoder's)."""

from __future__ import annotations

from typing import Any

from tuner.core.host.records import NO_QUANTIZATION, ConfigKey, in_group

__all__ = ["KEYS", "NO_QUANTIZATION", "text_encoder_precision_keys"]


def text_encoder_precision_keys(keys: Any) -> list[str]:
    """The names of the keys that quantize text encoder 1, 2, ... in that order: the precision keys
    (``choices_from="precisions"``) that need a text encoder (``needs="text_encoder_N"``)."""
    found = {
        int(key.needs.rsplit("_", 1)[1]): key.name
        for key in keys.values()
        if key.choices_from == "precisions" and key.needs.startswith("text_encoder_")
    }
    return [found[n] for n in sorted(found)]


KEYS = in_group(
    "model",
    (
        ConfigKey("model_type", "str", "lora", "Only LoRA training is supported.", choices=("lora",), in_form=False),
        ConfigKey(
            "model_family",
            "str",
            None,
            "Model family; the same as --plugin.",
            resume_critical=True,
            recipe=True,
            in_form=False,
        ),
        ConfigKey(
            "model_flavour",
            "str",
            None,
            "Family flavour (e.g. chroma: base, hd, flash).",
            resume_critical=True,
            recipe=True,
            choices_from="flavours",
            memory=True,
        ),
        ConfigKey(
            "pretrained_model_name_or_path",
            "str",
            None,
            "Hub id or local diffusers folder; overrides the flavour.",
            resume_critical=True,
            recipe=True,
            central=True,
            memory=True,
        ),
        ConfigKey(
            "revision",
            "str",
            None,
            "Hub revision (branch, tag or commit) of the model.",
            resume_critical=True,
            recipe=True,
        ),
        ConfigKey(
            "base_model_precision",
            "str",
            NO_QUANTIZATION,
            "Quantize the frozen denoiser: no_change or a precision a plugin offers (int8-quanto, nf4-bnb).",
            resume_critical=True,
            recipe=True,
            choices_from="precisions",
            memory=True,  # validation rendered on the quantized base: `tuner sample --recipe` does too
        ),
        ConfigKey(
            "blocks_to_swap",
            "int",
            0,
            "Keep the frozen weights of the denoiser's last N transformer blocks in system RAM and copy each "
            "to the GPU just before it runs (forward and backward), the next one while the current one computes. "
            "Saves about N blocks of VRAM for time spent copying; 0: off.",
            aliases=("musubi_blocks_to_swap",),
            minimum=0,
            maximum=1000,
            memory=True,
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
                choices_from="precisions",
            )
            for n in (1, 2, 3)
        ),
    ),
)
