"""tuner-sd3 against tuner's public contract kit, plus the command line a user would run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tuner_sd3 import plugin
from tuner_sd3.tiny import build_tiny_sd3

from tuner.testing import make_host, shapes_dataset
from tuner.testing.contract import FamilyContract

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


class TestSD3Contract(FamilyContract):
    family = "sd3"
    plugin_module = "tuner_sd3.plugin"

    @pytest.fixture(scope="class")
    def tiny_model(self, tmp_path_factory):
        return build_tiny_sd3(tmp_path_factory.mktemp("contract") / "tiny-sd3")

    def settings(self, model, data, out):
        return {**super().settings(model, data, out), "tokenizer_max_length": 16}


def test_tuner_plugins_lists_the_package_with_its_distribution():
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=ENV,
    )
    row = next(r for r in json.loads(out.stdout) if r["name"] == "sd3")
    assert (row["distribution"], row["version"], row["families"]) == ("tuner-sd3", "0.1.0", ["sd3"])
    assert "register_commands" in row["hooks"]


def test_the_command_line_builds_a_tiny_sd3_and_trains_it(tmp_path):
    model, data = tmp_path / "tiny-sd3", shapes_dataset(tmp_path / "data", size=64)
    cli = [sys.executable, "-m", "tuner.core.cli"]
    subprocess.run([*cli, "sd3-make-tiny", str(model)], check=True, capture_output=True, env=ENV)
    config = os.path.join(os.path.dirname(plugin.__file__), "..", "sd3-tiny.yaml")
    overrides = {
        "pretrained_model_name_or_path": model,
        "data_dir": data,
        "output_dir": tmp_path / "out",
        "cache_dir": tmp_path / "cache",
        "max_train_steps": 3,
        "validation_num_inference_steps": 2,
    }
    args = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    out = subprocess.run(
        [*cli, "run", "--plugin", "sd3", "--config", config, *args], capture_output=True, text=True, env=ENV
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "self-test passed" in out.stdout and (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_lora_with_alpha_unlike_rank_reloads_in_diffusers(tiny_sd3, tmp_path):
    """SD3's diffusers loader ignores .alpha tensors: the file carries alpha in its adapter metadata."""
    from diffusers import StableDiffusion3Pipeline

    from tuner.core.config import build_config
    from tuner.core.train import Trainer

    host = make_host(("sd3", plugin), family="sd3")
    settings = {
        "pretrained_model_name_or_path": str(tiny_sd3),
        "data_dir": str(shapes_dataset(tmp_path / "d", 64)),
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "c"),
        "resolution": 64,
        "tokenizer_max_length": 16,
        "network_rank": 4,
        "lora_alpha": 16,
        "max_train_steps": 4,
        "learning_rate": 5e-3,
        "mixed_precision": "no",
        "report_to": "none",
    }
    trainer = Trainer(host, build_config(host, settings, "t", warn=lambda m: None), warn=lambda m: None)
    result = trainer.train()
    g = torch.Generator().manual_seed(0)
    text = {
        "prompt_embeds": torch.randn(1, 16 + 154, 64, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 64, generator=g),
    }
    noisy, sigmas = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5])

    def predict(transformer):
        with torch.no_grad():
            return host.provide(
                "predict_flow",
                transformer=transformer,
                noisy_latents=noisy,
                sigmas=sigmas,
                text=text,
                config=trainer.config,
                generator=torch.Generator(),
            )

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(result.lora_files[0]))
    torch.testing.assert_close(predict(pipe.transformer), predict(trainer.model.eval()), atol=1e-5, rtol=1e-4)
