"""FSDP2 (``fsdp_enable``) on CPU processes over gloo: the code path GPUs run, since tuner calls
``fully_shard`` itself. Two launchers meeting on 127.0.0.1 (two "machines" of one process each)
train what one process trains with twice the batch; a 2-process run killed with SIGKILL resumes
bit for bit, and its sharded (DCP) checkpoint resumes in one process with twice the batch. Every launch has a 60 s process
group timeout: a hang fails the test instead of blocking CI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO, base_settings, make_config, make_host, train
from .test_multiprocess import free_port

FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors")


def settings(tiny_chroma, shapes_dir, folder, batch, **extra):
    return {
        **base_settings(tiny_chroma, shapes_dir, folder),
        "cache_dir": str(folder.parent / "cache"),  # one cache for every run of the module
        "fsdp_enable": True,
        "process_group_timeout": 60,
        "train_batch_size": batch,
        "gradient_accumulation_steps": 2,
        "gradient_checkpointing": True,  # recomputation inside a sharded block
        "learning_rate": 5e-3,
        "lr_scheduler": "constant",  # a killed run of 400 steps and one of 4 share a schedule
        "use_ema": True,
        "ema_decay": 0.7,
        "checkpointing_steps": 2,
        "validation_prompts": ["a red circle"],  # the final validation: every process renders
        "validation_num_inference_steps": 2,
        **extra,
    }


def torchrun(config_file, nodes: int, per_node: int, port: int, node_rank: int = 0, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        *(sys.executable, "-m", "torch.distributed.run"),
        *("--nnodes", str(nodes), "--node-rank", str(node_rank), "--nproc-per-node", str(per_node)),
        *("--master-addr", "127.0.0.1", "--master-port", str(port)),
        *("-m", "tuner.core.cli", "run", "--plugin", "chroma", "--config", str(config_file)),
    ]
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, **popen)


def write_config(folder, values):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json.yaml"
    path.write_text(json.dumps(values))
    return path


def assert_same(a_dir, b_dir, exact: bool):
    for name in FILES:
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            if exact:
                assert torch.equal(a[key], b[key]), f"{name}: {key}"
            else:
                torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def two_machines(tiny_chroma, shapes_dir, tmp_path_factory):
    """A 4-step LoRA run in two launchers (torchrun --nnodes 2, one process each) on this machine."""
    root = tmp_path_factory.mktemp("fsdp")
    values = settings(tiny_chroma, shapes_dir, root / "nodes", batch=2)
    config_file = write_config(root / "configs", values)
    port = free_port()
    launchers = [
        torchrun(config_file, 2, 1, port, rank, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)
    ]
    outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    for launcher, (_, err) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, err[-3000:]
    return root, values, outputs[0][0]


@pytest.mark.slow
def test_two_machines_train_what_one_process_trains_with_twice_the_batch(two_machines):
    root, values, stdout = two_machines
    out = root / "nodes" / "out"
    assert "FSDP2: 3 blocks and the rest sharded across 2 processes" in stdout
    assert "effective batch 8 (2 processes)" in stdout and stdout.count("\nsaved ") == 1  # the main process writes
    assert sorted(p.name for p in (out / "validation" / "step_000004").iterdir()) == [
        "00.png",
        "grid.png",
        "prompts.txt",
    ]
    shards = sorted(p.name for p in (out / "checkpoint-2" / "sharded").iterdir())
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards)  # one per process
    manifest = json.loads((out / "checkpoint-2" / "manifest.json").read_text())
    assert {f"sharded/{name}" for name in shards} <= set(manifest)  # verified on load like every file

    one = {**values, "train_batch_size": 4, "output_dir": str(root / "one" / "out")}
    warned: list[str] = []
    train(one, warnings=warned)
    assert "fsdp_enable: one process, nothing to shard; training unsharded" in warned
    assert_same(out, root / "one" / "out", exact=False)


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_bit_for_bit_and_in_one_process(two_machines):
    root, values, _ = two_machines
    killed = root / "killed" / "out"
    config_file = write_config(root / "killed", {**values, "output_dir": str(killed), "max_train_steps": 400})
    process = torchrun(config_file, 1, 2, free_port(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint-2").is_dir():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    launcher = psutil.Process(process.pid)
    victims = [*launcher.children(recursive=True), launcher]  # both processes and the launcher, mid-run
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    process.wait()
    for _, later in [(int(p.name.split("-")[1]), p) for p in killed.glob("checkpoint-*")]:
        if later.name != "checkpoint-2":  # the kill lands at an unpredictable step: resume from 2
            shutil.rmtree(later)
    resumed = root / "resumed" / "out"  # its shards read into one unsharded process with twice the batch
    resumed.mkdir(parents=True)
    shutil.copytree(killed / "checkpoint-2", resumed / "checkpoint-2")
    warned: list[str] = []
    one = {**values, "train_batch_size": 4, "output_dir": str(resumed), "resume_from_checkpoint": "latest"}
    result, _, _ = train(one, warnings=warned)
    assert result.resumed_from.name == "checkpoint-2" and result.steps == 4
    assert not [w for w in warned if "samples per micro-step" in w]  # the same global batch: no warning
    assert_same(root / "nodes" / "out", resumed, exact=False)

    config_file = write_config(
        root / "killed", {**values, "output_dir": str(killed), "resume_from_checkpoint": "latest"}
    )
    done = torchrun(config_file, 1, 2, free_port(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout and "checkpoint-2 at step 2" in stdout
    assert_same(root / "nodes" / "out", killed, exact=True)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"base_model_precision": "int8-quanto"}, "base_model_precision"),
        ({"blocks_to_swap": 1}, "blocks_to_swap"),
        ({"lora_type": "dora"}, "lora_type"),
        ({"use_ema": True, "ema_device": "cpu"}, "ema_device"),
    ],
)
def test_what_fsdp_cannot_shard_is_refused_in_one_line(tiny_chroma, shapes_dir, tmp_path, extra, key):
    from tuner.core.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        make_config(make_host(), {**base_settings(tiny_chroma, shapes_dir, tmp_path), "fsdp_enable": True, **extra})
    message = str(refused.value)
    assert message.startswith(f"test.yaml: {key}: ") and "\n" not in message


def test_accelerates_own_fsdp_and_deepspeed_launches_point_to_fsdp_enable(tiny_chroma, shapes_dir, tmp_path):
    from types import SimpleNamespace

    from tuner.core.errors import ConfigError
    from tuner.core.run.trainer import check_launch

    config = make_config(make_host(), base_settings(tiny_chroma, shapes_dir, tmp_path))
    for kind in ("FSDP", "DEEPSPEED"):
        with pytest.raises(ConfigError, match=f"accelerate's {kind} plugin; tuner shards with FSDP2 itself"):
            check_launch(SimpleNamespace(distributed_type=f"DistributedType.{kind}"), config)
    check_launch(SimpleNamespace(distributed_type="DistributedType.MULTI_GPU"), config)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 6)

    def forward(self, x):
        return self.linear(x)


class Tiny(torch.nn.Module):
    _repeated_blocks = ("Block",)

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.out = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.blocks[1](self.blocks[0](x)[:, :4]))


@pytest.fixture
def one_rank_group():
    """A gloo process group of one process in this test's process (torch's fully_shard and DCP
    need one), gone afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def trained_state(model):
    from tuner.core.training.guard import DivergenceGuard
    from tuner.core.training.state import TrainState

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    for _ in range(2):
        model(torch.ones(1, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return TrainState(model, model, optimizer, None, params, ["blocks.0.linear"], DivergenceGuard(3, 2, 0.5))


def test_a_sharded_checkpoint_reads_into_one_unsharded_process_and_a_full_disk_is_one_line(
    one_rank_group, tmp_path, monkeypatch
):
    from types import SimpleNamespace

    import safetensors.torch

    from tuner.core.outputs import checkpoint, sharded
    from tuner.core.training.sharding import is_dtensor, shard

    torch.manual_seed(0)
    model = Tiny()
    assert shard(model, torch.float32, reshard_after_forward=True) == 2
    state = trained_state(model)
    assert all(is_dtensor(p) for p in model.parameters())
    ctx = SimpleNamespace(is_main=True)
    folder = tmp_path / "checkpoint-2"
    sharded.write(ctx, folder, state, {}, {"position": {"step": 2}}, lambda: "checkpoint-1")
    assert checkpoint.verify(folder) is None and sharded.is_sharded_checkpoint(folder)

    torch.manual_seed(1)
    plain = trained_state(Tiny())  # another run, unsharded, with its own optimizer state
    adapter, optimizer, ema = sharded.read(folder, plain)
    ours = {n: p.full_tensor() for n, p in model.named_parameters()}
    assert adapter.keys() == ours.keys() and not ema
    for name, value in adapter.items():
        assert not is_dtensor(value) and torch.equal(value, ours[name])
    saved = {
        k: v.full_tensor() if is_dtensor(v) else v for k, v in checkpoint.optimizer_state(state.optimizer)[0].items()
    }
    assert optimizer.keys() == saved.keys() and all(torch.equal(optimizer[k], saved[k]) for k in saved)

    def disk_full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(checkpoint.DiskFullError) as failed:
        sharded.write(
            ctx,
            tmp_path / "checkpoint-4",
            state,
            {"rng.safetensors": ({"x": torch.ones(1)}, None)},
            {},
            lambda: "checkpoint-2",
        )
    assert "disk full while writing checkpoint-4" in str(failed.value) and "checkpoint-2 is intact" in str(failed.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # no partial folder left


def _round_in_shards(rank: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from tuner.core.training.full import stochastic_round

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        weights = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))  # 7 rows: uneven shards (4 + 3)
        sharded = distribute_tensor(weights, init_device_mesh("cpu", (2,)), [Shard(0)])
        rounded = stochastic_round(sharded, torch.Generator().manual_seed(11)).full_tensor()
        if rank == 0:  # the bits, as a list: a tensor would be shared memory of an ended process
            results.put(rounded.view(torch.int16).tolist())
    finally:
        dist.destroy_process_group()


def test_stochastic_rounding_of_shards_is_the_bits_of_the_whole_tensor():
    """bf16_stochastic_rounding under FSDP2: each process rounds its shard with its slice of the
    noise the whole tensor gets, so two processes round exactly as one does."""
    import torch.multiprocessing as mp

    from tuner.core.training.full import stochastic_round

    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_round_in_shards, args=(free_port(), results), nprocs=2)
    weights = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    whole = stochastic_round(weights, torch.Generator().manual_seed(11))
    assert whole.dtype == torch.bfloat16 and results.get() == whole.view(torch.int16).tolist()


def test_stochastic_rounding_steps_a_sharded_bf16_model_as_an_unsharded_one(one_rank_group):
    """The step of a bf16 shard (an fp32 twin holding its optimizer state, rounded into the
    shard's storage) equals the unsharded step bit for bit, and its fp32 state survives a
    load_state_dict (which casts state to the parameter's dtype)."""
    import copy

    from tuner.core.training.full import enable_stochastic_rounding
    from tuner.core.training.sharding import shard

    torch.manual_seed(0)
    plain = Tiny().to(torch.bfloat16)
    sharded = copy.deepcopy(plain)
    shard(sharded, torch.bfloat16, reshard_after_forward=True)
    optimizers = []
    for model in (sharded, plain):
        optimizers.append(torch.optim.AdamW(model.parameters(), lr=0.01))
        enable_stochastic_rounding(optimizers[-1], seed=5)
    for _ in range(3):
        for model, optimizer in zip((sharded, plain), optimizers, strict=True):
            model(torch.ones(1, 4, dtype=torch.bfloat16)).float().pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, ours), (_, theirs) in zip(sharded.named_parameters(), plain.named_parameters(), strict=True):
        assert ours.dtype == torch.bfloat16 and torch.equal(ours.full_tensor(), theirs), name
    before = {id(p): {k: v.full_tensor() for k, v in s.items() if k != "step"} for p, s in optimizers[0].state.items()}
    optimizers[0].load_state_dict(optimizers[0].state_dict())
    for param, state in optimizers[0].state.items():
        for key, value in state.items():
            if key != "step":
                assert value.dtype == torch.float32 and torch.equal(value.full_tensor(), before[id(param)][key])
