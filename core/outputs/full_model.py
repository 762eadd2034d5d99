"""The outputs of a full fine-tune (``model_type: full``): the denoiser as a diffusers folder
(``transformer/``: sharded safetensors and its config, what the family's pipeline loads with
``from_pretrained(..., subfolder="transformer")`` or as ``transformer=``), and the single files the
family writes for other runtimes (``export_full_model``: ComfyUI's layout for the Flux lineage).
Both are written atomically and reread before the run calls them done."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tuner.core.errors import TunerError
from tuner.core.io import save_safetensors

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.training.state import RunContext

MODEL_FOLDER = "transformer"
SHARD_SIZE = "5GB"


def save_model_folder(model: torch.nn.Module, folder: Path) -> Path:
    """``model.save_pretrained`` into ``folder``: written beside it first, then swapped in, so a
    crash leaves the old folder or the new one, never half of either."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=SHARD_SIZE)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def self_test(model: torch.nn.Module, folder: Path) -> None:
    """Read the folder back as ``from_pretrained`` would (its config, every shard) and compare each
    tensor with the model's, bit for bit, one tensor at a time: a second copy of a model of billions
    of parameters would need as much RAM again."""
    from safetensors import safe_open

    type(model).load_config(folder)  # the config the family's pipeline reads
    ours = model.state_dict()
    seen, differing = set(), []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                seen.add(key)
                if key not in ours or not torch.equal(ours[key].cpu(), handle.get_tensor(key)):
                    differing.append(key)
    differing += sorted(set(ours) - seen)
    if differing:
        raise TunerError(f"self-test failed: {folder} does not reload as trained: {', '.join(differing[:5])}")


def save_full(ctx: RunContext, model: torch.nn.Module, suffix: str = "") -> list[Path]:
    """The folder (self-tested) and the family's single files, in ``output_dir``. Main process only."""
    folder = ctx.output_dir / f"{MODEL_FOLDER}{suffix}"
    try:
        save_model_folder(model, folder)
        written = [folder]
        for files in ctx.host.call("export_full_model", transformer=model, config=ctx.config):
            for name, tensors in (files or {}).items():
                stem, dot, extension = name.rpartition(".")
                written.append(save_safetensors(ctx.output_dir / f"{stem}{suffix}{dot}{extension}", tensors))
    except OSError as exc:
        raise TunerError(f"cannot write the model to {ctx.output_dir}: {exc}") from None
    self_test(model, folder)
    return written
