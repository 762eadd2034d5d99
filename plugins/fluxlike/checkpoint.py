"""A Flux-lineage denoiser (Flux.1, Chroma, Flux.2) as one single-file checkpoint in BFL's layout, what
ComfyUI's diffusion-model loader and diffusers' ``from_single_file`` read: BFL names under
``model.diffusion_model.``, q/k/v fused into ``qkv`` (double blocks) and ``linear1`` with the MLP's
input (single blocks), the final modulation's halves in BFL's order. The inverse of diffusers'
``convert_flux_transformer_checkpoint_to_diffusers`` / ``convert_chroma_..._to_diffusers``
(tests/test_full.py reads the file back through ``from_single_file``, tensor for tensor)."""

from __future__ import annotations

import re

import torch

from tuner.plugins.fluxlike.bfl import BLOCK, FLUX1, BflNames, places

CHECKPOINT_PREFIX = "model.diffusion_model."
# the weights that are no Linear's: the q/k RMS norms' scales
DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
# Chroma's approximator (distilled_guidance_layer): its layers' Linears and norms by BFL's names
APPROXIMATOR = (
    (re.compile(r"^(distilled_guidance_layer\.layers\.\d+)\.linear_1\.(weight|bias)$"), r"\1.in_layer.\2"),
    (re.compile(r"^(distilled_guidance_layer\.layers\.\d+)\.linear_2\.(weight|bias)$"), r"\1.out_layer.\2"),
    (re.compile(r"^(distilled_guidance_layer\.norms\.\d+)\.weight$"), r"\1.scale"),
    (re.compile(r"^(distilled_guidance_layer\.(in_proj|out_proj)\.(weight|bias))$"), r"\1"),
)


def _other_name(name: str) -> str | None:
    """The BFL name of a tensor that is not a placed Linear's, or None."""
    match = BLOCK.match(name)
    if match is not None:
        kind, index, rest = match.groups()
        table, prefix = (
            (DOUBLE_NORMS, "double_blocks") if kind == "transformer_blocks" else (SINGLE_NORMS, "single_blocks")
        )
        return f"{prefix}.{index}.{table[rest]}" if rest in table else None
    for pattern, replacement in APPROXIMATOR:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None


def bfl_checkpoint(
    transformer: torch.nn.Module, names: BflNames = FLUX1, prefix: str = CHECKPOINT_PREFIX
) -> dict[str, torch.Tensor]:
    """Every weight of ``transformer`` under its BFL name (see the module's docstring), each key
    after ``prefix`` (Flux.2: none, as BFL publishes it; diffusers' Flux.2 converter strips no prefix)."""
    where = places(transformer, names)
    out: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for name, module in transformer.named_modules():
        place = where.get(name)
        if place is None or not isinstance(module, torch.nn.Linear):
            continue
        for kind in ("weight", "bias"):
            tensor = getattr(module, kind)
            if tensor is None:
                continue
            covered.add(f"{name}.{kind}")
            tensor = tensor.detach()
            if place.swapped:
                first, second = tensor.chunk(2, dim=0)
                tensor = torch.cat([second, first], dim=0)
            key = f"{prefix}{place.target}.{kind}"
            if place.total == place.rows:
                out[key] = tensor
                continue
            if key not in out:
                out[key] = tensor.new_empty(place.total, *tensor.shape[1:])
            out[key][place.start : place.start + place.rows] = tensor
    for name, tensor in transformer.state_dict().items():
        if name in covered:
            continue
        other = _other_name(name)
        if other is None:
            raise KeyError(f"no BFL name for {name}")
        out[prefix + other] = tensor.detach()
    return out
