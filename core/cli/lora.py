"""``tuner lora ...``: tools for LoRA files after training (resize, merge, extract, convert). Imports nothing heavy
at start; the arithmetic is :mod:`tuner.core.outputs.lora_tools`."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

lora_app = typer.Typer(help="Tools for LoRA files: resize, merge, extract, convert.", no_args_is_help=True)


@lora_app.command("resize")
def resize(
    file: Path = typer.Argument(..., help="LoRA .safetensors file (diffusers, kohya or ComfyUI layout)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the resized file."),
    rank: int | None = typer.Option(None, "--rank", "-r", help="The new rank of every layer (at most its own)."),
    energy: float | None = typer.Option(
        None, "--energy", help="Instead of --rank: per layer, the smallest rank keeping this share of energy (0.99)."
    ),
    layers: bool = typer.Option(True, "--layers/--total", help="Every layer's ranks and energy, or the total."),
) -> None:
    """Shrink a LoRA by the singular values of each layer's change (computed in fp32): exact at a
    layer's own rank, the best change of the smaller rank otherwise. Prints the energy kept."""
    from tuner.core.io import save_safetensors
    from tuner.core.outputs.lora_tools import resize as resized

    tensors, metadata = _read(file, out)
    result = resized(tensors, metadata, str(file), rank=rank, energy=energy)
    save_safetensors(out, result.tensors, result.metadata)
    _report(out, result, layers)


@lora_app.command("merge")
def merge(
    files: list[str] = typer.Argument(..., help="LoRA files of one model, each FILE or FILE:WEIGHT (default 1)."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged file (with --into-base: a new model folder)."),
    rank: int | None = typer.Option(None, "--rank", "-r", help="Bring the summed ranks down to this (SVD)."),
    into_base: bool = typer.Option(False, "--into-base", help="Fold the LoRA(s) into the base model instead."),
    model: str | None = typer.Option(None, "--model", help="With --into-base: the base, a local diffusers folder."),
    layers: bool = typer.Option(True, "--layers/--total", help="Every layer's ranks and energy, or the total."),
) -> None:
    """Several LoRAs as one: per layer the weighted sum of their changes, exact by stacking their
    factors (the ranks add up), or the best change of ``--rank`` after that. With ``--into-base
    --model BASE``: the base's denoiser with them folded in, a diffusers model folder written
    tensor by tensor."""
    from tuner.core.errors import DataError
    from tuner.core.io import save_safetensors
    from tuner.core.outputs.lora_tools import fuse_into_base
    from tuner.core.outputs.lora_tools import merge as merged
    from tuner.core.outputs.lora_tools import resize as resized

    if into_base and model is None:
        raise DataError("--into-base needs --model BASE (a local diffusers model folder)")
    parts = []
    for item in files:
        path, weight = _weighted(item)
        parts.append((*_read(path, out), str(path), weight))
    result = merged(parts)
    if into_base:
        fused, written = fuse_into_base(result.tensors, ", ".join(str(p[2]) for p in parts), model, str(out))
        typer.echo(f"{out}: {model}'s denoiser with {fused} layers changed ({written} tensors), a diffusers folder")
        return
    if rank is not None:
        result = resized(result.tensors, result.metadata, str(out), rank=rank)
    save_safetensors(out, result.tensors, result.metadata)
    _report(out, result, layers)


@lora_app.command("extract")
def extract(
    model: str = typer.Option(..., "--model", help="The base: a local diffusers model folder."),
    tuned: str = typer.Option(..., "--tuned", help="The fine-tuned checkpoint of it, same layout."),
    rank: int = typer.Option(..., "--rank", "-r", help="The LoRA's rank."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the LoRA (diffusers layout)."),
    layers: bool = typer.Option(True, "--layers/--total", help="Every layer's ranks and energy, or the total."),
) -> None:
    """A LoRA from the difference of a fine-tune and its base, taken in fp32 tensor by tensor, at
    the best rank-R change of each layer. Prints the energy kept."""
    from tuner.core.io import save_safetensors
    from tuner.core.outputs.lora_tools import extract as extracted

    result = extracted(model, tuned, rank, {"extracted_from": tuned})
    save_safetensors(out, result.tensors, result.metadata)
    _report(out, result, layers)


@lora_app.command("convert")
def convert(
    file: Path = typer.Argument(..., help="LoRA .safetensors file."),
    to: str = typer.Option(
        ..., "--to", help="The format to write: diffusers, comfyui, or another the family registers."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the converted file."),
    plugin: str = typer.Option(..., "--plugin", "-p", help="Model family the LoRA is for."),
    model: str | None = typer.Option(
        None, "--model", help="Base model (its config files); default: the file's record."
    ),
) -> None:
    """Move a LoRA between layouts. From the diffusers layout the factors are written as the target
    format writes a trained LoRA (q/k/v fused at rank 3r for ComfyUI: exact); from another layout the
    file is read as its runtime reads it and each module's change is factored again at its own rank
    (exact to fp32 rounding). The converted file passes check-lora for its format."""
    import json as json_module

    import torch

    from tuner.core.errors import ConfigError, DataError
    from tuner.core.estimate.models import ModelFiles, build_on_meta
    from tuner.core.host.manager import PluginHost
    from tuner.core.io import save_safetensors
    from tuner.core.model.lora import METADATA_KEY
    from tuner.core.outputs.lora_tools import export_from_changes, export_of

    host = PluginHost(plugin)
    formats, family = host.lora_formats, host.family
    if to not in formats:
        raise ConfigError(f"--to {to!r}: {plugin} writes {', '.join(formats)}")
    tensors, metadata = _read(file, out)
    keys = list(tensors)
    source = next((n for n, f in reversed(formats.items()) if f.detect and f.detect(keys)), next(iter(formats)))
    if source == to:
        raise DataError(f"{file} is in the {to} layout already")
    record = json_module.loads(metadata.get(METADATA_KEY, "{}"))
    base = model or record.get("base_model")
    if not base:
        raise DataError(f"{file} names no base model in its metadata; pass --model (a folder or hub id)")
    library, _, class_name = family.transformer_class.rpartition(".")
    config = ModelFiles(str(base), None).json(f"{family.transformer_subfolder}/config.json")
    skeleton = build_on_meta(library, class_name, config, torch.float32)  # names and shapes, no weights
    if source == "diffusers":
        export = export_of(tensors, metadata, str(file), family.lora_alpha_in)
    else:
        reading = formats[source].read(str(file), skeleton, family)
        if reading.unmatched:
            raise DataError(
                f"{file}: {len(reading.unmatched)} keys its runtime would not load ({reading.unmatched[0]})"
            )
        export = export_from_changes(reading.deltas, metadata, family.lora_alpha_in)
    written = formats[to].export(export, skeleton)
    if len(written) != 1:
        raise DataError(f"the {to} format writes {len(written)} files for one LoRA; convert writes one")
    (converted,) = written.values()
    record["lora_format"] = to
    save_safetensors(out, converted, {**metadata, METADATA_KEY: json_module.dumps(record, sort_keys=True)})
    typer.echo(f"{out}: {file} ({source}) in the {to} layout, {len(converted)} tensors")


def _weighted(item: str) -> tuple[Path, float]:
    """``FILE:WEIGHT`` or ``FILE``; a colon followed by no number belongs to the path."""
    path, _, weight = item.rpartition(":")
    try:
        return Path(path), float(weight)
    except ValueError:
        return Path(item), 1.0


def _read(file: Path, out: Path) -> tuple[dict, dict]:
    """The file's tensors and metadata; refused in one line when its record names an adapter type
    that is not low rank (the adapter records say which)."""
    from safetensors import safe_open

    from tuner.core.errors import DataError
    from tuner.core.outputs.lora_tools import refuse_not_low_rank

    if not file.is_file():
        raise DataError(f"{file} does not exist")
    if out.resolve() == file.resolve():
        raise DataError(f"--out {out}: a file being read; write the result elsewhere")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise DataError(f"{file} is not a readable safetensors file: {exc}") from None
    refuse_not_low_rank(metadata, str(file), _adapter_types())
    return tensors, metadata


@functools.cache
def _adapter_types() -> dict:
    """The installed adapter records, read once per command however many files it reads."""
    from tuner.core.host.manager import PluginHost

    return PluginHost(None).adapter_types


def _report(out: Path, result, layers: bool) -> None:
    ranks = sorted({new for _, new in result.ranks.values()})
    before = sorted({old for old, _ in result.ranks.values()})
    if layers:
        for module, (old, new) in result.ranks.items():
            kept = f", energy {result.layer_energy(module):.4f}" if module in result.squares else ""
            typer.echo(f"  {module}: rank {old} -> {new}{kept}")
    if not result.squares:  # merged exactly: nothing was left out
        typer.echo(f"{out}: {len(result.ranks)} layers, rank {_span(ranks)} (the ranks added up; exact)")
        return
    worst = min(result.ranks, key=result.layer_energy)
    typer.echo(
        f"{out}: {len(result.ranks)} layers, rank {_span(before)} -> {_span(ranks)}; energy kept {result.energy:.4f} "
        f"in all, {result.layer_energy(worst):.4f} at the least ({worst})"
    )


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
