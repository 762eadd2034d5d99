"""Where the sigma density puts its mass, drawn through the plugin manager as a run does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tuner.core import hookimpl
from tuner.core.host.records import FamilyInfo
from tuner.core.model import flow

from .conftest import make_config, make_host

N = 200_000


class BareFamily:
    """A family that leaves sigma sampling to the core's default."""

    @hookimpl
    def register_families(self, register):
        register(FamilyInfo("bare", "test family", {"base": "none"}, "base"))


def draw(settings: dict, family: str = "chroma", resolution: int = 512) -> torch.Tensor:
    host = make_host(("bare", BareFamily()), family=family)
    config = make_config(host, {"data_dir": "d", "resolution": resolution, **settings})
    latent = resolution // 8
    return host.provide(
        "sample_sigmas",
        config=config,
        batch_size=N,
        latent_shape=(N, 16, latent, latent),
        generator=torch.Generator().manual_seed(0),
    )


def fraction(s: torch.Tensor, lo: float, hi: float) -> float:
    return float(((s >= lo) & (s < hi)).float().mean())


def test_chroma_default_covers_the_middle_and_has_heavier_tails():
    chroma = draw({})
    plain = flow.logit_normal(N, torch.Generator().manual_seed(0))
    assert chroma.min() > 0 and chroma.max() < 1
    # the middle band that every sampler passes through is trained
    assert fraction(chroma, 0.25, 0.75) > 0.40
    for band in [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7)]:
        assert fraction(chroma, *band) > 0.05, band
    # both tails are visited far more often than under plain logit-normal (~1.4% each)
    assert fraction(chroma, 0.0, 0.1) > 4 * fraction(plain, 0.0, 0.1)
    assert fraction(chroma, 0.9, 1.0) > 4 * fraction(plain, 0.9, 1.0)
    # symmetric U shape: the remap branches are mirror images
    assert abs(fraction(chroma, 0, 0.5) - 0.5) < 0.01


def test_simpletuner_threshold_rule_never_trains_the_middle():
    st = draw({"chroma_sigma_remap": "threshold"})
    assert fraction(st, 0.25, 0.75) == 0.0
    assert float(st.median()) > 0.9  # shift 3 pushes almost everything to high noise


def test_core_default_shift_and_auto_shift_match_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq_len in (256, 1024, 4096):
        assert flow.resolution_shift(seq_len) == pytest.approx(torch.e ** calculate_shift(seq_len), rel=1e-9)
    plain = draw({}, family="bare")
    shifted = draw({"flow_schedule_shift": 3.0}, family="bare")
    assert torch.allclose(shifted, flow.clamp_open_unit(flow.shift_sigmas(plain, 3.0)), atol=1e-6)
    auto = draw({"flow_schedule_auto_shift": True}, family="bare", resolution=1024)
    s = flow.resolution_shift((1024 // 16) ** 2)
    assert torch.allclose(auto, flow.clamp_open_unit(flow.shift_sigmas(plain, s)), atol=1e-6)


def test_tuner_sigmas_json(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("chroma_sigma_remap: threshold\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuner.core.cli",
            "sigmas",
            "--plugin",
            "chroma",
            "--config",
            str(config),
            "--samples",
            "5000",
            "--bins",
            "8",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    histogram = json.loads(out.stdout)
    assert histogram["edges"] == [i / 8 for i in range(9)]
    assert len(histogram["counts"]) == 8 and sum(histogram["counts"]) == 5000
    assert histogram["counts"][2:6] == [0, 0, 0, 0]  # [0.25, 0.75) is empty under the threshold rule


def test_tuner_sigmas_text_histogram():
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", "sigmas", "--plugin", "chroma", "--samples", "2000", "--bins", "4"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("sigma distribution of chroma (2000 samples")
    assert len(lines) == 5 and lines[1].startswith("0.00-0.25 #")


def test_sigma_sampling_family_is_the_draw_every_family_made_before_it():
    """The default changes nothing: the same numbers from the same generator (resumed runs too)."""
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = flow.logit_normal(N, g())
    bare = draw({"flow_schedule_shift": 3.0}, family="bare")
    torch.testing.assert_close(bare, flow.clamp_open_unit(flow.shift_sigmas(plain, 3.0)), atol=0, rtol=0)
    branch = torch.Generator().manual_seed(0)
    flow.logit_normal(N, branch)  # the remap's branch draws follow the density's
    low = torch.rand(N, generator=branch) < 0.5
    chroma = flow.clamp_open_unit(torch.where(low, plain.square(), 1 - (1 - plain).square()))
    torch.testing.assert_close(draw({}), chroma, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("settings", "mean", "variance"),
    [
        ({"sigma_sampling": "uniform"}, 0.5, 1 / 12),
        ({"sigma_sampling": "inverted_parabola"}, 0.5, 1 / 20),  # Beta(2, 2)
        ({"sigma_sampling": "mode", "sigma_sampling_scale": 0.0}, 0.5, 1 / 12),  # scale 0: uniform
        ({"sigma_sampling": "logit_normal", "sigma_sampling_mean": 1.0, "sigma_sampling_std": 0.5}, None, None),
    ],
)
def test_each_sigma_sampling_density(settings, mean, variance):
    drawn = draw(settings, family="bare")
    again = draw(settings, family="bare")
    assert torch.equal(drawn, again)  # one generator, one draw: reproducible under resume
    assert drawn.min() > 0 and drawn.max() < 1
    if mean is not None:
        assert abs(float(drawn.mean()) - mean) < 0.003 and abs(float(drawn.var()) - variance) < 0.002
    else:  # sigmoid(N(1, 0.5)): the median is sigmoid(1), the logit's spread 0.5
        logits = torch.logit(drawn.double())
        assert abs(float(logits.median()) - 1.0) < 0.01 and abs(float(logits.std()) - 0.5) < 0.01
    if settings["sigma_sampling"] == "inverted_parabola":  # density 6 s (1 - s), bin by bin
        for lo in torch.arange(0, 1, 0.1).tolist():
            hi = lo + 0.1
            expected = (3 * hi**2 - 2 * hi**3) - (3 * lo**2 - 2 * lo**3)
            assert abs(fraction(drawn, lo, hi) - expected) < 0.004, lo


def test_sd3_mode_moves_mass_to_the_middle_and_the_family_shift_and_remap_apply_on_top():
    mode = draw({"sigma_sampling": "mode"}, family="bare")
    assert fraction(mode, 0.4, 0.6) > 0.2 + 0.03 and fraction(mode, 0.0, 0.1) < 0.1  # uniform: 0.2 and 0.1
    uniform = draw({"sigma_sampling": "uniform"}, family="bare")
    shifted = draw({"sigma_sampling": "uniform", "flow_schedule_shift": 3.0}, family="bare")
    torch.testing.assert_close(shifted, flow.clamp_open_unit(flow.shift_sigmas(uniform, 3.0)))
    # Chroma remaps whatever density is chosen: uniform then sigma^2 or 1 - (1 - sigma)^2
    remapped = draw({"sigma_sampling": "uniform"})
    branch = torch.Generator().manual_seed(0)
    base = torch.rand(N, generator=branch)
    low = torch.rand(N, generator=branch) < 0.5
    torch.testing.assert_close(remapped, flow.clamp_open_unit(torch.where(low, base.square(), 1 - (1 - base).square())))


def test_sigma_sampling_keys_are_recorded_and_unused_ones_said():
    warnings: list[str] = []
    host = make_host(("bare", BareFamily()), family="bare")
    config = make_config(
        host, {"data_dir": "d", "sigma_sampling": "uniform", "sigma_sampling_scale": 1.0}, warnings=warnings
    )
    assert config.flagged("recipe")["sigma_sampling"] == "uniform"
    assert any("sigma_sampling_scale is ignored because sigma_sampling is uniform" in w for w in warnings), warnings


def test_tuner_sigmas_shows_a_chosen_density_with_its_mean():
    from typer.testing import CliRunner

    from tuner.core.cli import app

    out = CliRunner().invoke(
        app, ["sigmas", "--plugin", "flux", "--set", "sigma_sampling=inverted_parabola", "--samples", "20000", "--json"]
    )
    assert out.exit_code == 0, out.output
    histogram = json.loads(out.output)
    assert abs(histogram["mean"] - 0.5) < 0.01 and histogram["counts"][0] < histogram["counts"][10] / 5
