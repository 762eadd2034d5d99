"""The sharded part of a checkpoint of an FSDP2 run (``fsdp_enable``), written and read with
PyTorch's distributed checkpointing (DCP) in its safetensors format: no pickle anywhere.

``checkpoint-N/sharded/`` holds what each process owns of the trained weights (``adapter.<name>``),
the optimizer's per-parameter state (``optimizer.<index>.<key>``) and the EMA (``ema.<name>``), one
``shard-*.safetensors`` file per process with DCP's slice offsets in its header. Everything else
(the LoRA files, RNG, ``state.json``) is written by the main process as in an unsharded checkpoint,
and the manifest, written last, covers the shards too: the save stays all or nothing, verified on
load.

DCP reads a checkpoint into whatever layout the reading run has: the shards of another number of
processes, or whole tensors in a run of one process without FSDP2 (both tested).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuner.core.errors import TunerError, first_line
from tuner.core.outputs import checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.training.state import RunContext, TrainState

SHARDS = "sharded"


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / SHARDS).is_dir()


def sharded_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    """What DCP writes: every tensor whose size grows with the model, by a name that does not
    depend on the number of processes."""
    tensors = {f"adapter.{name}": value for name, value in state.adapter().items()}
    optimizer_tensors, _ = checkpoint.optimizer_state(state.optimizer)
    tensors.update({f"optimizer.{key}": value for key, value in optimizer_tensors.items()})
    if state.ema is not None:
        tensors.update({f"ema.{name}": value for name, value in state.ema.state_dict().items()})
    return tensors


def write(
    ctx: RunContext,
    folder: Path,
    state: TrainState,
    files: dict[str, Any],
    record: dict[str, Any],
    last_good: Callable[[], str],
) -> None:
    """Every process writes its shards into the partial folder, then the main process adds
    ``files`` and ``record`` and renames it into place. Called by every process."""
    import torch.distributed.checkpoint as dcp

    partial = checkpoint.partial_folder(folder, "sharded")
    problem: TunerError | None = None
    if ctx.is_main:
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        except OSError as exc:
            problem = checkpoint.write_error(exc, folder, last_good)
    _agree(problem)  # the folder exists before any process writes into it
    try:
        writer = dcp.HuggingFaceStorageWriter(str(partial / SHARDS), save_distributed=True)
        dcp.save(sharded_tensors(state), storage_writer=writer)
    except Exception as exc:  # DCP raises on every process when any of them failed to write
        if ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else None
        if cause is not None:
            raise checkpoint.write_error(cause, folder, last_good) from None
        raise TunerError(f"cannot write the shards of {folder}: {first_line(exc)}") from None
    if ctx.is_main:
        try:
            checkpoint.write_checkpoint(folder, files, record, last_good, partial=partial)
        except TunerError as exc:
            problem = exc
    _agree(problem)


def _agree(problem: TunerError | None) -> None:
    """The main process's ``problem`` (None: all went well) raised in every process, so none waits
    for a process that has failed: the main one raises its own error, the others its message."""
    from accelerate.utils import broadcast_object_list

    said = broadcast_object_list([str(problem) if problem is not None else None])[0]
    if problem is not None:
        raise problem
    if said is not None:
        raise TunerError(said)


def read(folder: Path, state: TrainState) -> tuple[dict[str, torch.Tensor], ...]:
    """The adapter, optimizer and EMA tensors of a sharded checkpoint, each laid out like what it
    loads into in this run (this process's slice under FSDP2, whole tensors otherwise)."""
    import torch.distributed.checkpoint as dcp

    shards = str(Path(folder) / SHARDS)
    saved = dcp.HuggingFaceStorageReader(shards).read_metadata().state_dict_metadata
    parameters = dict(state.model.named_parameters())
    by_index = [p for group in state.optimizer.param_groups for p in group["params"]]
    averages = state.ema.state_dict() if state.ema is not None else {}
    targets: dict[str, torch.Tensor] = {}
    for key, meta in saved.items():
        kind, _, name = key.partition(".")
        like = {"adapter": parameters.get(name), "ema": averages.get(name)}.get(kind)
        if kind == "optimizer":
            like = by_index[int(name.split(".")[0])]
        dtype = meta.properties.dtype
        if like is not None and tuple(like.shape) == tuple(meta.size):
            targets[key] = torch.zeros_like(like.detach(), dtype=dtype)  # sharded like the parameter
        else:  # a scalar (an optimizer's step count): whole on every process; load_state_dict places it
            targets[key] = torch.zeros(tuple(meta.size), dtype=dtype)
    with warnings.catch_warnings():  # a run of one process: DCP says it reads without a process group
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(targets, storage_reader=dcp.HuggingFaceStorageReader(shards))
    parts: dict[str, dict[str, torch.Tensor]] = {"adapter": {}, "optimizer": {}, "ema": {}}
    for key, value in targets.items():
        kind, _, name = key.partition(".")
        parts[kind][name] = value
    return parts["adapter"], parts["optimizer"], parts["ema"]
