"""The README's example: the bundled config trains from the command line, and the bundled tiny
model is exactly what examples/build_examples.py makes (random weights, seed 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "example"),
    [("chroma", "chroma"), ("flux", "flux"), ("flux2", "flux2"), ("qwen_image", "qwen-image")],
)
def test_example_config_trains_from_the_command_line(tmp_path, family, example):
    command = [
        sys.executable,
        "-m",
        "tuner.core.cli",
        "run",
        "--plugin",
        family,
        "--config",
        f"examples/{example}-tiny.yaml",
        "--set",
        f"output_dir={tmp_path / 'out'}",
        "--set",
        f"cache_dir={tmp_path / 'cache'}",
        "--set",
        "max_train_steps=3",
        "--set",
        "validation_steps=0",
        "--set",
        "checkpointing_steps=0",
        "--set",
        "validation_num_inference_steps=2",
    ]
    quiet = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")  # as a user's shell has them: unset
    env = {**{k: v for k, v in os.environ.items() if k not in quiet}, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "saved" in out.stdout and "after 3 steps" in out.stdout
    assert "step 3: 2 validation image(s) in" in out.stdout  # each validation is announced in one line
    assert "CPU threads: 1 (OMP_NUM_THREADS)" in out.stdout  # the user's choice wins, and is said
    for noise in ("kernels-community", "FluxPosEmbed", "torchvision", "Warning", "Loading weights"):  # third-party
        assert noise not in out.stderr, out.stderr[-2000:]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert len((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in (tmp_path / "out" / "validation" / "step_000003").iterdir()) == [
        "00.png",
        "01.png",
        "grid.png",
        "prompts.txt",
    ]


@pytest.mark.parametrize(
    ("name", "components"),
    [
        ("tiny-chroma", ("transformer", "vae", "text_encoder")),
        ("tiny-flux", ("transformer", "vae", "text_encoder", "text_encoder_2")),
        ("tiny-flux2", ("transformer", "vae", "text_encoder")),
        ("tiny-qwen-image", ("transformer", "vae", "text_encoder")),
    ],
)
def test_bundled_tiny_model_is_reproducible(request, name, components):
    built = request.getfixturevalue(name.replace("-", "_"))
    bundled = REPO / "examples" / "models" / name
    for component in components:
        assert json.loads((bundled / component / "config.json").read_text()) | {
            "_diffusers_version": 0,
            "transformers_version": 0,
        } == json.loads((built / component / "config.json").read_text()) | {
            "_diffusers_version": 0,
            "transformers_version": 0,
        }
        weights = next((bundled / component).glob("*.safetensors")).name
        ours, theirs = load_file(bundled / component / weights), load_file(built / component / weights)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component
