"""regularisation_target: base_model: a regularisation dataset trains towards the base model's own
prediction (every adapter off, no gradient), so the LoRA learns to leave those prompts alone."""

from __future__ import annotations

import pytest
import torch

from tuner.core.errors import ConfigError

from .conftest import base_settings, make_config, make_host, train


def settings_with(tiny_chroma, shapes_dir, mixed_dir, tmp_path, target="base_model", **extra):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    del settings["data_dir"]
    settings["datasets"] = [
        {"id": "subject", "data_dir": str(shapes_dir)},
        {"id": "prior", "data_dir": str(mixed_dir), "kind": "regularisation", "regularisation_target": target,
         "aspect_bucket_alignment": 16},
    ]  # fmt: skip
    return {**settings, "train_batch_size": 2, **extra}


@pytest.mark.parametrize(
    "extra",
    [
        {"lora_type": "lora"},
        {"lora_type": "dora"},
        {"lora_type": "lokr"},
        {"lora_type": "loha"},
        {"base_model_precision": "int8-quanto"},
        {"compile": True, "compile_backend": "aot_eager"},
    ],
    ids=["lora", "dora", "lokr", "loha", "int8-quanto", "compile"],
)
def test_with_the_adapter_at_zero_the_regularisation_loss_is_zero(tiny_chroma, shapes_dir, mixed_dir, tmp_path, extra):
    """Only the prior set, one step: the adapter starts as no change, so its prediction is the base
    model's and the loss is exactly 0, for every adapter type, a quantized base and compile."""
    settings = settings_with(tiny_chroma, shapes_dir, mixed_dir, tmp_path, max_train_steps=1, **extra)
    settings["datasets"] = settings["datasets"][1:]
    result, _, _ = train(settings)
    assert result.losses == [0.0]


def predict(host, config, model, noisy, text):
    with torch.no_grad():
        return host.provide(
            "predict_flow", transformer=model, noisy_latents=noisy, sigmas=torch.tensor([0.5]), text=text,
            config=config, generator=torch.Generator(),
        )  # fmt: skip


def test_the_prior_set_drifts_less_than_with_the_usual_target(tiny_chroma, shapes_dir, mixed_dir, tmp_path):
    """After the same short run, the LoRA trained with base_model targets changes the prior set's
    predictions far less than one trained towards noise - latents; with its adapters off the model
    predicts exactly what the untouched base does (the target the run used)."""
    from tuner.core.run.trainer import Trainer
    from tuner.core.training.step import adapters_off

    drift = {}
    for target in ("noise", "base_model"):
        settings = settings_with(
            tiny_chroma, shapes_dir, mixed_dir, tmp_path / target, target, max_train_steps=24, learning_rate=2e-2,
            network_rank=8,
        )  # fmt: skip
        host = make_host()
        trainer = Trainer(host, make_config(host, settings), warn=lambda m: None)
        trainer.train()
        prepared = trainer.prepare_data()
        model, config = trainer.model.eval(), trainer.ctx.config
        untouched = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
        g = torch.Generator().manual_seed(0)
        drift[target] = 0.0
        for entry in [e for e in prepared.entries if e.dataset == 1][:4]:
            text = {k: v[None] for k, v in prepared.text.load(entry.text).items()}
            latents = prepared.latents.load(entry.latent)["latents"][None]
            noisy = 0.5 * latents + 0.5 * torch.randn(latents.shape, generator=g)
            trained = predict(host, config, model, noisy, text)
            with adapters_off(model):
                base = predict(host, config, model, noisy, text)
            torch.testing.assert_close(base, predict(host, config, untouched, noisy, text), atol=1e-6, rtol=0)
            drift[target] += float((trained - base).pow(2).mean())
    assert drift["base_model"] < 0.5 * drift["noise"], drift


def test_base_model_target_is_for_regularisation_entries(tiny_chroma, shapes_dir, mixed_dir, tmp_path):
    settings = settings_with(tiny_chroma, shapes_dir, mixed_dir, tmp_path)
    settings["datasets"][0]["regularisation_target"] = "base_model"
    with pytest.raises(ConfigError, match=r"datasets\[0\] \(subject\): regularisation_target: base_model is for kind"):
        make_config(make_host(), settings)
    plain = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "regularisation_target": "base_model"}
    with pytest.raises(ConfigError, match="regularisation_target: base_model applies to datasets entries"):
        make_config(make_host(), plain)


def test_the_estimate_traces_the_extra_forward(tiny_chroma, shapes_dir, mixed_dir, tmp_path):
    """The traced step is the prior set's, base forward included (it runs on fake tensors too)."""
    from tuner.core.estimate.trace import estimate

    peaks = {}
    for target in ("noise", "base_model"):
        host = make_host()
        config = make_config(
            host, {**settings_with(tiny_chroma, shapes_dir, mixed_dir, tmp_path, target), "memory_estimate": True}
        )
        peaks[target] = estimate(host, config, "cpu").phase("train").device
    assert peaks["base_model"] >= peaks["noise"] > 0
