"""FSDP2 (``fsdp_enable: true``): the denoiser's parameters, gradients and optimizer state sharded
across the processes by PyTorch's own ``fully_shard``, one unit per transformer block and one for
the rest (the root).

Why tuner calls ``fully_shard`` itself instead of accelerate's FSDP plugin: accelerate selects its
FSDP distributed type only on GPU-like devices (a CPU run stays ``MULTI_CPU``), so the CPU tests
would never reach the code GPUs run; and the run's own pieces (LoRA or full weights, checkpointing
per block, the adapter's names in its files) are in place before sharding, where tuner knows them.
accelerate still starts the processes and prepares the optimizer and the data.

Sharded parameters are ``DTensor``s: each process holds a slice of every tensor, and the forward of
a block gathers its weights (in ``mixed_precision``'s dtype) and frees them again. What reads whole
tensors outside a forward (the LoRA files, a full model's folder) runs inside :func:`gathered`,
which every process enters together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import torch

from tuner.core.model.swap import repeated_blocks

T = TypeVar("T")


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def shard(model: torch.nn.Module, weight_dtype: torch.dtype, reshard_after_forward: bool) -> int:
    """``fully_shard`` every repeated block of ``model``, then ``model`` itself (in place); returns
    the number of blocks. Under mixed precision the gathered weights are cast to ``weight_dtype``
    (the frozen base already is; a LoRA or full fine-tune's fp32 weights compute in it as autocast
    would) and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if weight_dtype == torch.float32:
        policy = MixedPrecisionPolicy()
    else:
        policy = MixedPrecisionPolicy(param_dtype=weight_dtype, reduce_dtype=torch.float32)
    blocks = repeated_blocks(model)
    for _, block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return len(blocks)


def in_turns(accelerator: Any, build: Callable[[], T], one_at_a_time: bool) -> T:
    """``build()`` in every process; ``one_at_a_time``: the processes of each machine take turns
    (local rank 0 first, the others waiting), so a machine's RAM holds one whole model being
    loaded and sharded at a time plus everyone's shards, instead of one whole model per process."""
    if not one_at_a_time:
        return build()
    own = accelerator.local_process_index
    turns = int(accelerator.gather(torch.tensor([own + 1], device=accelerator.device)).max())
    built = None
    for turn in range(turns):  # as many barriers in every process, whatever its machine's count
        if turn == own:
            built = build()
        accelerator.wait_for_everyone()
    return built


def gradient_sync(model: torch.nn.Module, accelerator: Any, syncing: bool):
    """The context of one micro-batch's backward: gradients are reduced across processes only on
    the last micro-batch of a step (DDP's ``no_sync``; FSDP2's ``set_requires_gradient_sync``)."""
    if syncing:
        return nullcontext()
    if is_sharded(model):
        return _without_gradient_sync(model)
    return accelerator.no_sync(model)


@contextmanager
def _without_gradient_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def whole(value: Any) -> Any:
    """A tensor as a whole: a DTensor gathered (a collective: every process calls it), else itself."""
    return value.full_tensor() if is_dtensor(value) else value


def place_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every process) laid out like ``like``: this process's
    slice when ``like`` is sharded, cut locally without communication."""
    if not is_dtensor(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


@contextmanager
def gathered(model: torch.nn.Module, trainable_only: bool, keep: bool) -> Iterator[None]:
    """Every sharded parameter of ``model`` (``trainable_only``: the trained ones) as a whole tensor
    while the block runs, the sharded ones back afterwards. Every process enters (the gathering is
    collective); ``keep`` says whether this process keeps the whole tensors (in host memory, for
    the main process to write) or only takes part in gathering them."""
    if not is_sharded(model):
        yield
        return
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if not is_dtensor(param) or (trainable_only and not param.requires_grad):
                    continue
                value = param.detach().full_tensor()
                if not keep:
                    continue
                plain = torch.nn.Parameter(value.to("cpu"), requires_grad=param.requires_grad)
                swapped.append((module, name, param))
                module._parameters[name] = plain  # noqa: SLF001 - FSDP2 registers its DTensors the same way
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param  # noqa: SLF001


def process_group_timeout(seconds: int) -> Any:
    """accelerate's kwargs handler that sets how long a collective may wait for the other processes."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))
