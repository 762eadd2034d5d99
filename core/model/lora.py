"""Adapters on the denoiser: target resolution, peft wiring, and the diffusers/ComfyUI file layout
(the adapter types themselves: :mod:`tuner.core.model.adapters`)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import torch

from tuner.core.host.records import LoraExport

# safetensors metadata key of tuner's own training record. Deliberately not diffusers'
# `lora_adapter_metadata`: diffusers refuses a file carrying both that and `.alpha` tensors.
METADATA_KEY = "tuner_training"
TRANSFORMER_PREFIX = "transformer."


def resolve_targets(model: torch.nn.Module, patterns: Iterable[str], exclude_prefixes: Iterable[str] = ()) -> list[str]:
    """Full names of the Linear modules that peft would match with ``target_modules=patterns``.

    A pattern matches a module whose name equals it or ends with ``.<pattern>`` (peft's rule).
    Modules under any of ``exclude_prefixes`` are dropped.
    """
    patterns = list(patterns)
    excluded = tuple(p.rstrip(".") + "." for p in exclude_prefixes)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.startswith(excluded):
            continue
        if any(name == p or name.endswith("." + p) for p in patterns):
            found.append(name)
    return found


def declared_targets(config: Any, transformer: torch.nn.Module, family: Any) -> list[str] | None:
    """Full module names for the family's ``lora_target_key`` (a preset of ``lora_presets`` or a
    list of names), never under ``never_adapt``; None when the family declares no target key."""
    key = family.lora_target_key
    if not key:
        return None
    value = config[key]
    patterns = family.lora_presets[value] if isinstance(value, str) else value
    never = list(family.never_adapt)
    if not isinstance(value, str):
        touched = [n for n in resolve_targets(transformer, patterns) if n.startswith(tuple(p + "." for p in never))]
        if touched:
            under = next(p for p in never if touched[0].startswith(p + "."))
            raise config.error(
                key,
                f"matches {touched[0]} in {under} ({family.never_adapt[under]}), which {family.name} never adapts; "
                "remove that entry",
            )
    names = resolve_targets(transformer, patterns, exclude_prefixes=never)
    if not names:
        raise config.error(key, f"{value!r} matches no Linear module of the {family.name} transformer")
    return names


def add_lora(transformer: torch.nn.Module, targets: list[str], config: Any, adapter_types: dict[str, Any]) -> None:
    """Freeze the base and add the run's peft adapter (``lora_type``, a registered
    :class:`~tuner.core.host.records.AdapterInfo` in ``adapter_types``) on exactly ``targets`` (full
    module names; never empty: :func:`tuner.core.training.step.attach_lora` refuses that first)."""
    from tuner.core.model.adapters import check_layers

    check_layers(adapter_types, config, transformer, targets)
    transformer.requires_grad_(False)
    # anchored full names, so a name is never matched as a suffix of another
    targets_regex = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    transformer.add_adapter(adapter_types[config.lora_type].peft_config(config, targets_regex))
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # adapters train in fp32 over a bf16/quantized base


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in transformer.parameters() if p.requires_grad]


def export_from(
    transformer: torch.nn.Module, config: Any, metadata: dict[str, Any], alpha_in: str = "tensors"
) -> LoraExport:
    from peft.utils import get_peft_model_state_dict

    from tuner.core.model.adapters import module_of

    state = get_peft_model_state_dict(transformer)
    modules = sorted({module_of(k) for k in state})
    rank = config.network_rank
    # the alpha a loader's alpha / rank turns into the scale peft trained with, read from peft's
    # layers: an adapter type that scales otherwise (rsLoRA: alpha / sqrt(rank)) needs no special case
    scaling = {
        name: float(module.scaling["default"])
        for name, module in transformer.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling
    }
    peft_settings = getattr(transformer, "peft_config", {}).get("default")
    return LoraExport(
        state_dict=state,
        rank=rank,
        alphas={m: _file_alpha(scaling.get(m), rank, float(config.lora_alpha)) for m in modules},
        metadata=metadata,
        alpha_in=alpha_in,
        use_dora=bool(getattr(peft_settings, "use_dora", False)),
    )


def _file_alpha(scaling: float | None, rank: int, lora_alpha: float) -> float:
    """``scaling * rank``, written as ``lora_alpha`` itself when that is what it is (not 7.999999)."""
    if scaling is None or math.isclose(scaling * rank, lora_alpha, rel_tol=1e-6):
        return lora_alpha
    return scaling * rank


def diffusers_layout(export: LoraExport) -> dict[str, torch.Tensor]:
    """``transformer.<module>.lora_A/B.weight`` plus a scalar ``transformer.<module>.alpha`` per module.

    diffusers reads the ``.alpha`` tensors as network alphas and ComfyUI scales by alpha/rank from
    them (it ignores file metadata), so the strength survives a reload in both when alpha != rank.
    """
    from tuner.core.model.adapters import is_lycoris, lycoris_layout

    if is_lycoris(export.state_dict):  # LoKr/LoHa: LyCORIS keys, ComfyUI reads .alpha tensors
        return lycoris_layout(export.state_dict, export.alphas, export.rank, TRANSFORMER_PREFIX)
    tensors = {TRANSFORMER_PREFIX + k: v for k, v in export.state_dict.items()}
    if export.alpha_in == "tensors":
        for module, alpha in export.alphas.items():
            tensors[f"{TRANSFORMER_PREFIX}{module}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    elif export.alpha_in == "folded":  # alpha/rank inside lora_B: every reader's default scale (1) is right
        for module, alpha in export.alphas.items():
            down, up = (f"{TRANSFORMER_PREFIX}{module}.lora_{side}.weight" for side in "AB")
            if down in tensors and up in tensors:
                tensors[up] = tensors[up] * (alpha / tensors[down].shape[0])
    return tensors


def file_metadata(export: LoraExport) -> dict[str, str]:
    """tuner's training record; for families whose diffusers loader reads alpha from
    ``lora_adapter_metadata`` (and never both: diffusers refuses a file with both), that too."""
    metadata = {"format": "pt", METADATA_KEY: json.dumps(export.metadata, sort_keys=True)}
    if export.alpha_in == "metadata":
        modules = sorted(export.alphas)
        alphas = {export.alphas[m] for m in modules}
        peft_config = {
            "r": export.rank,
            "lora_alpha": alphas.pop() if len(alphas) == 1 else export.rank,
            "alpha_pattern": {} if len({export.alphas[m] for m in modules}) == 1 else dict(export.alphas),
            "rank_pattern": {},
            "target_modules": modules,
            "use_dora": export.use_dora,
            "lora_bias": False,
        }
        metadata["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in peft_config.items()})
    return metadata


def read_metadata(path: str) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata() or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
