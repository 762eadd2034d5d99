"""Scheduled sampling: the rollout lands on the training sigma, the model is conditioned on it, the
loss and the log use it; off the straight path the target leads back to the clean image; offsets,
ramps and errors behave as documented; a resume stays exact."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from tuner.core import hookimpl
from tuner.core.errors import ConfigError
from tuner.core.training import rollout
from tuner.core.training.step import MicroBatch, Prediction

from .conftest import base_settings, make_config, make_host, train
from .test_resume import assert_resume_is_exact

GRID = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)


def test_each_chain_climbs_k_grid_steps_above_t_and_ends_on_t():
    paths = rollout.chains(GRID, torch.tensor([0.3, 0.9, 0.3, 0.5]), torch.tensor([2, 3, 0, 1]))
    expected = [[0.75, 0.5, 0.3], [1.0, 0.9], [0.3], [0.75, 0.5]]  # 0.9 is one step below the top: one step
    assert len(paths) == len(expected)
    for path, want in zip(paths, expected, strict=True):
        assert path == pytest.approx(want)


class VelocityField:
    """A stand-in denoiser answering predict_flow before the family: a fixed velocity for every
    sample, and a record of the sigmas it was conditioned on."""

    def __init__(self, velocity):
        self.velocity, self.calls = velocity, []

    @hookimpl(tryfirst=True)
    def predict_flow(self, noisy_latents, sigmas):
        self.calls.append(sigmas.tolist())
        return self.velocity.expand_as(noisy_latents).clone()


def rolled(field, tiny_chroma, shapes_dir, tmp_path, sigmas, offsets):
    host = make_host(("field", field))
    config = make_config(host, base_settings(tiny_chroma, shapes_dir, tmp_path))
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(1, 16, 4, 4, generator=generator).expand(len(sigmas), -1, -1, -1).clone()
    noise = torch.randn(1, 16, 4, 4, generator=generator).expand(len(sigmas), -1, -1, -1).clone()
    text = {"prompt_embeds": torch.zeros(len(sigmas), 3, 32)}
    model = Prediction(host, config, torch.nn.Linear(1, 1), torch.float32, contextlib.nullcontext)
    batch = MicroBatch(clean, noise, torch.tensor(sigmas), text, torch.Generator())
    noisy, target = rollout.roll_out(model, batch, rollout.chains(GRID, torch.tensor(sigmas), torch.tensor(offsets)))
    return clean, noise, noisy, target


def test_with_an_exact_velocity_the_rollout_lands_on_the_straight_path_at_t(tiny_chroma, shapes_dir, tmp_path):
    generator = torch.Generator().manual_seed(0)
    clean0 = torch.randn(1, 16, 4, 4, generator=generator)
    field = VelocityField(torch.randn(1, 16, 4, 4, generator=generator) - clean0)  # noise - clean
    clean, noise, noisy, target = rolled(field, tiny_chroma, shapes_dir, tmp_path, [0.3, 0.6, 0.3], [2, 1, 0])
    t = torch.tensor([0.3, 0.6, 0.3]).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - t) * clean + t * noise, atol=1e-5, rtol=1e-5)  # noise level t
    torch.testing.assert_close(target, noise - clean, atol=1e-4, rtol=1e-4)
    # the model was conditioned on the grid points above t, never on t itself (that is the training step)
    assert field.calls == [pytest.approx([0.75]), pytest.approx([0.5, 0.75])]


def test_off_the_straight_path_the_target_leads_back_to_the_clean_image(tiny_chroma, shapes_dir, tmp_path):
    field = VelocityField(torch.zeros(1, 16, 4, 4))  # a model that does not move the latents
    clean, noise, noisy, target = rolled(field, tiny_chroma, shapes_dir, tmp_path, [0.3, 0.3], [2, 0])
    drifted = 0.25 * clean[0] + 0.75 * noise[0]  # still at sigma 0.75, two steps up
    torch.testing.assert_close(noisy[0], drifted)
    torch.testing.assert_close(noisy[0] - 0.3 * target[0], clean[0], atol=1e-5, rtol=1e-5)  # one Euler step to t=0
    plain = 0.7 * clean[1] + 0.3 * noise[1]
    assert torch.equal(noisy[1], plain.to(noisy.dtype)) or torch.allclose(noisy[1], plain, atol=0, rtol=0)
    assert torch.equal(target[1], noise[1] - clean[1])  # samples not rolled out: the plain target, bit for bit


class Recorder:
    """Records every predict_flow call (sigmas, and whether it computes gradients), then lets the family answer."""

    def __init__(self):
        self.calls = []

    @hookimpl(tryfirst=True)
    def predict_flow(self, sigmas):
        self.calls.append((sigmas.tolist(), torch.is_grad_enabled()))


def rollout_settings(tiny_chroma, shapes_dir, tmp_path, **extra):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(
        train_batch_size=2,
        max_train_steps=4,
        scheduled_sampling_max_step_offset=2,
        scheduled_sampling_probability=1.0,
        scheduled_sampling_num_inference_steps=8,
    )
    return {**settings, **extra}


def test_a_run_conditions_and_logs_the_sigma_the_latents_carry(tiny_chroma, shapes_dir, tmp_path):
    recorder = Recorder()
    result, host, config = train(rollout_settings(tiny_chroma, shapes_dir, tmp_path), ("recorder", recorder))
    trained = [s for sigmas, grad in recorder.calls if grad for s in sigmas]
    rolled_out = [s for sigmas, grad in recorder.calls if not grad for s in sigmas]
    logged = [
        s
        for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
        for s in json.loads(line)["sigmas"]
    ]
    assert trained == pytest.approx(logged, abs=1e-5)  # the model's sigma at the training step is the logged one
    scheduler = host.provide("load_model", config=config, component="scheduler", dtype=torch.float32)
    grid = rollout.inference_grid(host, config, scheduler, (2, 16, 8, 8)).tolist()
    assert rolled_out and all(any(abs(s - g) < 1e-6 for g in grid) for s in rolled_out)  # on the family's schedule
    assert len(rolled_out) > len(trained) // 2  # every sample rolled out, 1 or 2 steps each


def test_offsets_follow_the_strategy_and_the_probability_its_ramp(tiny_chroma, shapes_dir, tmp_path):
    host = make_host()
    means = {}
    for strategy in ("biased_early", "uniform", "biased_late"):
        config = make_config(
            host,
            rollout_settings(tiny_chroma, shapes_dir, tmp_path, scheduled_sampling_max_step_offset=4,
                             scheduled_sampling_strategy=strategy),
        )  # fmt: skip
        offsets = rollout.draw_offsets(config, 0, 20000, torch.Generator().manual_seed(0))
        assert offsets.min() == 1 and offsets.max() == 4
        means[strategy] = offsets.float().mean().item()
    assert means["uniform"] == pytest.approx(2.5, abs=0.05)
    assert means["biased_early"] == pytest.approx(1 * 12 / 25 + 2 * 6 / 25 + 3 * 4 / 25 + 4 * 3 / 25, abs=0.05)
    assert means["biased_late"] == pytest.approx(3.0, abs=0.05)  # weights k: sum k^2 / sum k
    ramp = {
        "scheduled_sampling_probability": 0.0,
        "scheduled_sampling_prob_start": 0.1,
        "scheduled_sampling_prob_end": 0.5,
        "scheduled_sampling_ramp_steps": 100,
        "scheduled_sampling_start_step": 20,
    }
    linear = make_config(host, rollout_settings(tiny_chroma, shapes_dir, tmp_path, **ramp))
    cosine = make_config(
        host, rollout_settings(tiny_chroma, shapes_dir, tmp_path, **ramp, scheduled_sampling_ramp_shape="cosine")
    )
    assert [rollout.probability(linear, s) for s in (0, 20, 70, 120, 500)] == pytest.approx([0.1, 0.1, 0.3, 0.5, 0.5])
    assert rollout.probability(cosine, 45) == pytest.approx(0.1 + 0.4 * (1 - 2**-0.5) / 2)
    drawn = rollout.draw_offsets(linear, 70, 20000, torch.Generator().manual_seed(1))
    assert (drawn > 0).float().mean().item() == pytest.approx(0.3, abs=0.015)


def test_a_resumed_rollout_run_continues_exactly(tiny_chroma, shapes_dir, tmp_path):
    straight = rollout_settings(tiny_chroma, shapes_dir, tmp_path / "a", max_train_steps=6, checkpointing_steps=3,
                                scheduled_sampling_probability=0.5, lora_dropout=0.1)  # fmt: skip
    assert_resume_is_exact(straight, 2, checkpointing_steps=5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"scheduled_sampling_probability": 0.5},
            "scheduled_sampling_max_step_offset: is 0, so scheduled_sampling_probability 0.5 rolls nothing out",
        ),
        (
            {"scheduled_sampling_max_step_offset": 2, "scheduled_sampling_probability": 1.5},
            "scheduled_sampling_probability: must be at most 1",
        ),
    ],
)
def test_bad_rollout_settings_are_one_line_errors(tiny_chroma, shapes_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError) as info:
        make_config(make_host(), {**base_settings(tiny_chroma, shapes_dir, tmp_path), **extra})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_inference_schedule_is_the_familys_and_a_plugin_may_replace_it(tiny_chroma, shapes_dir, tmp_path):
    host = make_host()
    config = make_config(host, rollout_settings(tiny_chroma, shapes_dir, tmp_path))
    scheduler = host.provide("load_model", config=config, component="scheduler", dtype=torch.float32)
    small = rollout.inference_grid(host, config, scheduler, (1, 16, 8, 8))
    large = rollout.inference_grid(host, config, scheduler, (1, 16, 128, 128))
    assert len(small) == 9 and small[0] == pytest.approx(1.0) and small[-1] == 0.0  # 8 steps, down to 0
    assert bool((small[:-1] > small[1:]).all())
    assert bool((large[1:-1] > small[1:-1]).all())  # Chroma's resolution-dependent shift: more noise at 1024^2

    class EvenSteps:
        @hookimpl
        def inference_sigmas(self, num_steps):
            return torch.linspace(1.0, 0.0, num_steps + 1)

    recorder = Recorder()
    train(
        rollout_settings(tiny_chroma, shapes_dir, tmp_path / "even", max_train_steps=2),
        ("even", EvenSteps()),
        ("recorder", recorder),
    )
    rolled_out = [s for sigmas, grad in recorder.calls if not grad for s in sigmas]
    assert rolled_out and all(abs(s * 8 - round(s * 8)) < 1e-6 for s in rolled_out)  # multiples of 1/8


def test_the_resolution_shift_is_the_one_diffusers_pipelines_apply(tiny_chroma, shapes_dir, tmp_path):
    """The core computes a dynamic-shifting scheduler's mu from the scheduler's own config (no
    family's pipeline imported); it equals diffusers' calculate_shift, which Flux's and Chroma's
    pipelines call, at every sequence length."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from tuner.core.model import flow

    host = make_host()
    config = make_config(host, base_settings(tiny_chroma, shapes_dir, tmp_path))
    scheduler = host.provide("load_model", config=config, component="scheduler", dtype=torch.float32)
    settings = scheduler.config
    assert settings.use_dynamic_shifting
    for seq_len in (64, 256, 1024, 4096, 6400):
        expected = calculate_shift(
            seq_len, settings.base_image_seq_len, settings.max_image_seq_len, settings.base_shift, settings.max_shift
        )
        assert flow.dynamic_shift_mu(seq_len, settings) == pytest.approx(expected, rel=1e-12)
