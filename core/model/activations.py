"""Activation offload (``activation_offload: true``): what backward needs from each transformer
block waits in host memory instead of on the device.

* A checkpointed block keeps only its inputs for backward (torch's non-reentrant checkpoint holds
  them in the closure that recomputes the block, out of reach of ``saved_tensors_hooks``). Here
  the inputs that carry gradients (the hidden states flowing from block to block) go to the block
  wrapped in a :class:`_Stash`: the forward takes the device tensor itself out of it (so the graph
  is connected as usual) and leaves only the host copy behind; the recomputation in backward
  takes a fresh device copy of the host one. Inputs that carry no gradient (the time embedding,
  rotary tables, masks) are shared by every block and stay where they are.
* A block without checkpointing keeps every tensor its operators save: a ``saved_tensors_hooks``
  pair around its forward packs each to host memory and unpacks it to the device in backward.
  Parameters stay as they are (the weights are on the device anyway, and a swapped block's
  weights follow :mod:`tuner.core.model.swap`).

On CUDA the host copies are pinned and made without blocking, ordered on the compute stream
before the device memory is reused. How tensors move (:class:`Copies`) is a seam: the estimate
substitutes copies it counts, so what ``tuner estimate`` counts is what the run moves.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from tuner.core.model.quantize import wrapper_subclass
from tuner.core.model.swap import repeated_blocks


class Copies:
    """Moves an activation to host memory and back."""

    def __init__(self) -> None:
        self.pinned = True

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.device.type == "cpu":
            return tensor
        if self.pinned:
            try:  # torch's caching host allocator reuses the pinned pages step after step
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                return host.copy_(tensor, non_blocking=True)
            except RuntimeError:  # pinning refused (locked-memory limit): unpinned, slower
                self.pinned = False
        return tensor.to("cpu")

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return host.to(device, non_blocking=True)


_copies: ContextVar[Copies] = ContextVar("activation_copies", default=Copies())  # noqa: B039


@contextmanager
def copies_by(copies: Copies) -> Iterator[None]:
    """Activations move through ``copies`` meanwhile (the estimate's counted copies)."""
    token = _copies.set(copies)
    try:
        yield
    finally:
        _copies.reset(token)


class _Stash:
    """A block input on its way to host memory: not a tensor, so the checkpoint's closure holds this
    (and, after the forward, only the host copy), never the device tensor."""

    def __init__(self, tensor: torch.Tensor, copies: Copies):
        self.device_tensor: torch.Tensor | None = tensor
        self.device = tensor.device
        self.requires_grad = tensor.requires_grad
        self.copies = copies
        self.host = copies.to_host(tensor)

    def take(self) -> torch.Tensor:
        if self.device_tensor is not None:  # the forward: the tensor itself, its graph intact
            tensor, self.device_tensor = self.device_tensor, None
            return tensor
        # the recomputation in backward: equal values; requiring grad as before, so the recomputed
        # operators save what the first forward saved
        return self.copies.to_device(self.host, self.device).requires_grad_(self.requires_grad)


def _taken(value: Any) -> Any:
    return value.take() if isinstance(value, _Stash) else value


def _stashed_call(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return forward(*map(_taken, args), **{k: _taken(v) for k, v in kwargs.items()})


def _offloaded_checkpointed_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    copies = _copies.get()

    def stash(value: Any) -> Any:
        carries = isinstance(value, torch.Tensor) and value.requires_grad
        return _Stash(value, copies) if carries else value

    args = tuple(map(stash, args))
    kwargs = {k: stash(v) for k, v in kwargs.items()}
    return checkpoint(functools.partial(_stashed_call, forward), *args, use_reentrant=False, **kwargs)


def _offloaded_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    copies = _copies.get()

    def pack(tensor: torch.Tensor) -> Any:
        if isinstance(tensor, torch.nn.Parameter) or wrapper_subclass(tensor):
            return tensor  # weights (and quantized weights) stay where they live
        return tensor.device, copies.to_host(tensor)

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return copies.to_device(host, device)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return forward(*args, **kwargs)


def offload_activations(model: torch.nn.Module) -> int:
    """Keep what each transformer block of ``model`` saves for backward in host memory (after
    :func:`tuner.core.fixes.checkpoint_blocks`, when checkpointing); returns how many blocks."""
    blocks = [block for _, block in repeated_blocks(model) if not getattr(block, "tuner_offloaded", False)]
    for block in blocks:
        checkpointed = getattr(block, "tuner_checkpointed", None)
        if checkpointed:  # the block's own forward, inside a checkpoint that holds host copies
            block.forward = functools.partial(_offloaded_checkpointed_forward, block.tuner_forward)
        else:
            block.forward = functools.partial(_offloaded_forward, block.forward)
        block.tuner_offloaded = True
    return len(blocks)
