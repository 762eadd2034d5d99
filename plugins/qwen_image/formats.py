"""The ``comfyui`` LoRA format of Qwen-Image: the diffusers file itself, read as ComfyUI 0.3 reads
it. Import-cheap: the manifest registers it; the work is imported when a file is read or written.

ComfyUI's QwenImage key map (``comfy/lora.py``, ``model_lora_keys_unet``): for every model weight
``diffusion_model.X.weight`` the LoRA names ``X``, ``transformer.X``, ``diffusion_model.X``,
``lycoris_X_with_underscores`` and ``lora_unet_X_with_underscores``; it ignores file metadata and
scales each module by its ``.alpha`` over the rank, 1 without one."""

from __future__ import annotations

from tuner.core.api import LoraFormat

LORA_FILE = "pytorch_lora_weights.safetensors"
SIDES = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha")


def comfyui_names(transformer) -> dict[str, str]:
    """Every LoRA module name ComfyUI maps for this transformer -> the module it changes."""
    names = {}
    for name, module in transformer.named_modules():
        if getattr(module, "weight", None) is None or not name:
            continue
        flat = name.replace(".", "_")
        for alias in (name, f"transformer.{name}", f"diffusion_model.{name}", f"lycoris_{flat}", f"lora_unet_{flat}"):
            names[alias] = name
    return names


def read(path, transformer, family):
    from safetensors.torch import load_file

    from tuner.core.api import LoraReading

    tensors = load_file(path)
    names = comfyui_names(transformer)
    groups: dict[str, dict[str, object]] = {}
    unmatched = []
    for key, value in tensors.items():
        side = next((s for s in SIDES if key.endswith(s)), None)
        if side is None or key[: -len(side)] not in names:
            unmatched.append(key)
            continue
        groups.setdefault(key[: -len(side)], {})[side] = value
    deltas = {}
    for prefix, parts in groups.items():
        down = parts.get(".lora_A.weight", parts.get(".lora_down.weight"))
        up = parts.get(".lora_B.weight", parts.get(".lora_up.weight"))
        if down is None or up is None:  # ComfyUI raises KeyError on a lora_B without its lora_A
            unmatched += [f"{prefix}{side}" for side in parts]
            continue
        alpha = parts.get(".alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        deltas[names[prefix]] = scale * (up.float() @ down.float())
    return LoraReading(deltas, sorted(unmatched))


def export(export, transformer):
    from tuner.core.api import diffusers_layout

    return {LORA_FILE: diffusers_layout(export)}  # the same file: ComfyUI maps its names as they are


COMFYUI = LoraFormat(
    "comfyui",
    f"{LORA_FILE} itself: ComfyUI maps Qwen-Image's diffusers names (alpha folded into lora_B)",
    export=export,
    read=read,
    layouts=("lora",),
)
