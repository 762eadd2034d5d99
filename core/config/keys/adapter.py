"""Keys of the adapter: its type, rank, alpha and dropout."""

from __future__ import annotations

from tuner.core.host.records import ConfigKey, in_group

KEYS = in_group(
    "LoRA",
    (
        ConfigKey(
            "lora_type",
            "str",
            "lora",
            "Adapter type (peft), one of the registered adapter types (`tuner plugins` says what each is): the "
            "core's lora; dora (LoRA with a magnitude per output row); lokr (Kronecker product, LyCORIS keys: "
            "ComfyUI loads it, diffusers cannot); loha (Hadamard product of two low-rank products, ComfyUI only).",
            choices_from="adapter_types",
            resume_critical=True,
            central=True,
            memory=True,
        ),
        ConfigKey(
            "lokr_factor",
            "int",
            -1,
            "lora_type lokr: split each layer width into this factor and the rest (must divide every adapted width); -1: as "
            "square as possible.",
            minimum=-1,
            check=lambda value: "0 is not a factor; use -1 or a divisor such as 4, 8, 16" if value == 0 else None,
            resume_critical=True,
        ),
        ConfigKey(
            "network_rank",
            "int",
            16,
            "LoRA rank.",
            aliases=("lora_rank",),
            minimum=1,
            resume_critical=True,
            memory=True,
            maximum=4096,
        ),
        ConfigKey(
            "lora_alpha",
            "float",
            None,
            "LoRA alpha (default: the rank, i.e. scale 1).",
            minimum=0,
            resume_critical=True,
            central=True,
        ),
        ConfigKey(
            "lora_dropout", "float", 0.0, "Dropout on the LoRA input.", minimum=0, maximum=1, maximum_exclusive=True
        ),
    ),
)
