"""tuner sample and recipes: the validation images, reproduced exactly with tuner and with diffusers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO, base_settings, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained_run(tiny_chroma, shapes_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    settings = base_settings(tiny_chroma, shapes_dir, tmp)
    settings.update(
        max_train_steps=6,
        learning_rate=5e-3,
        lora_alpha=12,
        validation_prompts=["a red circle on a white background", "a blue square"],
        validation_negative_prompt="blurry",
        validation_num_inference_steps=3,
        validation_seed=7,
    )
    train(settings)
    return tmp / "out"


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def cli(*args, cwd=REPO):
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", *args], capture_output=True, text=True, env=ENV, cwd=cwd
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def cli_here(*args):
    """``tuner`` in this process: where the process boundary is not what a test is about."""
    from typer.testing import CliRunner

    from tuner.core.cli import app

    out = CliRunner().invoke(app, list(args))
    assert out.exit_code == 0, out.output[-2000:]
    return out


def test_the_recipe_records_what_validation_used(trained_run):
    recipe = json.loads((trained_run / "recipe.json").read_text())
    assert recipe["prompts"] == ["a red circle on a white background", "a blue square"]
    assert recipe["seeds"] == [7, 8] and recipe["steps"] == 3 and recipe["negative_prompt"] == "blurry"
    assert recipe["guidance_key"] == "validation_guidance_real" and recipe["guidance"] == 4.0
    assert recipe["width"] == 64 and recipe["lora_file"].endswith("pytorch_lora_weights.safetensors")
    assert "tuner sample --recipe" in (trained_run / "README.md").read_text()


def test_tuner_sample_with_the_recipe_reproduces_validation_exactly(trained_run, tmp_path):
    cli("sample", "--recipe", str(trained_run / "recipe.json"), "--out", str(tmp_path))
    for index, seed in enumerate((7, 8)):
        ours = (tmp_path / f"{index:02d}_seed{seed}.png").read_bytes()
        assert ours == (trained_run / "validation" / "step_000006" / f"{index:02d}.png").read_bytes()


def test_the_readme_snippet_reproduces_validation_with_diffusers_alone(trained_run, tmp_path):
    snippet = re.search(r"```python\n(.*?)```", (trained_run / "README.md").read_text(), re.S).group(1)
    assert "tuner" not in snippet.replace("tuner_training", "")  # diffusers only
    subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, check=True, env=ENV, capture_output=True)
    for index, seed in enumerate((7, 8)):
        validation = pixels(trained_run / "validation" / "step_000006" / f"{index:02d}.png")
        assert np.abs(pixels(tmp_path / f"sample_{seed}.png") - validation).max() <= 1


def test_sample_options_and_lora_scale(trained_run, tiny_chroma, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"pretrained_model_name_or_path: {tiny_chroma}\nresolution: 64\ntokenizer_max_length: 16\n"
        "mixed_precision: 'no'\n"
    )
    common = [
        "--plugin",
        "chroma",
        "--config",
        str(config),
        "--prompt",
        "a green triangle",
        "--seed",
        "3",
        "--steps",
        "2",
        "--guidance",
        "1.0",
    ]
    cli_here("sample", *common, "--out", str(tmp_path / "base"))
    cli_here(
        "sample",
        *common,
        "--lora",
        str(trained_run / "pytorch_lora_weights.safetensors"),
        "--lora-scale",
        "0",
        "--out",
        str(tmp_path / "off"),
    )
    cli_here(
        "sample",
        *common,
        "--lora",
        str(trained_run / "pytorch_lora_weights.safetensors"),
        "--out",
        str(tmp_path / "on"),
    )
    base, off, on = (pixels(tmp_path / d / "00_seed3.png") for d in ("base", "off", "on"))
    assert np.array_equal(base, off)  # scale 0 is the base model
    assert not np.array_equal(base, on)


def test_validation_at_several_sizes_is_reproduced_by_the_recipe(tiny_chroma, mixed_dir, tmp_path):
    """Users see the LoRA at the shapes they trained; `tuner sample --recipe` renders them all again."""
    from typer.testing import CliRunner

    from tuner.core.cli import app

    settings = base_settings(tiny_chroma, mixed_dir, tmp_path)
    settings.update(
        max_train_steps=2,
        aspect_bucket_alignment=16,
        validation_prompts=["a red circle"],
        validation_resolution="64x64,96x48",
        validation_num_inference_steps=2,
    )
    train(settings)
    folder = tmp_path / "out" / "validation" / "step_000002"
    assert Image.open(folder / "00_96x48.png").size == (96, 48)
    assert Image.open(folder / "grid_64x64.png").size == (64, 64)
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["sizes"] == [[64, 64], [96, 48]] and (recipe["width"], recipe["height"]) == (64, 64)
    result = CliRunner().invoke(
        app, ["sample", "--recipe", str(tmp_path / "out" / "recipe.json"), "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    for size in ("64x64", "96x48"):
        assert np.array_equal(pixels(tmp_path / "s" / f"00_seed0_{size}.png"), pixels(folder / f"00_{size}.png"))


def test_sample_says_it_renders_the_base_model_and_refuses_a_missing_lora(tiny_chroma, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import tuner.core.run.sampling
    from tuner.core.cli import app
    from tuner.core.errors import ConfigError

    rendered = []
    monkeypatch.setattr(
        tuner.core.run.sampling,
        "render",
        lambda host, cfg, prompts, seeds, lora, sizes, scale: rendered.append(lora) or [[Image.new("RGB", (8, 8))]],
    )
    common = ["sample", "--plugin", "chroma", "--prompt", "a red circle", "--out", str(tmp_path / "out")]
    common += ["--set", f"pretrained_model_name_or_path={tiny_chroma}", "--set", "mixed_precision=no"]
    base = CliRunner().invoke(app, common)
    assert base.exit_code == 0, base.output
    assert "no --lora: rendering the base model" in base.output and rendered == [None]
    missing = CliRunner().invoke(app, [*common, "--lora", str(tmp_path / "gone.safetensors")])
    assert isinstance(missing.exception, ConfigError) and "gone.safetensors: no such file" in str(missing.exception)
    assert rendered == [None]  # nothing was loaded for it


def test_tuner_sample_with_swapped_blocks_renders_what_validation_rendered(trained_run, tmp_path, monkeypatch):
    """Sampling with the base's blocks swapped (blocks_to_swap, or fewer with
    validation_blocks_to_swap) goes through the same weights, brought in block by block."""
    from typer.testing import CliRunner

    import tuner.core.model.swap as swap_module
    from tuner.core.cli import app

    swapped = []
    real = swap_module.swap_blocks
    monkeypatch.setattr(
        swap_module, "swap_blocks", lambda model, count, *a: swapped.append(count) or real(model, count, *a)
    )

    recipe = ["sample", "--recipe", str(trained_run / "recipe.json")]
    for name, swap in (
        ("all", ["--set", "blocks_to_swap=3"]),
        ("fewer", ["--set", "blocks_to_swap=3", "--set", "validation_blocks_to_swap=2"]),
    ):
        out = CliRunner().invoke(app, [*recipe, *swap, "--out", str(tmp_path / name)])
        assert out.exit_code == 0, out.output
        for index, seed in enumerate((7, 8)):
            ours = (tmp_path / name / f"{index:02d}_seed{seed}.png").read_bytes()
            assert ours == (trained_run / "validation" / "step_000006" / f"{index:02d}.png").read_bytes(), name
    assert swapped == [3, 2]


def test_chroma_img2img_validation_starts_from_the_init_image_and_the_recipe_reproduces_it(
    tiny_chroma, shapes_dir, tmp_path
):
    """ChromaImg2ImgPipeline renders validation from validation_init_image: another start image
    gives another image, text-to-image a third; `tuner sample --recipe` renders it again exactly."""
    from typer.testing import CliRunner

    from tuner.core.cli import app

    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(
        max_train_steps=2,
        validation_prompts=["a red circle"],
        validation_num_inference_steps=4,
        validation_init_image=str(shapes_dir / "00_red_circle.png"),
        validation_init_strength=0.5,
    )
    train(settings)
    started = pixels(tmp_path / "out" / "validation" / "step_000002" / "00.png")
    train({**settings, "output_dir": str(tmp_path / "t2i"), "validation_init_image": None})
    from_noise = pixels(tmp_path / "t2i" / "validation" / "step_000002" / "00.png")
    recipe = tmp_path / "out" / "recipe.json"
    assert json.loads(recipe.read_text())["settings"]["validation_init_strength"] == 0.5
    assert "ChromaImg2ImgPipeline" in (tmp_path / "out" / "README.md").read_text()
    runner = CliRunner()
    again = runner.invoke(app, ["sample", "--recipe", str(recipe), "--out", str(tmp_path / "s")])
    other = shapes_dir / "05_green_square.png"
    elsewhere = runner.invoke(
        app,
        ["sample", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--set", f"validation_init_image={other}"],
    )
    assert again.exit_code == 0 and elsewhere.exit_code == 0, again.output + elsewhere.output
    assert np.array_equal(pixels(tmp_path / "s" / "00_seed0.png"), started)
    assert np.abs(pixels(tmp_path / "o" / "00_seed0.png") - started).mean() > 2
    assert np.abs(from_noise - started).mean() > 2
