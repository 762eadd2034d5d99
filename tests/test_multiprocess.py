"""Two CPU processes (DDP over gloo, launched by accelerate) train what one process does with the
same global batch, on two weighted datasets, one of them with images of three aspect ratios,
caption dropout and the base model's prediction as its target, the other with a loss mask and
several captions per image (every global batch from one dataset and one bucket); only the main
process writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .conftest import REPO

CONFIG = REPO / "examples" / "chroma-tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tiny_chroma, datasets, tmp_path, name, processes, batch, extra=None, own_launcher=False, config=None):
    """One process, or ``processes`` started by accelerate launch (``own_launcher``: by ``tuner run
    --processes``, which goes through accelerate's launcher in-process)."""
    out = tmp_path / name
    launcher = (
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(free_port()),
            "-m",
            "tuner.core.cli",
        ]
        if processes > 1 and not own_launcher
        else [sys.executable, "-m", "tuner.core.cli"]
    )
    settings = {
        "pretrained_model_name_or_path": tiny_chroma,
        "data_dir": "null",
        "datasets": json.dumps(datasets),
        "output_dir": out,
        "cache_dir": tmp_path / "cache",
        "resolution": 64,
        "train_batch_size": batch,
        "max_train_steps": 8,
        "gradient_accumulation_steps": 2,
        "checkpointing_steps": 0,
        "validation_steps": 0,
        "validation_prompts": "[]",
        "learning_rate": 5e-3,
        "mixed_precision": "no",
        # the training methods of #14 keep the promise too: rollouts drawn for the global batch,
        # an EMA per process (the main one saves it)
        "scheduled_sampling_max_step_offset": 2,
        "scheduled_sampling_probability": 0.5,
        "scheduled_sampling_num_inference_steps": 8,
        "use_ema": "true",
        "ema_decay": 0.7,
        **(extra or {}),
    }
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    if processes == 1:  # the reference run: no process boundary to test, so in this process
        from typer.testing import CliRunner

        from tuner.core.cli import app

        done = CliRunner().invoke(app, ["run", "--plugin", "chroma", "--config", str(config or CONFIG), *overrides])
        assert done.exit_code == 0, done.output[-3000:]
        return out, done
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [*launcher, "run", "--plugin", "chroma", "--config", str(config or CONFIG), *overrides]
    if own_launcher and processes > 1:
        command += ["--processes", str(processes)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.mark.slow
# DoRA and LoKr all-reduce their trainable tensors as LoRA does (DDP sees parameters, not adapter
# types): LoRA through accelerate launch, and LoHa with block swap through tuner's own launcher
@pytest.mark.parametrize(("kind", "steps"), [("lora", 8), ("loha", 4)])
def test_two_processes_match_one_with_the_same_global_batch(tiny_chroma, shapes_dir, mixed_dir, tmp_path, kind, steps):
    squares = tmp_path / "squares"  # with a loss mask and a caption file of three captions
    squares.mkdir()
    for file in shapes_dir.iterdir():
        (squares / file.name).write_bytes(file.read_bytes())
    (squares / "00_red_circle.txt").write_text("a red circle\na red ring\na round red shape\n")
    mask = Image.new("L", (128, 128), 255)
    mask.paste(0, (0, 0, 64, 128))
    mask.save(squares / "01_green_circle.mask.png")
    datasets = [
        {"id": "squares", "data_dir": str(squares), "weight": 2},
        # three buckets; caption dropout drawn for the global batch: the same samples either way;
        # trained towards the base model's own prediction (a second forward with the adapter off)
        {"id": "mixed", "data_dir": str(mixed_dir), "aspect_bucket_alignment": 16, "caption_dropout_probability": 0.3,
         "kind": "regularisation", "regularisation_target": "base_model"},
    ]  # fmt: skip
    extra = {"lora_type": kind, "max_train_steps": steps}
    if kind == "loha":  # block swap under DDP: the swapped weights are DDP's ignored parameters
        extra["blocks_to_swap"] = 2
    single, _ = run(tiny_chroma, datasets, tmp_path, "one", processes=1, batch=4, extra=extra)
    own = kind != "lora"  # accelerate launch for one kind, tuner's own --processes for the others
    double, done = run(tiny_chroma, datasets, tmp_path, "two", processes=2, batch=2, extra=extra, own_launcher=own)
    assert "effective batch 8 (2 processes)" in done.stdout
    if own:  # every launcher option given: accelerate warns about none; the settings are said once
        assert "were not passed to `accelerate launch`" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.count("saved ") == 1  # only the main process reports and writes
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        a, b = load_file(single / name), load_file(double / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    losses = [
        [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()]
        for folder in (single, double)
    ]
    assert len(losses[0]) == len(losses[1]) == steps
    rows = [json.loads(line) for line in (double / "train_log.jsonl").read_text().splitlines()]
    assert len({tuple(size) for row in rows for size in row["sizes"]}) > 1  # several buckets were trained
    assert {d for row in rows for d in row["datasets"]} == {"squares", "mixed"}
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in double.iterdir()) == [
        ".tuner.lock",  # one lock, the main process's
        "config.yaml",
        "logs",
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_ema.safetensors",
        "run.json",
        "train_log.jsonl",
    ]
    assert json.loads((double / "run.json").read_text())["status"] == "finished"  # written by the main process


@pytest.mark.slow
def test_a_full_fine_tune_sharded_in_two_processes_matches_one_with_the_same_global_batch(
    tiny_chroma, shapes_dir, mixed_dir, tmp_path
):
    """model_type: full sharded by FSDP2 (launched by accelerate as for DDP): every weight's gradient
    reduce-scattered, the EMA of every shard, the model gathered once and only the main process
    writing the folder and the single file. (DDP's gradient averaging is the LoRA tests'.)"""
    import yaml

    settings = yaml.safe_load(CONFIG.read_text())
    for key in ("network_rank", "lora_alpha", "flux_lora_target", "model_type"):
        settings.pop(key, None)
    config = tmp_path / "full.yaml"
    config.write_text(yaml.safe_dump(settings))
    datasets = [
        {"id": "squares", "data_dir": str(shapes_dir), "weight": 2},
        {"id": "mixed", "data_dir": str(mixed_dir), "aspect_bucket_alignment": 16, "caption_dropout_probability": 0.3},
    ]
    extra = {"model_type": "full", "max_train_steps": 4, "learning_rate": 1e-3, "fsdp_enable": "true"}
    single, _ = run(tiny_chroma, datasets, tmp_path, "one", processes=1, batch=4, extra=extra, config=config)
    double, done = run(tiny_chroma, datasets, tmp_path, "two", processes=2, batch=2, extra=extra, config=config)
    assert "effective batch 8 (2 processes)" in done.stdout and done.stdout.count("saved ") == 1
    assert "FSDP2: 3 blocks and the rest sharded across 2 processes" in done.stdout
    for name in ("transformer", "transformer_ema"):
        a = load_file(next((single / name).glob("*.safetensors")))
        b = load_file(next((double / name).glob("*.safetensors")))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert (double / "chroma_comfyui.safetensors").is_file() and (double / "chroma_comfyui_ema.safetensors").is_file()
