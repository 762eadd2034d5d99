"""What every adapter type shares once peft has built it: the weight change of each adapted layer
(peft's own arithmetic), the layer checks the type's record asks for, and the LyCORIS file layout
(``AdapterInfo.layout == "lycoris"``) and how ComfyUI reads it. The types themselves are records
(:class:`~tuner.core.host.records.AdapterInfo`); the core's four are in ``tuner.core.builtin``.

LyCORIS files keep LyCORIS' key names under diffusers' module names
(``transformer.<module>.lokr_w1``, ``.alpha``): ComfyUI loads them (it maps ``transformer.`` names
onto its fused weights as row slices); diffusers' loaders read LoRA only, so diffusers cannot.
"""

from __future__ import annotations

import re
from typing import Any

import torch

# a key's parameter part: what follows the module's name
PARAMETER = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|lokr_\w+|hada_\w+|alpha|dora_scale)$")
LYCORIS = ("lokr_", "hada_")


def module_of(key: str) -> str:
    """The module a LoRA/DoRA/LoKr/LoHa key belongs to."""
    return PARAMETER.sub("", key)


def check_layers(adapter_types: dict[str, Any], config: Any, transformer: torch.nn.Module, targets: list[str]) -> None:
    """What peft would get wrong quietly, as one-line errors: a type that builds its factors from the
    weight's stored shape (``packed_weights=False``) on packed 4-bit weights (bitsandbytes), and the
    type's own ``check_layer`` (LoKr's factor must divide both widths). ``adapter_types``: the
    registered :class:`~tuner.core.host.records.AdapterInfo` records by name."""
    adapter = adapter_types[config.lora_type]
    for name in targets:
        layer = transformer.get_submodule(name)
        if not adapter.packed_weights and tuple(layer.weight.shape) != (layer.out_features, layer.in_features):
            able = [n for n, other in adapter_types.items() if other.packed_weights]
            raise config.error(
                "lora_type",
                f"peft's {adapter.name} cannot wrap the packed weights of base_model_precision "
                f"{config.base_model_precision} ({name} stores {tuple(layer.weight.shape)} for "
                f"{layer.out_features}x{layer.in_features}); use int8-quanto or int4-quanto, or "
                f"{' or '.join(able) or 'another adapter type'}",
            )
        if adapter.check_layer is not None:
            adapter.check_layer(config, name, layer)


def base_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The frozen weight under a peft layer, dequantized, in fp32."""
    from peft.utils.integrations import dequantize_module_weight

    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    from tuner.core.fixes import dequantized
    from tuner.core.model.swap import block_in_place

    with block_in_place(base):  # a swapped block's weights: brought in for this read alone
        # bitsandbytes' weights through peft's helper, tensor subclasses (optimum-quanto) by their
        # own method; a copy, since the storage read may be emptied again
        return dequantized(dequantize_module_weight(base)).detach().float().clone()


def trained_deltas(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """``W' - W`` of every adapted layer, by module name, computed by peft's own layers (DoRA with
    its magnitude and the base weight)."""
    deltas = {}
    for name, module in model.named_modules():
        if not hasattr(module, "get_delta_weight") or adapter not in getattr(module, "scaling", {}):
            continue
        with torch.no_grad():
            delta = module.get_delta_weight(adapter).detach().float()
            magnitudes = getattr(module, "lora_magnitude_vector", None)
            if magnitudes is not None and adapter in magnitudes:
                delta = dora_delta(base_weight(module), delta, magnitudes[adapter].weight.detach().float())
        deltas[name] = delta
    return deltas


def dora_delta(weight: torch.Tensor, lora: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's change of ``weight``: ``m * (W + dW) / ||W + dW||_row - W``."""
    combined = weight + lora
    return magnitude.view(-1, 1) * combined / combined.norm(p=2, dim=1, keepdim=True) - weight


# -- LyCORIS files (LoKr, LoHa) --------------------------------------------------------------------


def lycoris_layout(state: dict[str, torch.Tensor], alphas: dict[str, float], rank: int, prefix: str) -> dict:
    """peft's LoKr/LoHa tensors under ``prefix`` + module names, with a scalar ``.alpha`` per module.

    ComfyUI scales a LoKr by alpha / rank only when a side is stored as a product (``_a @ _b``);
    with both sides whole it applies ``kron(w1, w2)`` as stored. Then the scale goes into ``w1`` and
    ``alpha`` is written as the rank, so LyCORIS-style loaders (alpha / rank = 1) agree."""
    tensors = {prefix + key: value for key, value in state.items()}
    for module, alpha in alphas.items():
        whole = f"{prefix}{module}.lokr_w1" in tensors and f"{prefix}{module}.lokr_w2" in tensors
        if whole:
            tensors[f"{prefix}{module}.lokr_w1"] = tensors[f"{prefix}{module}.lokr_w1"] * (alpha / rank)
        tensors[f"{prefix}{module}.alpha"] = torch.tensor(float(rank) if whole else alpha, dtype=torch.float32)
    return tensors


def is_lycoris(keys: Any) -> bool:
    return any(LYCORIS[0] in k or LYCORIS[1] in k for k in keys)


def read_lycoris(
    tensors: dict[str, torch.Tensor], transformer: torch.nn.Module, prefix: str = "transformer."
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read LoKr/LoHa tensors with ComfyUI's arithmetic (its ``LoKrAdapter`` and ``LoHaAdapter``):
    the weight change per module, and the keys that would reach no layer."""
    layers = {
        name.removesuffix(".base_layer"): module
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and not re.search(r"\.(lora_|lokr_|hada_)", name)
    }
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, value in tensors.items():
        module = module_of(key.removeprefix(prefix))
        if not key.startswith(prefix) or module not in layers:
            unmatched.append(key)
            continue
        grouped.setdefault(module, {})[key.removeprefix(prefix + module + ".")] = value.float()
    deltas = {}
    for module, parts in grouped.items():
        try:
            deltas[module] = _lycoris_delta(parts).reshape(layers[module].weight.shape)
        except (KeyError, RuntimeError):  # a part missing (ComfyUI skips the module), or shapes that do not fit
            unmatched += [f"{prefix}{module}.{k}" for k in parts]
    return deltas, sorted(unmatched)


def _lycoris_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """One module's change from its LoKr or LoHa tensors, as ComfyUI computes it."""
    alpha = parts.get("alpha")
    if any(k.startswith("hada_") for k in parts):
        rank = parts["hada_w1_b"].shape[0]
        scale = float(alpha) / rank if alpha is not None else 1.0
        return (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * scale
    if any(k.startswith("lokr_") for k in parts):
        rank = None
        if "lokr_w1" in parts:
            w1 = parts["lokr_w1"]
        else:
            rank, w1 = parts["lokr_w1_b"].shape[0], parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        if "lokr_w2" in parts:
            w2 = parts["lokr_w2"]
        else:
            rank, w2 = parts["lokr_w2_b"].shape[0], parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        scale = float(alpha) / rank if alpha is not None and rank is not None else 1.0
        return torch.kron(w1, w2) * scale
    raise KeyError("no LoKr or LoHa tensors")  # an .alpha alone
