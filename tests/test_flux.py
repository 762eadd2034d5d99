"""Flux.1 on the shared flow-matching core: guidance, schedules, masking, training and reload."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tuner.core.errors import ConfigError
from tuner.core.model import flow
from tuner.core.run.trainer import Trainer

from .conftest import base_settings, make_config, make_host, train

N = 100_000


def flux_config(model, data, tmp_path, warnings=None, **settings):
    host = make_host(family="flux")
    return host, make_config(host, {**base_settings(model, data, tmp_path, "flux"), **settings}, warnings)


def captured_forward_kwargs(host, config, model_dir, batch=4, text=None, seed=0):
    """Call predict_flow through the plugin manager and record what reached the transformer."""
    transformer = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
    seen = {}
    transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    g = torch.Generator().manual_seed(seed)
    text = text or {
        "prompt_embeds": torch.randn(batch, 16, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(batch, 32, generator=g),
        "attention_mask": torch.arange(16).expand(batch, 16) < 6,
    }
    out = host.provide(
        "predict_flow",
        transformer=transformer,
        noisy_latents=torch.randn(batch, 16, 8, 8, generator=g),
        sigmas=torch.full((batch,), 0.5),
        text=text,
        config=config,
        generator=torch.Generator().manual_seed(seed),
    )
    return seen, out, transformer


def test_guidance_is_passed_only_when_the_transformer_has_a_guidance_embedding(
    tiny_flux, tiny_schnell, shapes_dir, tmp_path
):
    host, dev = flux_config(tiny_flux, shapes_dir, tmp_path, flux_guidance_value=2.5)
    seen, _, _ = captured_forward_kwargs(host, dev, tiny_flux)
    assert seen["guidance"].tolist() == [2.5] * 4
    assert seen["pooled_projections"].shape == (4, 32)
    host, schnell = flux_config(tiny_schnell, shapes_dir, tmp_path, model_flavour="schnell")
    seen, _, _ = captured_forward_kwargs(host, schnell, tiny_schnell)
    assert "guidance" not in seen


def test_t5_token_count_follows_the_flavour_unless_set(tiny_flux, shapes_dir, tmp_path):
    settings = base_settings(tiny_flux, shapes_dir, tmp_path, "flux")
    del settings["tokenizer_max_length"]
    host = make_host(family="flux")
    assert make_config(host, settings).tokenizer_max_length == 512
    assert make_config(host, {**settings, "model_flavour": "schnell"}).tokenizer_max_length == 256
    assert make_config(host, {**settings, "tokenizer_max_length": 77}).tokenizer_max_length == 77


def test_random_range_guidance_stays_within_bounds(tiny_flux, shapes_dir, tmp_path):
    host, config = flux_config(
        tiny_flux,
        shapes_dir,
        tmp_path,
        flux_guidance_mode="random-range",
        flux_guidance_min=1.5,
        flux_guidance_max=4.0,
    )
    seen, _, _ = captured_forward_kwargs(host, config, tiny_flux, batch=256)
    values = seen["guidance"]
    assert values.min() >= 1.5 and values.max() <= 4.0
    assert values.min() < 1.7 and values.max() > 3.8 and len(set(values.tolist())) == 256  # spread, per sample
    with pytest.raises(ConfigError, match="flux_guidance_min: 5.0 is above flux_guidance_max 4.0"):
        flux_config(tiny_flux, shapes_dir, tmp_path, flux_guidance_mode="random-range", flux_guidance_min=5.0)


def draw_sigmas(host, config, resolution):
    latent = resolution // 8
    return host.provide(
        "sample_sigmas",
        config=config,
        batch_size=N,
        latent_shape=(N, 16, latent, latent),
        generator=torch.Generator().manual_seed(0),
    )


def test_shift_and_auto_shift_match_diffusers_with_the_models_own_constants(tiny_flux, shapes_dir, tmp_path):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = json.loads((tiny_flux / "scheduler" / "scheduler_config.json").read_text())
    custom = tmp_path / "model"
    subprocess.run(["cp", "-r", str(tiny_flux), str(custom)], check=True)
    scheduler.update(base_shift=0.8, max_shift=1.6, base_image_seq_len=128)
    (custom / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))

    host, plain_config = flux_config(custom, shapes_dir, tmp_path)
    plain = draw_sigmas(host, plain_config, 512)
    _, static = flux_config(custom, shapes_dir, tmp_path, flow_schedule_shift=3.0)
    torch.testing.assert_close(draw_sigmas(host, static, 512), flow.clamp_open_unit(flow.shift_sigmas(plain, 3.0)))
    _, auto = flux_config(custom, shapes_dir, tmp_path, flow_schedule_auto_shift=True)
    for resolution in (256, 1024):
        seq_len = (resolution // 16) ** 2
        mu = calculate_shift(seq_len, 128, scheduler["max_image_seq_len"], 0.8, 1.6)
        expected = flow.clamp_open_unit(flow.shift_sigmas(plain, math.exp(mu)))
        torch.testing.assert_close(draw_sigmas(host, auto, resolution), expected)
    assert draw_sigmas(host, auto, 1024).median() > draw_sigmas(host, auto, 256).median()


def test_schnell_fast_schedule_draws_only_its_four_values(tiny_schnell, shapes_dir, tmp_path):
    host, config = flux_config(tiny_schnell, shapes_dir, tmp_path, model_flavour="schnell", flux_fast_schedule=True)
    sigmas = draw_sigmas(host, config, 512)
    values, counts = torch.unique(sigmas, return_counts=True)
    assert values.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert counts[-1] / N == pytest.approx(0.7, abs=0.01)
    assert all(c / N == pytest.approx(0.1, abs=0.01) for c in counts[:3])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_masked_training_ignores_padding_only_when_asked(tiny_flux, shapes_dir, tmp_path, checkpointing):
    from tuner.core.fixes import checkpoint_blocks

    g = torch.Generator().manual_seed(5)
    text = {
        "prompt_embeds": torch.randn(1, 16, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=g),
        "attention_mask": torch.arange(16)[None] < 6,
    }
    changed = {**text, "prompt_embeds": text["prompt_embeds"].clone()}
    changed["prompt_embeds"][:, 6:] += 4.0
    outputs = {}
    for masked in (True, False):
        host, config = flux_config(tiny_flux, shapes_dir, tmp_path, flux_attention_masked_training=masked)
        transformer = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
        if checkpointing:
            checkpoint_blocks(transformer)
        for name, t in (("text", text), ("changed", changed)):
            with torch.enable_grad():
                outputs[masked, name] = host.provide(
                    "predict_flow",
                    transformer=transformer,
                    noisy_latents=torch.ones(1, 16, 8, 8),
                    sigmas=torch.tensor([0.5]),
                    text=t,
                    config=config,
                    generator=torch.Generator().manual_seed(0),
                )
    torch.testing.assert_close(outputs[True, "text"], outputs[True, "changed"], atol=1e-6, rtol=0)
    assert not torch.allclose(outputs[False, "text"], outputs[False, "changed"], atol=1e-4)


def test_masked_validation_with_real_cfg_is_refused(tiny_flux, shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="validation_guidance_real: real CFG at validation cannot mask"):
        flux_config(tiny_flux, shapes_dir, tmp_path, flux_attention_masked_training=True, validation_guidance_real=3.0)


def test_flux_loss_falls_on_an_overfit_batch(tiny_flux, one_image_dir, tmp_path):
    settings = base_settings(tiny_flux, one_image_dir, tmp_path, "flux")
    settings.update(max_train_steps=100, learning_rate=1e-2, flux_lora_target="all+ffs", network_rank=8, seed=1)
    losses = train(settings)[0].losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_flux_lora_reloads_in_diffusers_and_reproduces_the_trained_output(tiny_flux, shapes_dir, tmp_path):
    from diffusers import FluxPipeline

    settings = base_settings(tiny_flux, shapes_dir, tmp_path, "flux")
    settings.update(
        network_rank=4,
        lora_alpha=2,
        max_train_steps=6,
        learning_rate=5e-3,
        gradient_checkpointing=True,
        validation_prompt="a red circle",
        validation_negative_prompt="blurry",
        validation_guidance_real=2.0,
        validation_num_inference_steps=2,
    )
    host = make_host(family="flux")
    config = make_config(host, settings)
    trainer = Trainer(host, config, warn=lambda m: None)
    result = trainer.train()
    assert (result.validation_dirs[-1] / "00.png").is_file()  # dev guidance + real CFG validation ran

    prepared = trainer.prepare_data()
    entry = prepared.text.load(prepared.entries[0].text)
    text = {k: v.unsqueeze(0) for k, v in entry.items()}

    def predict(transformer):
        with torch.no_grad():
            return host.provide(
                "predict_flow",
                transformer=transformer,
                noisy_latents=torch.ones(1, 16, 8, 8),
                sigmas=torch.tensor([0.4]),
                text=text,
                config=config,
                generator=torch.Generator().manual_seed(0),
            )

    trained = predict(trainer.model.eval())
    pipe = FluxPipeline.from_pretrained(tiny_flux, torch_dtype=torch.float32)
    base = predict(pipe.transformer)
    pipe.load_lora_weights(str(result.lora_files[-1]))
    assert not torch.allclose(base, trained, atol=1e-4)
    torch.testing.assert_close(predict(pipe.transformer), trained, atol=1e-5, rtol=1e-4)


def test_tuner_sigmas_for_flux_fast_schedule():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuner.core.cli",
            "sigmas",
            "--plugin",
            "flux",
            "--set",
            "model_flavour=schnell",
            "--set",
            "flux_fast_schedule=true",
            "--samples",
            "1000",
            "--bins",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    counts = json.loads(out.stdout)["counts"]
    assert counts[0] == 0 and sum(counts) == 1000 and counts[3] > 600  # 0.25 lands in bin 1, 1.0 in the last
