"""Every registered key, fed generated values: each is accepted or refused with a one-line error
naming the file, never a traceback (a property test over the core's, the families' and a
third-party family's keys). Values only torch would reject are refused when the config is read."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuner.core.config.build import build_config
from tuner.core.config.datasets import OVERRIDES, OWN
from tuner.core.errors import ConfigError, TunerError

from .conftest import base_settings, make_host

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1.0, 1.5, 2**63, 2**64, 1e-300, "no", "yes", "1e-4", "64x64", "all", ""]),
    st.text(max_size=12),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=6), SCALARS, max_size=2),
    st.lists(st.dictionaries(st.sampled_from([*OVERRIDES, *OWN]), SCALARS, max_size=4), max_size=2),
)


@pytest.mark.parametrize("family", ["chroma", "flux", "sd3"])
def test_every_key_accepts_or_refuses_any_value_in_one_line(family, tmp_path):
    host = make_host(family=family)
    base = base_settings(tmp_path / "model", tmp_path / "data", tmp_path, family=family)
    names = sorted(host.config_keys())

    @settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(name=st.sampled_from(names), value=VALUES)
    def check(name, value):
        raw = {k: v for k, v in base.items() if k != name}
        if name == "datasets" and value is not None:
            raw.pop("data_dir")  # datasets replaces data_dir
        raw[name] = value
        try:
            build_config(host, raw, "fuzz.yaml", warn=lambda message: None)
        except (ConfigError, TunerError) as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith("fuzz.yaml"), message

    check()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lora_dropout", 1.0, "lora_dropout: must be below 1, got 1.0"),
        ("adam_beta1", 1.0, "adam_beta1: must be below 1, got 1.0"),
        ("adam_beta2", -0.1, "adam_beta2: must be at least 0, got -0.1"),
        ("seed", 2**64, f"seed: must be at most {2**63 - 1}, got {2**64}"),
        ("seed", -1, "seed: must be at least 0, got -1"),
        ("caption_dropout_probability", 1.5, "caption_dropout_probability: must be at most 1, got 1.5"),
        ("divergence_lr_factor", 2.0, "divergence_lr_factor: must be at most 1, got 2.0"),
        ("learning_rate", math.inf, "learning_rate: expected a number, got inf"),
    ],
)
def test_values_only_torch_checked_are_refused_when_the_config_is_read(tmp_path, key, value, message):
    from typer.testing import CliRunner

    from tuner.core.cli import app

    with pytest.raises(ConfigError) as refused:
        build_config(make_host(), {**base_settings(tmp_path, tmp_path, tmp_path), key: value}, "c.yaml")
    assert str(refused.value) == f"c.yaml: {message}"
    config = tmp_path / "c.yaml"  # `tuner estimate` reads configs the same way
    config.write_text(f"model_family: chroma\n{key}: {value!r}\n".replace("inf", ".inf"))
    result = CliRunner().invoke(app, ["estimate", "--config", str(config)])
    assert str(result.exception) == f"{config}: {message}"


def test_a_dataset_weight_must_be_finite(tmp_path):
    raw = {**base_settings(tmp_path, tmp_path, tmp_path), "data_dir": None}
    raw["datasets"] = [{"data_dir": str(tmp_path), "weight": math.inf}]
    with pytest.raises(ConfigError, match=r"datasets\[0\] \(#1\): weight: inf is not a positive number"):
        build_config(make_host(), raw, "c.yaml")
