"""The adapter types the core registers (``lora_type``): records only, peft imported inside.

* ``lora``: ``scale * B @ A`` (``scale = lora_alpha / network_rank``).
* ``dora``: LoRA plus a magnitude per output row: ``W' = m * (W + dW) / ||W + dW||_row`` (peft's
  ``use_dora``). diffusers' ``load_lora_weights`` reads peft's ``lora_magnitude_vector`` keys.
* ``lokr``: ``scale * kron(w1, w2)``, a side stored whole or as a rank-r product ``a @ b`` (peft's
  LoKr, LyCORIS' layout). ``lokr_factor`` splits each width in two factors.
* ``loha``: ``scale * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product; peft's LoHa).

A plugin adds a type the same way (``register_adapter_types``); nothing in the core names these.
"""

from __future__ import annotations

from typing import Any

from tuner.core.host.records import AdapterInfo

LYCORIS_LOADED_BY = "ComfyUI (LyCORIS keys; diffusers' loaders read LoRA only)"


def _lora_config(config: Any, target_modules: str, use_dora: bool = False) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.network_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules,
        init_lora_weights=True,
        use_dora=use_dora,
    )


def _lokr_config(config: Any, target_modules: str) -> Any:
    from peft import LoKrConfig

    return LoKrConfig(
        r=config.network_rank,
        alpha=config.lora_alpha,
        target_modules=target_modules,
        decompose_factor=config.lokr_factor,
        init_weights=True,
    )


def _loha_config(config: Any, target_modules: str) -> Any:
    from peft import LoHaConfig

    return LoHaConfig(r=config.network_rank, alpha=config.lora_alpha, target_modules=target_modules, init_weights=True)


def _check_lokr_factor(config: Any, name: str, layer: Any) -> None:
    """peft would pick another split quietly when ``lokr_factor`` does not divide a width."""
    factor = config.lokr_factor
    if factor <= 0:
        return
    for side, width in (("input", layer.in_features), ("output", layer.out_features)):
        if width % factor:
            divisors = [d for d in (2, 4, 8, 16, 32) if width % d == 0]
            raise config.error(
                "lokr_factor",
                f"{factor} does not divide the {side} width {width} of {name}; use one that does "
                f"({', '.join(map(str, divisors)) or '1'}) or -1 (as square as possible)",
            )


ADAPTER_TYPES = (
    AdapterInfo("lora", "LoRA: scale * B @ A", peft_config=_lora_config, low_rank=True),
    AdapterInfo(
        "dora",
        "DoRA: LoRA with a magnitude per output row",
        peft_config=lambda config, targets: _lora_config(config, targets, use_dora=True),
        loaded_by="diffusers (ComfyUI ignores its DoRA magnitudes: it reads DoRA from lora_format comfyui's dora_scale)",
        required_parts=("lora_magnitude_vector",),
    ),
    AdapterInfo(
        "lokr",
        "LoKr: Kronecker product, LyCORIS keys (ComfyUI loads it, diffusers cannot)",
        peft_config=_lokr_config,
        loaded_by=LYCORIS_LOADED_BY,
        layout="lycoris",
        packed_weights=False,
        dropout=False,
        own_keys=("lokr_factor",),
        check_layer=_check_lokr_factor,
    ),
    AdapterInfo(
        "loha",
        "LoHa: Hadamard product of two low-rank products, LyCORIS keys (ComfyUI only)",
        peft_config=_loha_config,
        loaded_by=LYCORIS_LOADED_BY,
        layout="lycoris",
        packed_weights=False,
        dropout=False,
    ),
)
