"""Coming from SimpleTuner: its config.json and multidatabackend.json, run as they are or converted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tuner.core.config import simpletuner
from tuner.core.config.build import build_config
from tuner.core.config.values import read_config_file
from tuner.core.data.images import scan_dataset
from tuner.core.errors import ConfigError
from tuner.core.host.manager import PluginHost

from .conftest import REPO


def write_simpletuner(tmp_path, tiny_chroma, shapes_dir, backend_extra=None, **config_extra):
    backends = [
        {
            "id": "shapes",
            "type": "local",
            "instance_data_dir": str(shapes_dir),
            "caption_strategy": "filename",
            "resolution": 64,
            "resolution_type": "pixel",
            "crop": True,
            "crop_style": "center",
            "crop_aspect": "square",
            "repeats": 1,
            "cache_dir_vae": str(tmp_path / "cache" / "vae"),
            **(backend_extra or {}),
        },
        {
            "id": "text",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(tmp_path / "cache" / "text"),
        },
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    config = {
        "--model_type": "lora",
        "--model_family": "chroma",
        "--pretrained_model_name_or_path": str(tiny_chroma),
        "--output_dir": str(tmp_path / "out"),
        "--lora_rank": 4,
        "--learning_rate": 1e-3,
        "--max_train_steps": 2,
        "--train_batch_size": 2,
        "--mixed_precision": "no",
        "--tokenizer_max_length": 16,
        "--validation_guidance": 3.0,
        "--optimizer": "adamw_bf16",
        "--lr_scheduler": "constant_with_warmup",
        "--data_backend_config": "multidatabackend.json",
        "--tracker_project_name": "demo",
        "--my_own_flag": 1,
        **config_extra,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_keys_are_mapped_ignored_or_listed(tmp_path, tiny_chroma, shapes_dir):
    path = write_simpletuner(tmp_path, tiny_chroma, shapes_dir)
    settings, notes = simpletuner.load(path, PluginHost("chroma"))
    assert settings["data_dir"] == str(shapes_dir) and settings["caption_strategy"] == "filename"
    assert settings["dataset_repeats"] == 1 and settings["resolution"] == 64
    assert settings["lora_rank"] == 4 and settings["lr_scheduler"] == "constant_with_warmup"
    assert settings["optimizer"] == "adamw"
    assert settings["cache_dir"] == str(tmp_path / "cache" / "text")
    assert notes == [
        "optimizer 'adamw_bf16': tuner's adamw keeps the adapter and its state in fp32 (same algorithm)",
        f"cache_dir_vae: tuner keeps latents and text embeddings in one cache_dir ({tmp_path / 'cache' / 'text'}), "
        "in its own layout; SimpleTuner's caches are not reused",
        "ignored SimpleTuner key(s) with no effect in tuner: tracker_project_name",
        "ignored SimpleTuner key(s) tuner does not know; check they do not matter: my_own_flag",
    ]
    config = build_config(PluginHost("chroma"), settings, str(path), warn=lambda m: None)
    assert config.network_rank == 4 and config.validation_guidance_real == 3.0


@pytest.mark.parametrize(
    ("given", "name", "note"),
    [
        ("bnb-adamw8bit", "adamw8bit", None),
        ("prodigy", "prodigy", None),
        ("adafactor", "adafactor", None),
        ("optimi-lion", "lion", "offered by a plugin"),
        ("soap", "soap", "a run accepts it only when an installed plugin registers it"),
    ],
)
def test_optimizers_carry_over_by_tuners_name(tmp_path, tiny_chroma, shapes_dir, given, name, note):
    path = write_simpletuner(
        tmp_path, tiny_chroma, shapes_dir, **{"--optimizer": given, "--optimizer_config": "d_coef=2"}
    )
    settings, notes = simpletuner.load(path, PluginHost("chroma"))
    assert (settings["optimizer"], settings["optimizer_config"]) == (name, "d_coef=2")
    said = [n for n in notes if n.startswith(f"optimizer {given!r}")]
    assert (note in said[0]) if note else not said


def test_ema_and_scheduled_sampling_carry_over_and_what_differs_is_said(tmp_path, tiny_chroma, shapes_dir):
    given = {
        "--use_ema": True,
        "--ema_decay": 0.99,
        "--ema_validation": "ema_only",
        "--scheduled_sampling_max_step_offset": 3,
        "--scheduled_sampling_probability": 0.25,
        "--scheduled_sampling_strategy": "biased_late",
        "--scheduled_sampling_sampler": "unipc",
        "--scheduled_sampling_order": 2,
    }
    path = write_simpletuner(tmp_path, tiny_chroma, shapes_dir, **given)
    settings, notes = simpletuner.load(path, PluginHost("chroma"))
    config = build_config(PluginHost("chroma"), settings, str(path), warn=lambda m: None)
    assert (config.use_ema, config.ema_decay, config.validation_use_ema) == (True, 0.99, True)
    assert (config.scheduled_sampling_max_step_offset, config.scheduled_sampling_strategy) == (3, "biased_late")
    said = " | ".join(notes)
    assert "scheduled_sampling_sampler 'unipc': tuner's rollouts take Euler steps" in said
    assert "scheduled_sampling_reflexflow: tuner applies no ReflexFlow terms" in said  # on by default there
    assert "scheduled_sampling_order" not in said


@pytest.mark.parametrize(
    ("lycoris", "expected"),
    [
        (
            {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
             "apply_preset": {"target_module": ["Attention"]}},
            {"lora_type": "lokr", "network_rank": 10000, "lora_alpha": 10000.0, "lokr_factor": 16},
        ),
        ({"algo": "loha", "linear_dim": 16, "linear_alpha": 8}, {"lora_type": "loha", "network_rank": 16, "lora_alpha": 8.0}),
    ],
)  # fmt: skip
def test_lycoris_configs_become_lokr_or_loha(tmp_path, tiny_chroma, shapes_dir, lycoris, expected):
    (tmp_path / "lycoris.json").write_text(json.dumps(lycoris))
    path = write_simpletuner(
        tmp_path, tiny_chroma, shapes_dir, **{"--lora_type": "lycoris", "--lycoris_config": "lycoris.json"}
    )
    settings, notes = simpletuner.load(path, PluginHost("chroma"))
    assert {k: settings.get(k) for k in expected} == expected
    if "apply_preset" in lycoris:
        assert any("apply_preset not carried over" in n for n in notes)
        assert any("lora_alpha is set to the rank" in n for n in notes)
    dora = write_simpletuner(tmp_path, tiny_chroma, shapes_dir, **{"--use_dora": True})
    assert simpletuner.load(dora, PluginHost("chroma"))[0]["lora_type"] == "dora"


def test_filename_captions():
    items = scan_dataset(REPO / "examples" / "data" / "shapes", print, "filename")
    assert items[0].caption == "00 red circle"


@pytest.mark.parametrize(
    ("config_extra", "backend_extra", "message"),
    [
        ({"--snr_gamma": 5.0}, None, "snr_gamma: tuner does not weight the loss by SNR"),
        ({"--lora_type": "lycoris"}, None, "lora_type: lycoris needs lycoris_config"),
        ({"--lora_type": "glora"}, None, "lora_type: tuner trains standard"),
        ({}, {"crop_style": "face"}, "crop_style 'face'; tuner crops center or random"),
        (
            {},
            {"caption_strategy": "parquet"},
            "caption_strategy 'parquet'; tuner supports textfile, filename and instanceprompt",
        ),
        ({}, {"type": "aws"}, "type 'aws'; tuner reads local folders only"),
    ],
)
def test_what_tuner_cannot_honour_is_refused(tmp_path, tiny_chroma, shapes_dir, config_extra, backend_extra, message):
    path = write_simpletuner(tmp_path, tiny_chroma, shapes_dir, backend_extra, **config_extra)
    with pytest.raises(ConfigError, match=message):
        simpletuner.load(path, PluginHost("chroma"))


@pytest.mark.slow
def test_tuner_run_takes_the_simpletuner_config_and_convert_config_writes_the_equivalent(
    tmp_path, tiny_chroma, shapes_dir
):
    path = write_simpletuner(tmp_path, tiny_chroma, shapes_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", "run", "--config", str(path)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ignored SimpleTuner key(s) with no effect in tuner: tracker_project_name" in out.stderr
    assert "training 24 images" in out.stdout  # 12 images, repeats: 1
    converted = tmp_path / "tuner.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", "convert-config", str(path), "-o", str(converted)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    settings = yaml.safe_load(converted.read_text())
    assert settings["caption_strategy"] == "filename" and settings["data_dir"] == str(shapes_dir)
    build_config(PluginHost("chroma"), read_config_file(converted), str(converted), warn=lambda m: None)


def test_a_backends_bucket_settings_map_to_tuner_keys(tmp_path, tiny_chroma, shapes_dir):
    backend = {
        "resolution_type": "area",  # SimpleTuner's area sizes are megapixels
        "resolution": 0.25,
        "minimum_image_size": 0.0625,
        "crop_aspect": "preserve",
        "crop_style": "random",
    }
    path = write_simpletuner(tmp_path, tiny_chroma, shapes_dir, backend)
    settings, _ = simpletuner.load(path, PluginHost("chroma"))
    assert settings["resolution_type"] == "area" and settings["resolution"] == 496  # a 500 px square, to 16
    assert settings["minimum_image_size"] == 256 and settings["crop_style"] == "random"
    assert "aspect_bucket_max_ratio" not in settings  # buckets at each image's aspect
    (tmp_path / "sq").mkdir()
    square, _ = simpletuner.load(write_simpletuner(tmp_path / "sq", tiny_chroma, shapes_dir), PluginHost("chroma"))
    assert square["aspect_bucket_max_ratio"] == 1.0 and square["resolution_type"] == "pixel"


def test_convert_config_reports_every_refusal_at_once_and_names_its_input(tmp_path, tiny_chroma, shapes_dir):
    from typer.testing import CliRunner

    from tuner.core.cli import app

    path = write_simpletuner(tmp_path, tiny_chroma, shapes_dir, **{"--lr_scheduler": "sine", "--snr_gamma": 5.0})
    result = CliRunner().invoke(app, ["convert-config", str(path), "-o", str(tmp_path / "t.yaml")])
    assert str(result.exception) == (
        f"{path}: cannot convert 2 key(s): lr_scheduler: tuner offers constant, constant_with_warmup, linear, "
        "cosine, cosine_with_restarts and polynomial, not 'sine'; snr_gamma: tuner does not weight the loss by SNR "
        "(got 5.0)"
    )
    path = write_simpletuner(tmp_path, tiny_chroma, shapes_dir, **{"--lora_rank": "abc"})
    result = CliRunner().invoke(app, ["convert-config", str(path), "-o", str(tmp_path / "t.yaml")])
    assert str(result.exception).startswith(f"{path}: network_rank: expected an integer")  # the input, not t.yaml
    path = write_simpletuner(tmp_path, tiny_chroma, shapes_dir)
    result = CliRunner().invoke(app, ["convert-config", str(path), "-o", str(tmp_path / "t.yaml")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.yaml").read_text().startswith(f"# written by `tuner convert-config` from {path};")


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ({"caption_strategy": "instanceprompt", "instance_prompt": "sks shape"}, {"instance_prompt": "sks shape"}),
        ({"only_instance_prompt": True, "instance_prompt": "sks"}, {"caption_strategy": "instanceprompt"}),
        (
            {"caption_strategy": "textfile", "prepend_instance_prompt": True, "instance_prompt": "sks"},
            {"caption_prefix": "sks"},
        ),
    ],
)
def test_instance_prompts_map_to_tuners_caption_keys(tmp_path, tiny_chroma, shapes_dir, backend, expected):
    settings, _ = simpletuner.load(write_simpletuner(tmp_path, tiny_chroma, shapes_dir, backend), PluginHost("chroma"))
    entry = settings["datasets"][0] if "datasets" in settings else settings
    assert {k: entry.get(k) for k in expected} == expected, settings
