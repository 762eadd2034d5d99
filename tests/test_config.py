"""Config files, aliases, overrides and every config error as a one-line message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tuner.core.config.values import parse_overrides, read_config_file
from tuner.core.errors import ConfigError

from .conftest import make_config, make_host

MINIMAL = {"data_dir": "data"}


@pytest.fixture(scope="module")
def host():
    return make_host()


def test_jsonc_like_the_seed_parses(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        """{
  // Chroma LoRA, as in the seed guide
  "model_type": "lora",
  "model_family": "chroma",
  "model_flavour": "base",   /* base | hd | flash */
  "output_dir": "output/models-chroma",
  "network_rank": 16,
  "learning_rate": 2e-4,
  "mixed_precision": "bf16",
  "gradient_checkpointing": true,
  "pretrained_model_name_or_path": null,
  "validation_prompt": "a url: http://example.com // not a comment",
}"""
    )
    raw = read_config_file(path)
    assert raw["validation_prompt"] == "a url: http://example.com // not a comment"
    assert raw["learning_rate"] == 2e-4 and raw["pretrained_model_name_or_path"] is None


def test_yaml_and_defaults(host, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data_dir: d\nlearning_rate: 1e-4\nlora_rank: 8\n")
    config = make_config(host, read_config_file(path))
    assert config.learning_rate == 1e-4  # YAML reads 1e-4 as a string; the key's kind fixes it
    assert config.network_rank == 8 and config.lora_alpha == 8.0  # alias, alpha defaults to rank
    assert config.model_flavour == "base" and config.model_family == "chroma"
    assert config.flux_lora_target == "all" and config.validation_guidance_real == 4.0


def test_simpletuner_aliases(host):
    config = make_config(host, {**MINIMAL, "lora_rank": 4, "t5_padding": "zero", "validation_guidance": 3.0})
    assert (config.network_rank, config.flux_t5_padding, config.validation_guidance_real) == (4, "zero", 3.0)


def test_unquoted_no_in_yaml_means_the_choice_no(host, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data_dir: d\nmixed_precision: no\n")  # YAML 1.1 reads this as false
    assert make_config(host, read_config_file(path)).mixed_precision == "no"
    with pytest.raises(ConfigError, match="gradient_checkpointing: expected true or false, got 'no'"):
        make_config(host, {**MINIMAL, "gradient_checkpointing": "no"})


def test_cli_names_set_as_the_origin_of_a_bad_override(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("data_dir: d\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuner.core.cli",
            "run",
            "--plugin",
            "chroma",
            "--config",
            str(path),
            "--set",
            "network_rank=big",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --set: network_rank: expected an integer, got 'big'"


def test_overrides_are_yaml_scalars():
    assert parse_overrides(["network_rank=8", "gradient_checkpointing=false", "validation_prompts=[a, b]"]) == {
        "network_rank": 8,
        "gradient_checkpointing": False,
        "validation_prompts": ["a", "b"],
    }


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"learning_rat": 1e-4}, r"test.yaml: unknown key 'learning_rat'; did you mean 'learning_rate'\?"),
        ({"network_rank": "big"}, r"test.yaml: network_rank: expected an integer, got 'big'"),
        ({"gradient_checkpointing": "yes"}, r"gradient_checkpointing: expected true or false"),
        (
            {"model_flavour": "turbo"},
            r"model_flavour: unknown flavour 'turbo' for chroma; choose one of base, hd, flash",
        ),
        (
            {"mixed_precision": "bf15"},
            r"mixed_precision: 'bf15' is not one of no, fp16, bf16 \(did you mean 'bf16'\?\)",
        ),
        ({"resolution": 500}, r"resolution: must be a multiple of 16, got 500"),
        ({"flux_lora_target": "everything"}, r"flux_lora_target: 'everything' is not one of"),
        (
            {"base_model_precision": "int3"},
            r"base_model_precision: unknown precision 'int3'; choose one of no_change, fp8-quanto, int4-quanto, int8-quanto, nf4-bnb",
        ),
        ({"flux_fast_schedule": True}, r"flux_fast_schedule: must stay off for Chroma"),
        ({"validation_init_image": "x.png"}, r"validation_init_image: x.png: cannot read it as an image: "),
        ({"model_family": "flux"}, r"model_family: this config is for flux, not chroma; use --plugin flux"),
        ({"model_family": "sd5"}, r"model_family: 'sd5' contradicts --plugin chroma"),
        (  # a Flux config: its family is named before its keys (Chroma reads validation_guidance as an alias)
            {"model_family": "flux", "validation_guidance": 3.5, "validation_guidance_real": 1.0},
            r"test.yaml: model_family: this config is for flux, not chroma; use --plugin flux",
        ),
        (
            {"lora_rank": 4, "network_rank": 8},
            r"'lora_rank' and 'network_rank' are the same key \(network_rank\); keep one",
        ),
        ({"model_type": "dreambooth"}, r"model_type: 'dreambooth' is not one of lora, full"),
    ],
)
def test_config_errors_name_the_key(host, settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        make_config(host, {**MINIMAL, **settings})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("a: [1, 2\n", ".yaml", r"invalid YAML at line \d+"),
        ('{"a": 1,, }', ".json", r"invalid JSON at line 1 column \d+"),
        ("- a\n- b\n", ".yaml", r"the top level must be a mapping"),
        ("a: 1", ".toml", r"unknown extension '.toml'"),
    ],
)
def test_malformed_files_are_one_line_errors(tmp_path, text, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        read_config_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_ignored_settings_warn_for_chroma(host):
    warnings: list[str] = []
    make_config(
        host,
        {**MINIMAL, "flow_schedule_shift": 3.0, "flow_schedule_auto_shift": False, "flux_guidance_mode": "constant"},
        warnings,
    )
    assert any("flow_schedule_shift is ignored by chroma: Chroma remaps sigmas itself" in w for w in warnings)
    assert any("flow_schedule_auto_shift is ignored by chroma: Chroma remaps sigmas itself" in w for w in warnings)
    assert any("flux_guidance_mode is ignored by chroma: Chroma has no guidance embedding" in w for w in warnings)


def test_defaults_do_not_warn(host):
    warnings: list[str] = []
    make_config(host, dict(MINIMAL), warnings)
    assert warnings == []


def test_cli_config_error_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data_dir: d\nnetwrk_rank: 4\n")
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", "run", "--plugin", "chroma", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {path}: unknown key 'netwrk_rank'; did you mean 'network_rank'?"
    ]


@pytest.mark.parametrize(
    ("given", "sizes"),
    [
        (512, [[512, 512]]),
        ("768x1344", [[768, 1344]]),
        ("1024x1024, 1344X768", [[1024, 1024], [1344, 768]]),
        ([512, "768x1344", [1344, 768]], [[512, 512], [768, 1344], [1344, 768]]),
    ],
)
def test_validation_resolution_takes_sizes(host, given, sizes):
    assert make_config(host, {**MINIMAL, "validation_resolution": given}).validation_resolution == sizes


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("500x512", r"validation_resolution: 500x512: each side must be at least 16 and a multiple of 16"),
        ("wide", r"validation_resolution: expected a size \(512\), WIDTHxHEIGHT \(768x1344\) or a list of them"),
        ([[1, 2, 3]], r"validation_resolution: expected a size"),
    ],
)
def test_bad_validation_sizes_are_one_line(host, given, message):
    with pytest.raises(ConfigError, match=message):
        make_config(host, {**MINIMAL, "validation_resolution": given})
