"""Keys of what is trained: the family, its flavour or model folder, and the precision of the frozen
weights (the denoiser's and each text encoder's)."""

from __future__ import annotations

import re
from typing import Any

from tuner.core.host.records import NO_QUANTIZATION, ConfigKey, in_group

__all__ = ["KEYS", "NO_QUANTIZATION", "parse_budget", "text_encoder_precision_keys"]


def text_encoder_precision_keys(keys: Any) -> list[str]:
    """The names of the keys that quantize text encoder 1, 2, ... in that order: the precision keys
    (``choices_from="precisions"``) that need a text encoder (``needs="text_encoder_N"``)."""
    found = {
        int(key.needs.rsplit("_", 1)[1]): key.name
        for key in keys.values()
        if key.choices_from == "precisions" and key.needs.startswith("text_encoder_")
    }
    return [found[n] for n in sorted(found)]


def parse_budget(text: str) -> int:
    """``12GiB``, ``12 GB``, ``8000MiB`` or a number of bytes, as bytes (GB and GiB both mean 2^30
    here: what a card's size is called)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?)?\s*", str(text), re.IGNORECASE)
    if not found:
        raise ValueError(f"{text!r} is not a size; write it as 12GiB, 16GB or 8000MiB")
    number, unit = float(found[1]), (found[2] or "").upper().rstrip("B").rstrip("I")
    return int(number * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def _budget_problem(value: str) -> str | None:
    if value == "auto":
        return None
    try:
        return None if parse_budget(value) > 0 else "must be more than 0"
    except ValueError as exc:
        return f"{exc}, or auto (the accelerator's free memory)"


KEYS = in_group(
    "model",
    (
        ConfigKey(
            "model_type",
            "str",
            "lora",
            "lora (an adapter on the frozen denoiser) or full (every weight of the denoiser trains; the family "
            "keeps some frozen, see full_frozen_modules). full writes a diffusers folder and one single file.",
            choices=("lora", "full"),
            resume_critical=True,
            in_form=False,  # the web UI's form is a LoRA's (its keys, presets, estimate)
        ),
        ConfigKey(
            "pretrained_transformer_model_name_or_path",
            "str",
            None,
            "A denoiser to use instead of the base model's (a full fine-tune's output folder, its transformer/ "
            "folder, or a hub id); the other components come from the base.",
            resume_critical=True,
            recipe=True,
        ),
        ConfigKey(
            "pretrained_transformer_subfolder",
            "str",
            None,
            "The subfolder of pretrained_transformer_model_name_or_path holding the denoiser (default: transformer "
            "when there is one, else the folder itself).",
            resume_critical=True,
            recipe=True,
        ),
        ConfigKey(
            "full_frozen_modules",
            "str_list",
            None,
            "model_type: full: module names (prefixes) that stay frozen (default: the family's, e.g. Chroma's "
            "distilled guidance layer; [] trains everything).",
            resume_critical=True,
        ),
        ConfigKey(
            "bf16_stochastic_rounding",
            "bool",
            False,
            "model_type: full: keep the weights in bf16 and round each update stochastically (seeded), "
            "instead of fp32 master weights: half the weight and gradient memory, updates below bf16's "
            "precision still count.",
            resume_critical=True,
        ),
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
            "memory_budget",
            "str",
            None,
            "Let tuner pick base_model_precision, gradient_checkpointing, blocks_to_swap, activation_offload, "
            "offload_during_startup and validation_blocks_to_swap (those you leave unset) so the run fits this "
            "much accelerator memory, fastest first (`tuner estimate --plan` shows the plans): a size such as "
            "12GiB, or auto (the free memory now).",
            check=_budget_problem,
            memory=True,
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
        ConfigKey(
            "activation_offload",
            "bool",
            False,
            "Keep what each transformer block saves for backward in system RAM (with gradient checkpointing: "
            "the blocks' inputs; without: every saved activation) and copy it back in backward. Saves device "
            "memory for time spent copying.",
            memory=True,
        ),
        ConfigKey(
            "validation_blocks_to_swap",
            "int",
            None,
            "Blocks validation swaps, during a run (at most blocks_to_swap; the others stay on the GPU while "
            "it renders) and in `tuner sample` (inference holds no gradients, so it often has room for more); "
            "unset: blocks_to_swap.",
            nullable=True,
            minimum=0,
            maximum=1000,
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
