"""The ComfyUI LoRA layout of the Flux lineage: BFL module names under ``diffusion_model.``.

ComfyUI loads Flux and Chroma LoRAs by the original (BFL) weight names, where q/k/v are one fused
``qkv`` weight and a single block's q/k/v/mlp input projections are one ``linear1`` weight. A LoRA
trained on the separate diffusers modules is written there exactly, as a block LoRA of rank
k*r: ``A = cat(A_1..A_k)`` and ``B`` block-diagonal, with ``alpha`` scaled by k so that ComfyUI's
``alpha / rank`` stays the trained ``alpha / r``. A file with diffusers module names under
``diffusion_model.`` (what the reference trainer writes) loads nothing in ComfyUI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tuner.core.api import PluginError

PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class BflNames:
    """One generation's diffusers -> BFL module names: per double block, per single block (whole
    weights, and row slices of a fused one in their order) and at the root."""

    double: dict[str, str]
    double_fused: dict[str, tuple[str, int]]
    single: dict[str, str]
    single_fused: dict[str, int]
    root: dict[str, str]
    swapped: frozenset[str] = frozenset({"norm_out.linear"})  # BFL orders it (shift, scale), diffusers (scale, shift)


QKV_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
# Flux.1 and Chroma (ComfyUI's ``flux_to_diffusers``; it reads diffusers-named LoRAs of Flux.2 too)
FLUX1 = BflNames(
    double={
        "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj",
        "ff.net.0.proj": "img_mlp.0",
        "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0",
        "ff_context.net.2": "txt_mlp.2",
        "norm1.linear": "img_mod.lin",
        "norm1_context.linear": "txt_mod.lin",
    },
    double_fused=QKV_FUSED,
    single={"proj_out": "linear2", "norm.linear": "modulation.lin"},
    single_fused={"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3},
    root={
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "proj_out": "final_layer.linear",
        "norm_out.linear": "final_layer.adaLN_modulation.1",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    },
)
# Flux.2 (diffusers' convert_flux2_transformer_checkpoint_to_diffusers, read backwards): the single
# blocks are fused in diffusers too, the modulation is shared by all blocks of a kind
FLUX2 = BflNames(
    double={
        "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj",
        "ff.linear_in": "img_mlp.0",
        "ff.linear_out": "img_mlp.2",
        "ff_context.linear_in": "txt_mlp.0",
        "ff_context.linear_out": "txt_mlp.2",
    },
    double_fused=QKV_FUSED,
    single={"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"},
    single_fused={},
    root={
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "proj_out": "final_layer.linear",
        "norm_out.linear": "final_layer.adaLN_modulation.1",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin",
    },
)
NAMES = {"flux1": FLUX1, "flux2": FLUX2}


@dataclass(frozen=True)
class Place:
    """Where a diffusers module's output rows live in a BFL weight."""

    target: str  # BFL module name
    start: int
    rows: int
    total: int  # rows of the BFL weight
    swapped: bool = False


def places(transformer: torch.nn.Module, names: BflNames = FLUX1) -> dict[str, Place]:
    """Every Linear of a Flux-lineage transformer that has a BFL name, with its row range there."""
    linears = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name:
            linears[name.removesuffix(".base_layer")] = module  # peft keeps the original at .base_layer
    found: dict[str, Place] = {}
    fused: dict[str, list[tuple[int, str]]] = {}
    for name, module in linears.items():
        rows = module.out_features
        match = BLOCK.match(name)
        if match is None:
            if name in names.root:
                found[name] = Place(names.root[name], 0, rows, rows, name in names.swapped)
            continue
        kind, index, rest = match.groups()
        if kind == "transformer_blocks":
            if rest in names.double:
                found[name] = Place(f"double_blocks.{index}.{names.double[rest]}", 0, rows, rows)
            elif rest in names.double_fused:
                target, order = names.double_fused[rest]
                fused.setdefault(f"double_blocks.{index}.{target}", []).append((order, name))
        elif rest in names.single:
            found[name] = Place(f"single_blocks.{index}.{names.single[rest]}", 0, rows, rows)
        elif rest in names.single_fused:
            fused.setdefault(f"single_blocks.{index}.linear1", []).append((names.single_fused[rest], name))
    for target, members in fused.items():
        members.sort()
        total = sum(linears[name].out_features for _, name in members)
        start = 0
        for _, name in members:
            found[name] = Place(target, start, linears[name].out_features, total)
            start += linears[name].out_features
    return found


def _swap_halves(rows: torch.Tensor) -> torch.Tensor:
    first, second = rows.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def export_comfyui(
    state_dict: dict[str, torch.Tensor],
    alphas: dict[str, float],
    rank: int,
    transformer: torch.nn.Module,
    names: BflNames = FLUX1,
) -> dict[str, torch.Tensor]:
    """peft LoRA tensors (diffusers names) -> ComfyUI keys on BFL names, fused where BFL fuses."""
    where = places(transformer, names)
    groups: dict[str, list[str]] = {}
    for module in alphas:
        if module not in where:
            raise PluginError(
                f"comfyui LoRA format: module {module} has no ComfyUI (BFL) name; "
                "drop it from flux_lora_target or use lora_format: diffusers"
            )
        groups.setdefault(where[module].target, []).append(module)
    out: dict[str, torch.Tensor] = {}
    for target, members in groups.items():
        members.sort(key=lambda m: where[m].start)
        down = torch.cat([state_dict[f"{m}.lora_A.weight"] for m in members], dim=0)
        up = torch.zeros(where[members[0]].total, down.shape[0], dtype=down.dtype)
        for k, module in enumerate(members):
            place = where[module]
            block = state_dict[f"{module}.lora_B.weight"]
            up[place.start : place.start + place.rows, k * rank : (k + 1) * rank] = (
                _swap_halves(block) if place.swapped else block
            )
        key = PREFIX + target
        out[f"{key}.lora_A.weight"] = down
        out[f"{key}.lora_B.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(alphas[members[0]] * len(members), dtype=torch.float32)
        if any(f"{m}.lora_magnitude_vector" in state_dict for m in members):
            out[f"{key}.dora_scale"] = _dora_scale(state_dict, alphas, rank, transformer, where, target)
    return out


def _fused_base(transformer: torch.nn.Module, where: dict[str, Place], target: str) -> tuple[torch.Tensor, list[str]]:
    """The BFL weight ``target`` as ComfyUI holds it: its diffusers modules' base weights stacked
    in BFL row order (dequantized, fp32), and those modules in that order."""
    from tuner.core.api import base_weight

    members = sorted((m for m, p in where.items() if p.target == target), key=lambda m: where[m].start)
    rows = []
    for module in members:
        weight = base_weight(transformer.get_submodule(module))
        rows.append(_swap_halves(weight) if where[module].swapped else weight)
    return torch.cat(rows, dim=0), members


def _dora_scale(state_dict, alphas, rank, transformer, where, target) -> torch.Tensor:
    """ComfyUI's ``dora_scale`` for a fused weight, one value per output row: it computes
    ``W' = (W + dW) * dora_scale / ||W||_row`` (the base weight's row norms), and peft trained
    ``W' = m * (W + dW) / ||W + dW||_row``, so ``dora_scale = m * ||W||_row / ||W + dW||_row``, row
    by row; rows of modules without an adapter keep ``||W||_row`` (no change)."""
    from tuner.core.api import base_weight

    _, members = _fused_base(transformer, where, target)
    scales = []
    for module in members:
        weight = base_weight(transformer.get_submodule(module))
        norm = weight.norm(p=2, dim=1)
        magnitude = state_dict.get(f"{module}.lora_magnitude_vector")
        if magnitude is None:
            row = norm
        else:
            down = state_dict[f"{module}.lora_A.weight"].float()
            up = state_dict[f"{module}.lora_B.weight"].float()
            combined = weight + alphas[module] / rank * (up @ down)
            row = magnitude.float() * norm / combined.norm(p=2, dim=1)
        scales.append(_swap_halves(row) if where[module].swapped else row)
    return torch.cat(scales).unsqueeze(1)


def read_comfyui(
    tensors: dict[str, torch.Tensor], transformer: torch.nn.Module, names: BflNames = FLUX1
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a file the way ComfyUI does: match each LoRA to a BFL weight of this model, delta =
    alpha/rank * up @ down, then express the deltas per diffusers module. Keys under diffusers'
    ``transformer.`` names are read as ComfyUI maps them (:func:`_read_diffusers_names`): through
    Flux.1's table whatever the generation, as ComfyUI 0.3 does, so a diffusers-named Flux.2 file
    loads there only in part (its MLPs and single blocks have no Flux.1 name), and so here.
    Returns (deltas, unmatched)."""
    where = places(transformer, names)
    diffusers_named = {k: v for k, v in tensors.items() if k.startswith(DIFFUSERS_PREFIX)}
    deltas, unmatched = _read_diffusers_names(diffusers_named, transformer, places(transformer, FLUX1))
    tensors = {k: v for k, v in tensors.items() if k not in diffusers_named}
    members: dict[str, list[str]] = {}
    for module, place in where.items():
        members.setdefault(place.target, []).append(module)
    names = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in tensors}
    for name in sorted(names):
        target = name.removeprefix(PREFIX)
        down, up = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
        if down is None:
            down, up = tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight")
        if not name.startswith(PREFIX) or target not in members or down is None or up is None:
            unmatched += [k for k in tensors if k.startswith(name + ".")]
            continue
        alpha = tensors.get(f"{name}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        fused = scale * (up.float() @ down.float())
        dora_scale = tensors.get(f"{name}.dora_scale")
        if dora_scale is not None:  # ComfyUI's weight_decompose, per output row: (W + dW) * s / ||W||_row
            weight, _ = _fused_base(transformer, where, target)
            if dora_scale.shape[0] != weight.shape[0]:
                unmatched += [f"{name}.dora_scale"]  # LyCORIS' per-column convention: not what tuner writes
            else:
                norm = weight.norm(p=2, dim=1, keepdim=True) + torch.finfo(torch.float32).eps
                fused = (weight + fused) * (dora_scale.float().view(-1, 1) / norm) - weight
        for module in members[target]:
            place = where[module]
            rows = fused[place.start : place.start + place.rows]
            deltas[module] = _swap_halves(rows) if place.swapped else rows
    return deltas, sorted(unmatched)


def _read_diffusers_names(
    tensors: dict[str, torch.Tensor], transformer: torch.nn.Module, where: dict[str, Place]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ComfyUI's reading of ``transformer.<diffusers module>`` keys: it maps every diffusers module
    that has a BFL weight onto that weight (q/k/v and proj_mlp as row slices of the fused one,
    which is exact), scales by ``.alpha / rank`` (1 without an ``.alpha``) and reads LyCORIS keys
    with their own arithmetic. It loads nothing else: not a module without a BFL name (Chroma's
    approximator), not a peft DoRA magnitude, not a bias."""
    from tuner.core.api import is_lycoris, module_of, read_lycoris

    if is_lycoris(tensors):
        deltas, unmatched = read_lycoris(tensors, transformer, DIFFUSERS_PREFIX)
        return {m: d for m, d in deltas.items() if m in where}, sorted(
            unmatched
            + [
                k
                for k in tensors
                if module_of(k.removeprefix(DIFFUSERS_PREFIX)) in deltas
                and module_of(k.removeprefix(DIFFUSERS_PREFIX)) not in where
            ]
        )
    deltas: dict[str, torch.Tensor] = {}
    unmatched = []
    for key in tensors:
        module = module_of(key.removeprefix(DIFFUSERS_PREFIX))
        down, up = (
            tensors.get(f"{DIFFUSERS_PREFIX}{module}.lora_A.weight"),
            tensors.get(f"{DIFFUSERS_PREFIX}{module}.lora_B.weight"),
        )
        readable = key.endswith((".lora_A.weight", ".lora_B.weight", ".alpha"))
        if module not in where or not readable or down is None or up is None:
            unmatched.append(key)
            continue
        if key.endswith(".lora_A.weight"):
            alpha = tensors.get(f"{DIFFUSERS_PREFIX}{module}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            deltas[module] = scale * (up.float() @ down.float())
    return deltas, sorted(unmatched)
