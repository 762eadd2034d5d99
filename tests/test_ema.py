"""use_ema: the moving average of the adapter equals its closed form, survives a resume exactly,
is written as a second self-tested LoRA, and is what validation renders with validation_use_ema."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tuner.core import hookimpl
from tuner.core.errors import ConfigError
from tuner.core.host.events import RunStart, StepEnd

from .conftest import base_settings, make_config, make_host, train
from .test_resume import assert_resume_is_exact


class WeightLog:
    """Keeps the adapter's weights as initialised and after every step."""

    def __init__(self):
        self.model, self.weights = None, {}

    def snapshot(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @hookimpl
    def training_event(self, event):
        if isinstance(event, RunStart):
            self.model = event.model
            self.weights[event.step] = self.snapshot()
        elif isinstance(event, StepEnd):
            self.weights[event.step] = self.snapshot()


def ema_settings(tiny_chroma, shapes_dir, tmp_path, **extra):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(
        max_train_steps=6,
        train_batch_size=2,
        learning_rate=1e-2,
        use_ema=True,
        ema_decay=0.8,
        ema_update_interval=2,
        checkpointing_steps=4,
        lr_scheduler="cosine",
    )
    return {**settings, **extra}


def test_the_ema_is_the_closed_form_average_of_the_logged_weights(tiny_chroma, shapes_dir, tmp_path):
    log = WeightLog()
    result, _, _ = train(ema_settings(tiny_chroma, shapes_dir, tmp_path), ("weights", log))
    decay, expected = 0.8, {}
    # ema_n = decay^m w_0 + sum over update steps k of (1 - decay) decay^(updates after k) w_k
    updates = [2, 4, 6]
    for name, initial in log.weights[0].items():
        value = decay ** len(updates) * initial
        for index, step in enumerate(updates):
            value = value + (1 - decay) * decay ** (len(updates) - 1 - index) * log.weights[step][name]
        expected[name] = value
    saved = load_file(tmp_path / "out" / "checkpoint-6" / "ema.safetensors")
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(saved[name], value, atol=1e-6, rtol=1e-5), name
        assert not torch.equal(saved[name], log.weights[6][name]) or not name.endswith("lora_B.default.weight")
    # the second LoRA file holds the average, in the same layout as the first, and was self-tested
    names = [p.name for p in result.lora_files]
    assert names == ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"]
    ema_file, plain_file = load_file(result.lora_files[1]), load_file(result.lora_files[0])
    assert ema_file.keys() == plain_file.keys()
    for name, value in expected.items():
        key = "transformer." + name.replace(".default", "")
        assert torch.allclose(ema_file[key], value, atol=1e-6), key
        assert torch.equal(plain_file[key], log.weights[6][name]), key


def test_a_resumed_run_keeps_the_ema_exact(tiny_chroma, shapes_dir, tmp_path):
    straight = ema_settings(tiny_chroma, shapes_dir, tmp_path / "a")
    # stopped between two EMA updates
    assert_resume_is_exact(straight, 3, ("checkpoint-6/ema.safetensors", "pytorch_lora_weights_ema.safetensors"))


def test_validation_renders_with_the_ema_and_training_goes_on_with_the_weights(tiny_chroma, shapes_dir, tmp_path):
    from PIL import Image

    settings = ema_settings(
        tiny_chroma,
        shapes_dir,
        tmp_path / "plain",
        validation_prompt="a red circle",
        validation_num_inference_steps=2,
        validation_steps=3,
        ema_decay=0.5,
        ema_update_interval=1,
        learning_rate=5e-2,
    )
    plain, _, _ = train(settings)
    averaged, _, _ = train({**settings, "output_dir": str(tmp_path / "ema" / "out"), "validation_use_ema": True})
    assert plain.losses == averaged.losses  # validation put the training weights back
    for step in ("step_000003", "step_000006"):
        images = [
            torch.tensor(list(Image.open(tmp_path / run / "out" / "validation" / step / "00.png").getdata())).float()
            for run in ("plain", "ema")
        ]
        assert (images[0] - images[1]).abs().max() > 0, f"{step}: validation_use_ema rendered the same image"
    recipe = json.loads((tmp_path / "ema" / "out" / "recipe.json").read_text())
    assert recipe["lora_file"].endswith("pytorch_lora_weights_ema.safetensors")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"use_ema": True, "ema_decay": 1.0}, "ema_decay: must lie strictly between 0 and 1"),
        ({"use_ema": True, "ema_decay": 0}, "ema_decay: must lie strictly between 0 and 1"),
        ({"validation_use_ema": True}, "validation_use_ema: needs use_ema: true"),
    ],
)
def test_bad_ema_settings_are_one_line_errors(tiny_chroma, shapes_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError) as info:
        make_config(make_host(), {**base_settings(tiny_chroma, shapes_dir, tmp_path), **extra})
    assert message in str(info.value) and "\n" not in str(info.value)
