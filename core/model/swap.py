"""Block swap (``blocks_to_swap: N``): the frozen base weights of the denoiser's last N transformer
blocks live in host memory and are copied to the device just before the block runs, in forward
and again, in reverse order, in backward. LoRA weights, their gradients and the optimizer state
never leave the device; nothing is copied back (the base is frozen).

Why not diffusers' group offloading (``diffusers/hooks/group_offloading.py``): it is built for
inference. Its hooks onload a group in the forward pre-hook and offload it in the forward post-hook;
nothing brings the weights back for backward. Without checkpointing autograd then reads the
offloaded weights when it computes the input gradients: on a GPU (H200, 2026-12-04,
``benchmarks/gpu.py --group-offload-check``) that backward failed ("weight is on cpu, different
from other tensors on cuda:0" in ``_fused_rms_norm_backward``). With diffusers' own checkpointing
it worked (the recomputation calls the block's ``__call__``, hooks included; gradients equal), but
tuner checkpoints by wrapping ``forward`` (diffusers' checkpointing drops Chroma's attention mask:
``tuner.core.fixes``), whose recomputation runs no hook; and its ``.data`` swaps would not free
quantized weights (below). So the mover is here, in one module, with the one extra event training
needs: "the block's backward begins", a node on the block's outputs whose backward brings the
weights in again.

How a weight moves: the bytes of each storage a swapped block's frozen weights live in (a
quantized weight's inner tensors each have one) get a host copy, pinned when the device is CUDA;
swapped out, the storage on the device is resized to nothing in place, and brought in, resized
back and filled from the host copy. Working on the storages rather than swapping ``.data`` is what
frees the memory for every kind of weight: optimum-quanto's weights (int8, int4, fp8) keep their
inner tensors as attributes that a ``.data`` swap leaves in place, and bitsandbytes' NF4 autograd
function keeps the packed weight for backward in ``ctx.tensors``, out of reach of checkpointing's
hooks (both measured on a GPU: swapping half the blocks then saved nothing). Every such reference
sees the storage empty meanwhile and full again in backward. A bitsandbytes ``quant_state`` (the
double-quantized block scales, about 3% of NF4's bytes) stays on the device. On a CPU run the
device copy is a second copy in RAM, so the CPU tests run exactly the code path of a GPU run and
prove the residency: a block computes only with its weights brought in (reading an emptied
storage raises). On CUDA the copy of the next block runs on a side stream while the current block
computes, and the compute stream waits on an event before it reads the block. At most two swapped
blocks are resident at a time: the one computing and the one being prefetched.

What reads base weight values outside a forward (a DoRA's export and self-test, through
:func:`tuner.core.model.adapters.base_weight`) brings in the one block it reads
(:func:`block_in_place`); LoRA, LoKr and LoHa files need the weights' shapes only, which an
emptied storage keeps. A save never holds more than one swapped block beyond the run's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tuner.core.errors import ConfigError
from tuner.core.model.quantize import stored, wrapper_subclass


def repeated_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks in the order they run (the classes the model lists in ``_repeated_blocks``)."""
    classes = set(getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or [])
    return [(name, module) for name, module in model.named_modules() if type(module).__name__ in classes]


def _frozen_tensors(block: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in block.parameters() if not p.requires_grad]


class _BackwardBegins(torch.autograd.Function):
    """Identity on a block's output; its backward runs first in the block's backward: the weights come in."""

    @staticmethod
    def forward(ctx: Any, swapper: BlockSwap, index: int, tensor: torch.Tensor) -> torch.Tensor:
        ctx.swapper, ctx.index = swapper, index
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        ctx.swapper.backward_begins(ctx.index)
        return None, None, grad


class BlockSwap:
    """Swaps the frozen weights of ``blocks`` (in run order) between host memory and ``device``."""

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device | str):
        self.device = torch.empty(0, device=device).device  # cpu:0 is cpu; cuda is cuda:N
        self.blocks = blocks
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        # per block: each storage its frozen weights live in (a quantized weight's inner tensors
        # each have one), as a byte view on the device beside its host copy
        self.host: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self.resident: set[int] = set()
        self.ready: dict[int, Any] = {}  # index -> the CUDA event its copy recorded
        self.in_backward: int | None = None  # the block whose backward runs (its recomputation keeps it)
        self.held: set[int] = set()  # kept in place meanwhile (validation swapping fewer blocks)
        self.pinned = True
        for index, block in enumerate(blocks):
            self.host.append(self._take_over(block))
            self.resident.add(index)
            self.release(index)
            for module in block.modules():  # found by block_in_place (a base weight read outside a forward)
                module.tuner_swapped_block = (self, index)
            block.register_forward_pre_hook(self._before_forward(index))
            block.register_forward_hook(self._after_forward(index))

    # -- moving ---------------------------------------------------------------------------------

    def _take_over(self, block: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The block's frozen weights on the device (one block at a time passes through it), each
        storage in sole use of its tensors, and a host copy of each storage's bytes."""
        pairs, seen = [], set()
        for param in _frozen_tensors(block):
            if wrapper_subclass(param.data):  # its inner tensors are attributes that .data leaves be
                if param.device != self.device:
                    raise ConfigError(
                        f"blocks_to_swap: a quantized weight ({type(param.data).__name__}) is on {param.device}, "
                        f"not {self.device}; quantize on the device before swapping (load_quantized does)"
                    )
                _own_inner_tensors(param)
            elif param.device != self.device or not _owns_storage(param.data):
                param.data = param.data.to(self.device, copy=True)  # a storage of its own, resizable
            for tensor in stored(param.data):
                storage = tensor.untyped_storage()
                if storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                on_device = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)
                pairs.append((on_device, self._host_copy(on_device)))
        return pairs

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.cuda and self.pinned:
            try:
                return tensor.to("cpu", copy=True).pin_memory()
            except RuntimeError:  # pinning refused (locked-memory limit): unpinned copies still work, slower
                self.pinned = False
        return tensor.to("cpu", copy=True)  # on a CPU too: the device's bytes are freed below

    def bring_in(self, index: int, prefetch: bool = False) -> None:
        if index in self.resident:
            return
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                for on_device, host in self.host[index]:
                    on_device.untyped_storage().resize_(host.numel())
                    on_device.copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.ready[index] = event
        else:  # the same steps as on a GPU
            for on_device, host in self.host[index]:
                on_device.untyped_storage().resize_(host.numel())
                on_device.copy_(host)
        self.resident.add(index)
        if not prefetch:
            self._wait(index)

    def _wait(self, index: int) -> None:
        event = self.ready.pop(index, None)
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for on_device, _ in self.host[index]:
            on_device.record_stream(compute)  # freed only once compute is done with it

    def release(self, index: int) -> None:
        """Free the block's weight bytes in place: every tensor viewing them (the parameters, and
        whatever a library's autograd function kept of them for backward) reads nothing meanwhile."""
        if index not in self.resident or index in self.held:
            return
        for on_device, _ in self.host[index]:
            on_device.untyped_storage().resize_(0)
        self.resident.discard(index)
        self.ready.pop(index, None)

    def _use(self, index: int, following: int | None) -> None:
        """Block ``index`` computes now: bring it in, let go of the others, start copying ``following``."""
        self.bring_in(index)
        self._wait(index)
        for other in list(self.resident):
            if other not in (index, following):
                self.release(other)
        if following is not None and 0 <= following < len(self.blocks):
            self.bring_in(following, prefetch=True)

    # -- hooks ----------------------------------------------------------------------------------

    def _before_forward(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self._use(index, index + 1 if self.in_backward is None else None)

        return hook

    def _after_forward(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if self.in_backward == index:
                return None  # its recomputation in backward: it computes on
            self.release(index)
            if not torch.is_grad_enabled():
                return None
            return _mark_outputs(output, self, index)

        return hook

    def backward_begins(self, index: int) -> None:
        if self.in_backward is None:  # the first swapped block of this backward pass
            # autograd's own end-of-backward callback (what torch's FSDP uses): every block is let go
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)  # noqa: SLF001
        self.in_backward = index
        self._use(index, index - 1)

    def _backward_ends(self) -> None:
        self.in_backward = None
        for index in list(self.resident):
            self.release(index)

    @contextmanager
    def holding(self, count: int) -> Iterator[None]:
        """The first ``count`` swapped blocks stay in place meanwhile: validation during a run swaps
        only ``validation_blocks_to_swap`` of the run's ``blocks_to_swap`` (inference holds no
        gradients, so it often has room for more)."""
        indices = set(range(min(max(count, 0), len(self.blocks)))) - self.held
        for index in sorted(indices):
            self.bring_in(index)
        self.held |= indices
        try:
            yield
        finally:
            self.held -= indices
            for index in indices:
                self.release(index)

    def resident_bytes(self) -> int:
        """Bytes of swapped blocks' weights on the device now (measured on the storages themselves)."""
        return sum(on_device.untyped_storage().nbytes() for block in self.host for on_device, _ in block)


def _own_inner_tensors(holder: torch.Tensor) -> None:
    """Give each inner tensor of a wrapper subclass (``__tensor_flatten__``'s attributes) memory of
    its own where it is a view into a larger buffer (optimum-quanto's int8 weights on CUDA are:
    the GPU machine refused them before this), so freeing it frees exactly its bytes."""
    names, _ = holder.__tensor_flatten__()
    for name in names:
        inner = getattr(holder, name)
        if wrapper_subclass(inner):
            _own_inner_tensors(inner)
        elif not _owns_storage(inner):
            setattr(holder, name, inner.clone(memory_format=torch.contiguous_format))


def _owns_storage(tensor: torch.Tensor) -> bool:
    """Whether each storage ``tensor`` is kept in holds it alone, whole and can be resized (a view into
    a larger buffer or a memory-mapped file cannot be freed in place)."""
    return all(
        t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        and t.untyped_storage().resizable()
        for t in stored(tensor)
    )


def _mark_outputs(output: Any, swapper: BlockSwap, index: int) -> Any:
    if isinstance(output, torch.Tensor):
        return _BackwardBegins.apply(swapper, index, output) if output.requires_grad else output
    if isinstance(output, tuple):
        return tuple(_mark_outputs(o, swapper, index) for o in output)
    if isinstance(output, list):
        return [_mark_outputs(o, swapper, index) for o in output]
    return output


def swap_blocks(model: torch.nn.Module, count: int, device: torch.device | str, key: Any = None) -> BlockSwap | None:
    """Swap the last ``count`` blocks of ``model`` (before the model is moved to ``device``: their
    weights then never all sit on the device at once). ``key`` raises the config's error."""
    if count <= 0:
        return None
    blocks = [module for _, module in repeated_blocks(model)]
    if count > len(blocks):
        message = f"{count} is more than the {len(blocks)} transformer blocks of this model; use at most {len(blocks)}"
        raise key("blocks_to_swap", message) if key is not None else ConfigError(f"blocks_to_swap: {message}")
    swapped = blocks[len(blocks) - count :]
    # DDP must neither broadcast nor check them (their storage moves every step): ignored by name,
    # through DDP's own static setter (what its documentation points to for this)
    ids = {id(p) for block in swapped for p in _frozen_tensors(block)}
    names = [name for name, p in model.named_parameters() if id(p) in ids]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)  # noqa: SLF001
    swapper = BlockSwap(swapped, device)
    model.tuner_block_swap = swapper  # found by move_unswapped
    return swapper


def move_unswapped(model: torch.nn.Module, device: torch.device | str) -> None:
    """``model.to(device)`` for everything but the swapped blocks' frozen weights, which are on the
    device already with their storages emptied: ``Module.to`` would copy them (it copies even to the
    same device named otherwise, ``cpu:0`` for ``cpu`` as accelerate names a process's CPU), and a
    copy of an emptied storage reads freed memory."""
    swapper = getattr(model, "tuner_block_swap", None)
    if swapper is None:
        model.to(device)
        return
    target = torch.empty(0, device=device).device  # "cpu:0" is "cpu", "cuda" the current cuda:N
    swapped = {id(p) for block in swapper.blocks for p in _frozen_tensors(block)}

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if id(tensor) in swapped or tensor.device == target else tensor.to(target)

    # Module.to is _apply with a conversion; with this one, torch's own handling of parameters
    # (tensor subclasses, gradients, identity kept) applies to everything else
    model._apply(moved)  # noqa: SLF001


@contextmanager
def block_in_place(module: torch.nn.Module) -> Iterator[None]:
    """``module``'s weights readable outside its block's forward (an export reading a DoRA layer's
    base weight): when it lies in a swapped block, that block alone is brought in meanwhile, so a
    save reads the base one block at a time. A no-op for every other module."""
    where = getattr(module, "tuner_swapped_block", None)
    if where is None:
        yield
        return
    swapper, index = where
    was_resident = index in swapper.resident
    swapper.bring_in(index)
    try:
        yield
    finally:
        if not was_resident:
            swapper.release(index)
