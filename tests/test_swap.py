"""Block swap on the CPU, through the code path a GPU run takes: a swapped weight is an empty
placeholder until its block runs, so any compute that read it anyway would fail; under that,
swapped blocks train bit for bit what resident ones train, with and without checkpointing, and
never more than two swapped blocks (the one computing, the one being copied in) hold weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tuner.core.errors import ConfigError
from tuner.core.fixes import checkpoint_blocks
from tuner.core.model.quantize import stored
from tuner.core.model.swap import swap_blocks

from .conftest import base_settings, train


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(8, 8)
        self.adapter = torch.nn.Linear(8, 8, bias=False)  # trainable, as a LoRA: never swapped

    def forward(self, x):
        return torch.tanh(self.frozen(x)) + self.adapter(x)


class Net(torch.nn.Module):
    _repeated_blocks = ["Block"]

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(5))
        for block in self.blocks:
            block.frozen.requires_grad_(False)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def resident(net):
    """The blocks whose frozen weight has its bytes on the device (a quantized one: its inner tensors)."""
    return [i for i, b in enumerate(net.blocks) if all(t.untyped_storage().nbytes() for t in stored(b.frozen.weight))]


def quantized(net, precision):
    """``net`` with its frozen layers quantized as the precision plugins quantize them."""
    if precision == "int8-quanto":
        from optimum.quanto import freeze, qint8, quantize

        quantize(net, weights=qint8, include="*frozen")
        freeze(net)
    elif precision == "nf4-bnb":
        from tuner.plugins.quant_nf4.quantizer import quantize

        for block in net.blocks:
            quantize(block, "frozen", [])
    for block in net.blocks:  # as a run freezes its base after loading it
        block.frozen.requires_grad_(False)
    return net


@pytest.mark.parametrize(
    ("checkpointing", "precision"), [(False, None), (True, None), (True, "int8-quanto"), (False, "nf4-bnb")]
)
def test_swapped_blocks_give_the_same_gradients_holding_at_most_two_blocks(checkpointing, precision):
    torch.manual_seed(0)
    plain = Net()
    swapped = Net()
    swapped.load_state_dict(plain.state_dict())
    plain, swapped = quantized(plain, precision), quantized(swapped, precision)
    if checkpointing:
        checkpoint_blocks(plain), checkpoint_blocks(swapped)
    swapper = swap_blocks(swapped, 4, "cpu")  # the last four of five
    assert resident(swapped) == [0]  # swapped out until they run
    seen = []
    for index, block in enumerate(swapped.blocks):  # registered after the swapper's: the block is in
        block.register_forward_pre_hook(lambda m, a, i=index: seen.append(("forward", i, resident(swapped))))
        block.frozen.register_full_backward_pre_hook(
            lambda m, g, i=index: seen.append(("backward", i, resident(swapped)))
        )
    x = torch.randn(3, 8)
    for _ in range(2):  # a second step after a backward starts from the same state
        for net in (plain, swapped):
            net.zero_grad()
            net(x).backward()
        for (name, a), b in zip(plain.named_parameters(), swapped.parameters(), strict=True):
            if a.requires_grad:
                assert torch.equal(a.grad, b.grad), name
    assert resident(swapped) == [0] and swapper.resident_bytes() == 0  # all let go after backward
    for phase, index, held in seen:
        swapped_held = [i for i in held if i > 0]
        assert index in held and len(swapped_held) <= 2, (phase, index, held)
    # in backward, in reverse (block 0's Linear sees no gradient: nothing before it is trained)
    order = [("forward", i) for i in range(5)] + [("backward", i) for i in (4, 3, 2, 1)]
    assert [(p, i) for p, i, _ in seen[:9]] == order
    # a swapped Linear called around its block's hooks reads emptied bytes: torch raises; quanto's and
    # bitsandbytes' CPU kernels read the pointer unchecked and crash the process, so for them the
    # equal gradients above are the proof that nothing read a weight that was not brought in
    if precision is None:
        with pytest.raises(RuntimeError):
            swapped.blocks[3].frozen(x)
    ignored = set(swapped._ddp_params_and_buffers_to_ignore)  # DDP neither broadcasts nor checks them
    assert ignored == {f"blocks.{i}.frozen.{kind}" for i in range(1, 5) for kind in ("weight", "bias")}
    if precision:  # the stored form moved: quanto's inner tensors, NF4's packed bytes (quant_state stays)
        kind = {"int8-quanto": "WeightQBytesTensor", "nf4-bnb": "Params4bit"}[precision]
        weight = swapped.blocks[3].frozen.weight
        assert kind in (type(weight).__name__, type(weight.data).__name__)
        with swapper.holding(len(swapper.blocks)):
            moved = swapper.resident_bytes()
        floats = sum((b.frozen.in_features + 1) * b.frozen.out_features * 4 for b in swapped.blocks[1:])
        assert 0 < moved < floats * (0.5 if precision == "int8-quanto" else 0.3)
    assert swapper.resident_bytes() == 0


def test_blocks_to_swap_beyond_the_model_is_one_line():
    with pytest.raises(
        ConfigError, match=r"^blocks_to_swap: 6 is more than the 5 transformer blocks of this model; use at most 5$"
    ):
        swap_blocks(Net(), 6, "cpu")


@pytest.mark.parametrize(
    ("checkpointing", "precision", "offload"),
    [(False, "no_change", False), (True, "no_change", True), (True, "int8-quanto", False), (False, "nf4-bnb", True)],
)
def test_a_run_with_swapped_blocks_trains_bit_for_bit_what_a_resident_run_trains(
    tiny_chroma, shapes_dir, tmp_path, checkpointing, precision, offload
):
    """Quantized bases move as stored (quanto's subclass whole, NF4's packed bytes with its
    quant_state kept in place): a placeholder in their place fails as loudly as a float one. With
    ``activation_offload`` on top, what the blocks save for backward goes through host copies."""

    def settings(name, **extra):
        return {
            **base_settings(tiny_chroma, shapes_dir, tmp_path / name),
            "max_train_steps": 3,
            "learning_rate": 1e-2,
            "train_batch_size": 2,
            "gradient_checkpointing": checkpointing,
            "base_model_precision": precision,
            **extra,
        }

    plain, _, _ = train(settings("plain"))
    warnings: list[str] = []
    swapped, _, _ = train(
        settings("swapped", blocks_to_swap=3, memory_budget="12GiB", activation_offload=offload), warnings=warnings
    )
    assert swapped.losses == plain.losses
    a, b = load_file(plain.lora_files[0]), load_file(swapped.lora_files[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("blocks_to_swap: on a CPU the weights stay in RAM" in w for w in warnings)
    assert any("memory_budget: on a CPU the weights stay in RAM whatever the plan" in w for w in warnings)
    assert any("activation_offload: on a CPU" in w for w in warnings) == offload


def test_the_estimate_counts_swapped_blocks_two_at_a_time_on_the_device_and_all_in_ram(
    tiny_chroma, shapes_dir, tmp_path
):
    from tuner.core.estimate import estimate
    from tuner.core.estimate.trace import tensor_bytes
    from tuner.core.model.swap import repeated_blocks

    from .conftest import make_config, make_host

    host = make_host()

    def train_phase(**extra):  # device bytes, and RAM over the load phase's (the process's own size apart)
        config = make_config(host, {**base_settings(tiny_chroma, shapes_dir, tmp_path), **extra})
        found = estimate(host, config, "cuda")
        return found.phase("train").device, found.phase("train").ram - found.phase("load").ram

    model = host.provide("load_model", config=make_config(host, base_settings(tiny_chroma, shapes_dir, tmp_path)),
                         component="transformer", dtype=torch.float32)  # fmt: skip
    sizes = [tensor_bytes(block.parameters()) for _, block in repeated_blocks(model)]
    (plain, plain_ram), (swapped, swapped_ram) = train_phase(), train_phase(blocks_to_swap=3)
    assert plain - swapped == sum(sizes) - sum(sorted(sizes)[-2:])  # all but the two largest leave the device
    assert swapped_ram - plain_ram == sum(sizes)  # for their host copies
    with pytest.raises(ConfigError, match="blocks_to_swap: 4 is more than the 3 transformer blocks"):
        train_phase(blocks_to_swap=4)


def test_a_resume_with_swapped_blocks_is_exact(tiny_chroma, shapes_dir, tmp_path):
    from .test_resume import assert_resume_is_exact, settings_for

    assert_resume_is_exact(
        settings_for(tiny_chroma, shapes_dir, tmp_path / "a", max_train_steps=6, blocks_to_swap=2), 3
    )


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_adapters_that_read_the_base_weight_save_and_self_test_with_swapped_blocks(
    tiny_chroma, shapes_dir, tmp_path, kind
):
    """DoRA reads the base weight and LoKr/LoHa its shape when the files are written and self-tested:
    DoRA's reads bring in one swapped block at a time (never the whole base, as a save on a small
    card could not hold it), LoKr's none, and the saved files reload as trained."""
    from tuner.core.model.swap import BlockSwap

    most = []
    bring_in = BlockSwap.bring_in

    def counted(self, index, prefetch=False):
        bring_in(self, index, prefetch)
        most.append(len(self.resident))

    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "max_train_steps": 2, "lora_type": kind}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlockSwap, "bring_in", counted)
        result, _, _ = train({**settings, "blocks_to_swap": 3, "lora_format": "all"})
    assert result.lora_files  # written, reread by each format's reader and compared: the self-test passed
    assert max(most) <= 2  # the one computing and the one copied in, or the one a save reads


def test_a_quantized_weight_viewing_a_larger_buffer_gets_memory_of_its_own_and_is_freed():
    """optimum-quanto's int8 weights on CUDA keep an inner tensor as a view into a larger buffer (the
    GPU machine refused to swap them): its bytes are copied out first, so freeing them frees them alone."""
    torch.manual_seed(0)
    net = quantized(Net(), "int8-quanto")
    weight = net.blocks[3].frozen.weight
    buffer = torch.zeros(32, 1, dtype=weight._scale.dtype)
    buffer[8:16] = weight._scale
    weight._scale = buffer[8:16]
    x = torch.randn(3, 8)
    expected = net(x)
    swap_blocks(net, 4, "cpu")
    assert buffer.untyped_storage().nbytes() == 128  # the buffer is left whole
    assert weight._scale.untyped_storage().nbytes() == 0 and weight._data.untyped_storage().nbytes() == 0
    assert torch.equal(net(x), expected)


def test_validation_during_a_run_swaps_validation_blocks_to_swap_and_renders_the_same(
    tiny_chroma, shapes_dir, tmp_path
):
    """``validation_blocks_to_swap: 1`` of ``blocks_to_swap: 3``: validation keeps two blocks in place
    while it renders (the same images as swapping all three), training swaps three again after it;
    the estimate's validation phase holds those two more blocks, its training phase does not."""
    from PIL import Image

    from tuner.core.estimate import estimate
    from tuner.core.model.swap import BlockSwap

    from .conftest import make_config, make_host

    held = []
    holding = BlockSwap.holding

    def recorded(self, count):
        held.append(count)
        return holding(self, count)

    def settings(name, **extra):
        return {
            **base_settings(tiny_chroma, shapes_dir, tmp_path / name),
            "max_train_steps": 2,
            "blocks_to_swap": 3,
            "validation_prompts": ["a red circle"],
            "validation_num_inference_steps": 2,
            **extra,
        }

    full, _, _ = train(settings("full"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlockSwap, "holding", recorded)
        fewer, _, _ = train(settings("fewer", validation_blocks_to_swap=1))
    assert held == [2] and fewer.losses == full.losses
    images = [sorted(d.glob("*.png")) for d in (full.validation_dirs[-1], fewer.validation_dirs[-1])]
    assert len(images[0]) == len(images[1]) > 0
    for a, b in zip(*images, strict=True):
        assert Image.open(a).tobytes() == Image.open(b).tobytes()
    host = make_host()

    def phases(**extra):
        found = estimate(host, make_config(host, settings("estimate", **extra)), "cuda")
        return found.phase("train").device, found.phase("validate").device

    (train_all, validate_all), (train_fewer, validate_fewer) = phases(), phases(validation_blocks_to_swap=1)
    assert train_fewer == train_all and validate_fewer > validate_all
