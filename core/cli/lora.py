"""``tuner lora ...``: tools for LoRA files after training (resize so far). Imports nothing heavy
at start; the arithmetic is :mod:`tuner.core.outputs.lora_tools`."""

from __future__ import annotations

from pathlib import Path

import typer

lora_app = typer.Typer(help="Tools for LoRA files: resize.", no_args_is_help=True)


@lora_app.command("resize")
def resize(
    file: Path = typer.Argument(..., help="LoRA .safetensors file (diffusers, kohya or ComfyUI layout)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the resized file."),
    rank: int | None = typer.Option(None, "--rank", "-r", help="The new rank of every layer (at most its own)."),
    energy: float | None = typer.Option(
        None, "--energy", help="Instead of --rank: per layer, the smallest rank keeping this share of energy (0.99)."
    ),
    layers: bool = typer.Option(False, "--layers", help="Print every layer's ranks and energy."),
) -> None:
    """Shrink a LoRA by the singular values of each layer's change (computed in fp32): exact at a
    layer's own rank, the best change of the smaller rank otherwise. Prints the energy kept."""
    from safetensors import safe_open

    from tuner.core.errors import DataError
    from tuner.core.io import save_safetensors
    from tuner.core.outputs.lora_tools import resize as resized

    if not file.is_file():
        raise DataError(f"{file} does not exist")
    if out.resolve() == file.resolve():
        raise DataError(f"--out {out}: the file being read; write the resized LoRA elsewhere")
    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise DataError(f"{file} is not a readable safetensors file: {exc}") from None
    result = resized(tensors, metadata, str(file), rank=rank, energy=energy)
    save_safetensors(out, result.tensors, result.metadata)
    ranks = sorted({new for _, new in result.ranks.values()})
    before = sorted({old for old, _ in result.ranks.values()})
    if layers:
        for module, (old, new) in result.ranks.items():
            typer.echo(f"  {module}: rank {old} -> {new}, energy {result.layer_energy(module):.4f}")
    worst = min(result.ranks, key=result.layer_energy)
    typer.echo(
        f"{out}: {len(result.ranks)} layers, rank {_span(before)} -> {_span(ranks)}; energy kept {result.energy:.4f} "
        f"in all, {result.layer_energy(worst):.4f} at the least ({worst})"
    )


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
