"""Counting live tensor bytes: :class:`LiveBytes` sees every tensor an operator makes (real or
fake), and :func:`keep_input` makes a layer hold its input for backward as a quantized backend's
autograd function does, so the count includes it."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tuner.core.model.activations import Copies
from tuner.core.model.quantize import stored


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive: those registered with :meth:`track` and every
    output of an operator run inside the mode. A storage counts until it is freed, once however
    many tensors view it. Works on real and fake tensors alike."""

    def __init__(self, stored_tensors: Callable[[torch.Tensor], list[torch.Tensor]] | None = None) -> None:
        super().__init__()
        self._alive: dict[int, weakref.ref] = {}
        self._sizes: dict[int, int] = {}
        self._stored_tensors = stored_tensors  # what a precision keeps beside a quantized weight
        self.current = 0
        self.peak = 0
        self._paused = 0

    def track(self, *objects: Any) -> int:
        """Count these tensors (modules: their parameters and buffers); returns the bytes added."""
        added = 0
        for obj in tree_leaves(list(objects)):
            if isinstance(obj, torch.nn.Module):
                added += self.track(*obj.parameters(), *obj.buffers())
            elif isinstance(obj, torch.Tensor):
                for tensor in stored(obj, self._stored_tensors):
                    added += self._add(tensor.untyped_storage())
        return added

    def untrack(self, *tensors: torch.Tensor) -> None:
        """Stop counting these tensors' storages although they live on (weights moved off the
        device again after one layer's run, as accelerate's sequential offload does)."""
        for tensor in tensors:
            for part in stored(tensor, self._stored_tensors):
                self._free(id(part.untyped_storage()))

    def reset_peak(self) -> None:
        self.peak = self.current

    def add_bytes(self, size: int) -> None:
        """Count bytes measured elsewhere as alive from now on (an optimizer's state measured on
        real tensors when it cannot step on fake ones)."""
        self.current += size
        self.peak = max(self.peak, self.current)

    def _add(self, storage: torch.UntypedStorage) -> int:
        key = id(storage)
        if key in self._alive and self._alive[key]() is storage:
            return 0
        size = storage.nbytes()
        self._alive[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self._sizes[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        return size

    def _free(self, key: int) -> None:
        if self._alive.pop(key, None) is not None:
            self.current -= self._sizes.pop(key)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Operators run meanwhile make tensors that are not counted (copies kept in host memory)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._paused:
            self.track(out)
        return out


class CountedCopies(Copies):
    """Activation offload as the estimate counts it: a host copy leaves the device count and joins
    the host's (until it is freed); a copy back is a new device tensor."""

    def __init__(self, live: LiveBytes) -> None:
        super().__init__()
        self.live = live
        self.host_current = 0
        self.host_peak = 0

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.live.paused():
            host = tensor.detach().clone()
        size = host.numel() * host.element_size()
        self.host_current += size
        self.host_peak = max(self.host_peak, self.host_current)
        weakref.finalize(host, self._freed, size)
        return host

    def _freed(self, size: int) -> None:
        self.host_current -= size

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return host.clone()


class _SavedInput(torch.autograd.Function):
    """Passes ``output`` through, keeping ``inputs`` until the backward pass reaches it."""

    @staticmethod
    def forward(ctx, inputs, output):
        ctx.save_for_backward(inputs)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def keep_input(module, args, output):
    """Forward hook: the layer keeps its input for backward, as a quantized backend's autograd
    function does even when the weight is frozen."""
    inputs = args[0] if args else None
    if isinstance(inputs, torch.Tensor) and torch.is_grad_enabled() and (inputs.requires_grad or output.requires_grad):
        return _SavedInput.apply(inputs, output)
    return output
