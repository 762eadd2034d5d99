"""Proof that a saved LoRA loads: reread every file the way its runtime does and compare.

After every final save each written file is read back by its format's reader
(:class:`~tuner.core.host.records.LoraFormat`: for the diffusers file, diffusers'
own LoRA reader ``PipelineClass.lora_state_dict`` with peft's arithmetic for the diffusers file,
ComfyUI's key mapping and arithmetic for the ComfyUI file) and the weight change per module is
compared with what training produced. (The full ``load_lora_weights`` path onto a fresh pipeline
is exercised by the tests; at run time it would need a second copy of the base weights.) A key the
runtime would not load, or a delta that differs (a wrong alpha, a misplaced slice), fails the run.
``tuner check-lora`` runs the same reading on any file.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import torch

from tuner.core.errors import TunerError, first_line
from tuner.core.host.records import FamilyInfo, LoraReading
from tuner.core.model.adapters import base_weight, dora_delta, is_lycoris, read_lycoris


class SelfTestFailed(TunerError):
    """A saved LoRA does not reload as trained."""


def adapter_deltas(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The weight change of every adapted layer as training applies it, by module name (peft's
    own arithmetic for each adapter type: :func:`tuner.core.model.adapters.trained_deltas`)."""
    from tuner.core.model.adapters import trained_deltas

    return trained_deltas(model, adapter)


def read_with_diffusers(path: str, transformer: torch.nn.Module, family: FamilyInfo) -> LoraReading:
    """Read the file through diffusers' own LoRA reader for the family's pipeline
    (``PipelineClass.lora_state_dict``: kohya and other layouts converted, ``.alpha`` tensors and
    ``lora_adapter_metadata`` taken into account), then apply it the way peft does
    (``alpha / r * B @ A``) to the transformer's modules. Needs module names only, so it works on
    a quantized model and on an empty skeleton. Keys that would reach no module are reported."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tuner.core.model.quantize import import_object

    if not family.pipeline_class:
        raise TunerError(f"model family {family.name} declares no pipeline_class to read diffusers LoRAs with")
    pipeline_cls = import_object(family.pipeline_class)
    tensors = load_file(path)
    if is_lycoris(tensors):  # LoKr/LoHa: diffusers' loaders read LoRA only; ComfyUI is the runtime
        return LoraReading(*read_lycoris(tensors, transformer))
    # diffusers raises on a lora_A without its lora_B (or the reverse): report those, read the rest
    incomplete = _incomplete_pairs(list(tensors))
    usable = {k: v for k, v in tensors.items() if k not in incomplete}
    reads_alphas = "return_alphas" in inspect.signature(pipeline_cls.lora_state_dict).parameters
    try:
        if reads_alphas:  # Flux-style loaders turn .alpha tensors into network alphas
            state_dict, alphas, metadata = pipeline_cls.lora_state_dict(
                usable, return_alphas=True, return_lora_metadata=True
            )
        else:  # others (SD3) pass network_alphas=None: .alpha tensors are not read
            state_dict, metadata = pipeline_cls.lora_state_dict(usable, return_lora_metadata=True)
            alphas = None
    except Exception as exc:  # a file diffusers cannot read at all
        raise SelfTestFailed(f"{path}: diffusers cannot read it: {first_line(exc)}") from None
    if metadata is None:  # a dict input carries no file metadata; read it from the file
        with safe_open(path, framework="pt") as handle:
            raw = (handle.metadata() or {}).get("lora_adapter_metadata")
        metadata = json.loads(raw) if raw else None
    linears = {
        name.removesuffix(".base_layer")
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name
    }
    config = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}
    deltas: dict[str, torch.Tensor] = {}
    unmatched = sorted(incomplete)
    for key in state_dict:
        if key.startswith(("text_encoder.", "text_encoder_2.")):
            continue  # loaded into a text encoder by diffusers; not the transformer's business
        module = _module_of(key)
        if key.endswith(".lora_magnitude_vector") and module in linears:
            continue  # read with its module's A and B
        if not key.startswith("transformer.") or module not in linears or key.endswith(".alpha"):
            unmatched.append(key)  # diffusers would load this into nothing (or ignore it)
            continue
        if ".lora_A." not in key:
            continue  # B (and a DoRA magnitude) is read together with its A
        down = state_dict[key].float()
        up = state_dict[key.replace(".lora_A.", ".lora_B.")].float()
        rank = down.shape[0]
        alpha = (alphas or {}).get(f"transformer.{module}.alpha")
        if alpha is None:
            alpha = config.get("alpha_pattern", {}).get(module, config.get("lora_alpha", rank))
        deltas[module] = float(alpha) / rank * (up @ down)
        magnitude = state_dict.get(f"transformer.{module}.lora_magnitude_vector")
        if magnitude is not None:  # DoRA, as peft applies it once diffusers has loaded it
            deltas[module] = dora_delta(
                base_weight(transformer.get_submodule(module)), deltas[module], magnitude.float()
            )
    return LoraReading(deltas, sorted(set(unmatched)))


def _module_of(key: str) -> str:
    name = key.removeprefix("transformer.")
    for marker in (".lora_A", ".lora_B", ".lora_down", ".lora_up", ".lora_magnitude_vector", ".alpha"):
        if marker in name:
            return name.split(marker)[0]
    return name


def _incomplete_pairs(keys: list[str]) -> set[str]:
    """Keys of modules that have a down (A) matrix without an up (B) one, or the reverse."""
    parts: dict[str, set[str]] = {}
    for key in keys:
        for side, markers in (("down", (".lora_A.", ".lora_down.")), ("up", (".lora_B.", ".lora_up."))):
            if any(m in key for m in markers):
                parts.setdefault(_module_of(key), set()).add(side)
    broken = {module for module, sides in parts.items() if len(sides) < 2}
    return {k for k in keys if _module_of(k) in broken}


def compare(path: str, reading: LoraReading, trained: dict[str, torch.Tensor], atol: float = 1e-5) -> list[str]:
    """Problems of a reading against the trained deltas (missing modules count as zero change)."""
    problems = [f"{path}: the runtime does not load key {key}" for key in reading.unmatched[:10]]
    if len(reading.unmatched) > 10:
        problems.append(f"{path}: ... and {len(reading.unmatched) - 10} more unloaded keys")
    for module in sorted(set(trained) | set(reading.deltas)):
        ours, theirs = trained.get(module), reading.deltas.get(module)
        if theirs is None:
            if ours is not None and ours.abs().max() > atol:
                problems.append(f"{path}: module {module} is trained but not in the file")
            continue
        reference = ours if ours is not None else torch.zeros_like(theirs)
        error = (theirs.cpu().float() - reference.cpu().float()).abs().max().item()
        if error > atol + 1e-4 * reference.abs().max().item():
            problems.append(f"{path}: module {module} reloads with a weight change off by {error:.3g}")
    return problems


def self_test(host: Any, model: torch.nn.Module, files: dict[str, list[str]]) -> None:
    """Reread each written ``{format: [paths]}`` with that format's reader and fail loudly on any difference."""
    trained = adapter_deltas(model)
    problems = []
    for lora_format, paths in files.items():
        reader = host.lora_formats[lora_format].read
        for path in paths:
            problems += compare(str(path), reader(str(path), model, host.family), trained)
    if problems:
        raise SelfTestFailed("LoRA self-test failed: " + "; ".join(problems[:5]))
