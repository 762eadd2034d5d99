"""The trained adapter as files: one path for checkpoints and the final save. Every format the run
writes (``lora_format``) comes from its registered :class:`~tuner.core.host.records.LoraFormat`; the
final files are reread by each format's reader (the self-test) before the run calls them done."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuner.core import __version__
from tuner.core.config.values import model_source
from tuner.core.errors import TunerError
from tuner.core.io import save_safetensors
from tuner.core.model.lora import export_from, file_metadata

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.training.state import RunContext

LORA_FILE = "pytorch_lora_weights.safetensors"


def with_suffix(file: str, suffix: str) -> str:
    """``pytorch_lora_weights.safetensors`` with ``_ema``: ``pytorch_lora_weights_ema.safetensors``."""
    stem, dot, extension = file.rpartition(".")
    return f"{stem}{suffix}{dot}{extension}" if suffix else file


def training_record(ctx: RunContext, targets: list[str], step: int) -> dict[str, Any]:
    """tuner's record of how the adapter was trained, stored in every file's metadata."""
    config = ctx.config
    return {
        "tuner_version": __version__,
        "model_family": config.model_family,
        "model_flavour": config.model_flavour,
        "base_model": _absolute_if_local(model_source(config, ctx.host.family.flavours)),
        "lora_type": config.lora_type,
        "rank": config.network_rank,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": targets,
        "steps": step,
        "resolution": config.resolution,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "base_model_precision": config.base_model_precision,
    }


def _absolute_if_local(source: str) -> str:
    """A local model folder as an absolute path (`tuner check-lora` finds it from any folder); a hub id as is."""
    folder = Path(source).expanduser()
    return str(folder.resolve()) if folder.is_dir() else source


def lora_files(
    ctx: RunContext, model: torch.nn.Module, targets: list[str], step: int
) -> dict[str, dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]]:
    """``{format: {file name: (tensors, safetensors metadata)}}`` for every format of the run
    (none for a full fine-tune: its checkpoints hold the trained weights themselves)."""
    if ctx.config.get("model_type", "lora") == "full":
        return {}
    export = export_from(model, ctx.config, training_record(ctx, targets, step), ctx.host.family.lora_alpha_in)
    metadata = file_metadata(export)
    formats = ctx.host.lora_formats
    # a fused layout may read base weights (a DoRA's dora_scale): base_weight brings a swapped block in
    return {
        name: {file: (tensors, metadata) for file, tensors in formats[name].export(export, model).items()}
        for name in ctx.config.lora_format
    }


def save_final(
    ctx: RunContext,
    model: torch.nn.Module,
    targets: list[str],
    step: int,
    last_good: Callable[[], str],
    suffix: str = "",
) -> list[Path]:
    """Write the final LoRA in every format to ``output_dir`` (atomically), then reread each file
    as its runtime would and fail the run on any difference. Main process only. ``last_good`` names
    the newest intact checkpoint for the error message (it verifies checkpoints: called on failure only).
    ``suffix`` goes before each file's extension (``_ema``: the EMA's files)."""
    from tuner.core.model.selftest import self_test

    if ctx.config.get("model_type", "lora") == "full":  # the model itself: a diffusers folder and single files
        from tuner.core.outputs.full_model import save_full

        return save_full(ctx, model, suffix)
    folder = ctx.output_dir
    written: dict[str, list[Path]] = {}
    try:
        for name, files in lora_files(ctx, model, targets, step).items():
            written[name] = [
                save_safetensors(folder / with_suffix(file, suffix), *content) for file, content in files.items()
            ]
    except OSError as exc:
        raise TunerError(f"cannot write the LoRA to {folder}: {exc}; {last_good()} in {folder} is intact") from None
    self_test(ctx.host, model, written)  # DoRA's base weights through base_weight, a block at a time
    return [path for paths in written.values() for path in paths]
