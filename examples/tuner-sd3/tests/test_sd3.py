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


@pytest.mark.slow
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


def sd3_settings(tiny_sd3, tmp_path, **extra) -> dict:
    """A short fp32 CPU run of the tiny SD3 on the shapes dataset."""
    return {
        "pretrained_model_name_or_path": str(tiny_sd3),
        "data_dir": str(shapes_dataset(tmp_path / "d", 64)),
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "c"),
        "resolution": 64,
        "tokenizer_max_length": 16,
        "network_rank": 4,
        "mixed_precision": "no",
        "report_to": "none",
        **extra,
    }


def test_lora_with_alpha_unlike_rank_reloads_in_diffusers(tiny_sd3, tmp_path):
    """SD3's diffusers loader ignores .alpha tensors: the file carries alpha in its adapter metadata."""
    from diffusers import StableDiffusion3Pipeline

    from tuner.core.config.build import build_config
    from tuner.core.run.trainer import Trainer

    host = make_host(("sd3", plugin), family="sd3")
    settings = sd3_settings(tiny_sd3, tmp_path, lora_alpha=16, max_train_steps=4, learning_rate=5e-3)
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


def test_recipe_carries_sd3_keys_and_resume_refuses_a_changed_sd3_target(tiny_sd3, tmp_path):
    """The core names no family's keys: SD3's ConfigKey flags decide what recipe.json records and
    what a resume must match."""
    from tuner.core.config.build import build_config
    from tuner.core.errors import ConfigError
    from tuner.core.run.trainer import Trainer

    host = make_host(("sd3", plugin), family="sd3")
    settings = sd3_settings(
        tiny_sd3,
        tmp_path,
        max_train_steps=2,
        checkpointing_steps=1,
        validation_prompt="a red circle",
        validation_num_inference_steps=2,
        validation_guidance=2.5,
    )
    Trainer(host, build_config(host, settings, "t", warn=lambda m: None), warn=lambda m: None).train()
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["settings"]["tokenizer_max_length"] == 16
    assert recipe["settings"]["validation_guidance"] == 2.5
    assert "sd3_lora_target" not in recipe["settings"]  # training only, not how images are rendered

    changed = {**settings, "resume_from_checkpoint": "latest", "sd3_lora_target": "attention", "max_train_steps": 3}
    with pytest.raises(
        ConfigError, match=r"checkpoint-2 was trained with different sd3_lora_target \('all' -> 'attention'\)"
    ):
        Trainer(host, build_config(host, changed, "t", warn=lambda m: None), warn=lambda m: None).train()


def test_sd3_refuses_img2img_validation_it_cannot_honour():
    from tuner.core.config.build import build_config
    from tuner.core.errors import ConfigError

    host = make_host(("sd3", plugin), family="sd3")
    with pytest.raises(ConfigError, match=r"validation_init_image: sd3 does not support img2img; remove the key"):
        build_config(host, {"validation_init_image": "init.png"}, "t", warn=lambda m: None)
