"""tuner configure: answers from stdin, bad answers asked again, a config tuner run accepts."""

from __future__ import annotations

import subprocess
import sys

import yaml

from tuner.core.config.build import build_config
from tuner.core.config.values import read_config_file
from tuner.core.host.manager import PluginHost


def configure(answers: str, *args: str):
    return subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", "configure", *args], input=answers, capture_output=True, text=True
    )


def test_piped_answers_write_a_config_that_tuner_run_accepts(tmp_path):
    path = tmp_path / "mine.yaml"
    # family, flavour, data_dir, output_dir, resolution (bad, then good), rank (bad, then good), the rest default
    answers = "chroma\nturbo\nhd\n/data/set\n\n500\n512\nabc\n8\n\n\n\n\n\na cat; a dog\n\n3.5\n"
    out = configure(answers, "--output", str(path))
    assert out.returncode == 0, out.stderr[-1500:]
    assert "resolution: must be a multiple of 16, got 500; try again" in out.stdout
    assert "network_rank: expected an integer, got 'abc'; try again" in out.stdout
    assert "model_flavour: 'turbo' is not one of base, hd, flash; try again" in out.stdout
    settings = yaml.safe_load(path.read_text())
    assert settings == {
        "model_type": "lora",
        "model_family": "chroma",
        "model_flavour": "hd",
        "data_dir": "/data/set",
        "network_rank": 8,
        "validation_prompts": ["a cat", "a dog"],
        "validation_guidance_real": 3.5,
    }
    config = build_config(PluginHost("chroma"), read_config_file(path), str(path), warn=lambda m: None)
    assert config.network_rank == 8 and config.model_flavour == "hd"


def test_defaults_without_questions_write_a_config_that_runs(tmp_path):
    path = tmp_path / "flux.yaml"
    out = configure("", "--plugin", "flux", "--defaults", "--output", str(path))
    assert out.returncode == 2 and not path.exists()
    assert out.stderr.strip() == (
        "error: --defaults writes a config that runs: give --data-dir FOLDER (data_dir has no default)"
    )
    out = configure("", "--plugin", "flux", "--defaults", "--data-dir", "/data/set", "--output", str(path))
    assert out.returncode == 0, out.stderr[-1500:]
    assert yaml.safe_load(path.read_text()) == {
        "model_type": "lora",
        "model_family": "flux",
        "model_flavour": "dev",
        "data_dir": "/data/set",
    }


def test_input_that_ends_before_data_dir_is_one_line(tmp_path):
    out = configure("chroma\n\n", "--output", str(tmp_path / "c.yaml"))  # family, flavour, then nothing
    assert out.returncode == 2, out.stdout[-500:]
    assert out.stderr.strip().splitlines()[-1] == "error: configure: input ended at the question 'data_dir'"


def test_a_third_party_familys_keys_are_asked_without_changes_to_the_wizard(tmp_path):
    out = configure("\n/data\n" + "\n" * 20, "--plugin", "sd3", "--output", str(tmp_path / "sd3.yaml"))
    assert out.returncode == 0, out.stderr[-1500:]
    assert "sd3_lora_target [attention|all|all+ffs]" in out.stdout
    assert "model_flavour [3.5-medium|3.5-large|3-medium]" in out.stdout


def test_defaults_without_a_plugin_ask_nothing_and_an_existing_file_is_kept(tmp_path):
    from typer.testing import CliRunner

    from tuner.core.cli import app

    path = tmp_path / "config.yaml"
    asked = CliRunner().invoke(
        app, ["configure", "--defaults", "--data-dir", str(tmp_path), "--output", str(path)], input=""
    )
    assert asked.exit_code == 0, asked.output
    assert "family: chroma (the default; choose another with --plugin)" in asked.output
    assert yaml.safe_load(path.read_text())["model_family"] == "chroma"
    path.write_text("mine: true\n")
    again = CliRunner().invoke(app, ["configure", "--defaults", "--data-dir", str(tmp_path), "--output", str(path)])
    # main() prints a ConfigError as one line and exits 2; the app alone hands it back
    assert f"{path} exists; choose another --output or add --force" in str(again.exception)
    assert path.read_text() == "mine: true\n"  # untouched
    forced = ["configure", "--defaults", "--data-dir", str(tmp_path), "--output", str(path), "--force"]
    assert CliRunner().invoke(app, forced).exit_code == 0
    assert yaml.safe_load(path.read_text())["model_family"] == "chroma"
