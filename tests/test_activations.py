"""Activation offload (``activation_offload: true``) on the CPU, through a GPU run's code path with
host copies that are real copies: nothing a block saves for backward stays behind on the "device",
gradients are bit for bit those of a run without it (with block swap too), and the estimate moves
the bytes from the device to RAM."""

from __future__ import annotations

import weakref

import pytest
import torch

from tuner.core.fixes import checkpoint_blocks
from tuner.core.model.activations import Copies, copies_by, offload_activations
from tuner.core.model.swap import swap_blocks

from .conftest import base_settings, make_config, make_host
from .test_swap import Net


class CountingCopies(Copies):
    """Host copies in storage of their own (as on a GPU), counted."""

    def __init__(self):
        super().__init__()
        self.to_host_bytes = self.back = 0

    def to_host(self, tensor):
        self.to_host_bytes += tensor.numel() * tensor.element_size()
        return tensor.detach().clone()

    def to_device(self, host, device):
        self.back += 1
        return host.clone()


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("swap", [0, 3])
def test_nothing_a_block_saves_stays_on_the_device_and_gradients_are_unchanged(checkpointing, swap):
    torch.manual_seed(0)
    plain, offloaded = Net(), Net()
    offloaded.load_state_dict(plain.state_dict())
    for net in (plain, offloaded):
        if checkpointing:
            checkpoint_blocks(net)
    assert offload_activations(offloaded) == 5
    swap_blocks(offloaded, swap, "cpu")
    inputs: dict[str, list] = {"plain": [], "offloaded": []}  # weak references to each block's input
    escaped: dict[str, list] = {"plain": [], "offloaded": []}  # tensors saved inside a block, not offloaded
    inside = []

    def entered(name):
        def hook(module, args):
            inputs[name].append(weakref.ref(args[0]))
            inside.append(module)

        return hook

    for name, net in (("plain", plain), ("offloaded", offloaded)):
        for block in net.blocks:
            block.register_forward_pre_hook(entered(name))
            block.register_forward_hook(lambda module, args, output: inside.pop() and None)

    def outer_pack(tensor, name):  # outermost: sees only what no inner hook (offload, checkpoint) took
        on_gradient_path = tensor.requires_grad or tensor.grad_fn is not None  # not x, nor a constant
        if inside and on_gradient_path and not isinstance(tensor, torch.nn.Parameter):
            escaped[name].append(tensor.shape)
        return tensor

    copies = CountingCopies()
    x = torch.randn(3, 8)
    losses = {}
    for name, net in (("plain", plain), ("offloaded", offloaded)):
        with (
            copies_by(copies),
            torch.autograd.graph.saved_tensors_hooks(lambda t, n=name: outer_pack(t, n), lambda t: t),
        ):
            losses[name] = net(x)
        # after the forward: the blocks' device inputs (but the first, the caller's x) are freed when offloaded
        alive = [ref() is not None for ref in inputs[name][1:]]
        if name == "offloaded":
            assert not any(alive)
        elif checkpointing:
            assert all(alive)  # the checkpoint holds them
        losses[name].backward()
    assert not escaped["offloaded"] and escaped["plain"]  # torch 2.13's checkpoint saves its inputs with hooks too
    assert copies.to_host_bytes > 0 and copies.back > 0
    for (name, a), b in zip(plain.named_parameters(), offloaded.parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimate_moves_offloaded_activations_from_the_device_to_ram(
    tiny_chroma, shapes_dir, tmp_path, checkpointing
):
    from tuner.core.estimate import estimate

    host = make_host()

    def train_phase(offload):
        settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "gradient_checkpointing": checkpointing}
        found = estimate(host, make_config(host, {**settings, "activation_offload": offload}), "cuda")
        return found.phase("train").device, found.phase("train").ram - found.phase("load").ram  # RAM: the process apart

    (kept, kept_ram), (offloaded, offloaded_ram) = train_phase(False), train_phase(True)
    moved = offloaded_ram - kept_ram
    # the device saves what RAM takes, at most (a block's own transients stay on the device)
    assert 0 < kept - offloaded <= moved
