"""Shared fixtures: a tiny random Chroma written in diffusers layout, a small dataset, run helpers.

Everything runs on the CPU in fp32, offline. diffusers is imported once per session.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# One thread count for the whole suite (and the runs it starts), so in-process runs compared bit
# for bit never differ by threads; how a run chooses its threads is tested in test_reliability.py.
# Under pytest-xdist (-n auto) the cores are shared out: two workers at two threads each on two
# cores compete for every core and torch collapses (minutes instead of seconds).
# The controller process sets it too and its workers inherit that, so a value this file set (marked)
# is replaced in each worker; one the user set is kept.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if "OMP_NUM_THREADS" not in os.environ or os.environ.get("TUNER_TEST_THREADS") == os.environ["OMP_NUM_THREADS"]:
    os.environ["OMP_NUM_THREADS"] = os.environ["TUNER_TEST_THREADS"] = str(
        max(1, len(os.sched_getaffinity(0)) // _workers)
    )

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_chroma(tmp_path_factory) -> Path:
    """A random miniature Chroma pipeline saved with save_pretrained (loaded via from_pretrained)."""
    from tuner.plugins.chroma.tiny import build_tiny_chroma

    return build_tiny_chroma(tmp_path_factory.mktemp("models") / "tiny-chroma", seed=0)


@pytest.fixture(scope="session")
def kit_model(tmp_path_factory) -> Path:
    """tuner.testing's own miniature family, as a third party's tests build it."""
    from tuner.testing.family import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "kit-model")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A random miniature Flux.1 dev (guidance embedding) in diffusers layout."""
    from tuner.plugins.flux.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux", seed=0)


@pytest.fixture(scope="session")
def tiny_flux2(tmp_path_factory) -> Path:
    """A random miniature Flux.2 klein (Qwen3, the batch-normalised VAE) in diffusers layout."""
    from tuner.plugins.flux2.tiny import build_tiny_flux2

    return build_tiny_flux2(tmp_path_factory.mktemp("models") / "tiny-flux2", seed=0)


@pytest.fixture(scope="session")
def tiny_flux2_dev(tmp_path_factory) -> Path:
    """A random miniature Flux.2 dev (Mistral3 encoder, guidance embedding) in diffusers layout."""
    from tuner.plugins.flux2.tiny import build_tiny_flux2

    return build_tiny_flux2(tmp_path_factory.mktemp("models") / "tiny-flux2-dev", seed=0, flavour="dev")


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory) -> Path:
    """A random miniature Qwen-Image (Qwen2.5-VL, the 3D VAE) in diffusers layout."""
    from tuner.plugins.qwen_image.tiny import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("models") / "tiny-qwen-image", seed=0)


@pytest.fixture(scope="session")
def tiny_schnell(tmp_path_factory) -> Path:
    """A random miniature Flux.1 schnell: no guidance embedding."""
    from tuner.plugins.flux.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-schnell", seed=0, guidance_embeds=False)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from tuner.testing import shapes_dataset

    return shapes_dataset(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="session")
def mixed_dir(tmp_path_factory) -> Path:
    """The 12 squares plus 4 images at 2:1 and 4 at 1:2: three aspect-ratio buckets."""
    from tuner.testing import shapes_dataset

    return shapes_dataset(tmp_path_factory.mktemp("data") / "mixed", size=64, wide_and_tall=4)


@pytest.fixture
def one_image_dir(tmp_path, shapes_dir) -> Path:
    """A dataset of a single captioned image: an overfit batch."""
    folder = tmp_path / "one"
    folder.mkdir()
    for suffix in (".png", ".txt"):
        (folder / f"00_red_circle{suffix}").write_bytes((shapes_dir / f"00_red_circle{suffix}").read_bytes())
    return folder


def base_settings(model: Path, data: Path, tmp_path: Path, family: str = "chroma") -> dict[str, Any]:
    return {
        "model_family": family,
        "pretrained_model_name_or_path": str(model),
        "data_dir": str(data),
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "resolution": 64,
        "tokenizer_max_length": 16,
        "network_rank": 4,
        "lora_alpha": 8,
        "learning_rate": 1e-3,
        "train_batch_size": 1,
        "max_train_steps": 4,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "memory_estimate": False,  # tested in test_estimate.py
        "seed": 0,
    }


def make_host(*extra_plugins: tuple[str, object], family: str = "chroma"):
    from tuner.core.host.manager import PluginHost

    return PluginHost(family, extra_plugins=extra_plugins)


def make_config(host, settings: dict[str, Any], warnings: list[str] | None = None):
    from tuner.core.config.build import build_config

    return build_config(host, settings, "test.yaml", warn=(warnings.append if warnings is not None else None))


def train(settings: dict[str, Any], *extra_plugins: tuple[str, object], warnings: list[str] | None = None):
    """Run training through the plugin host, the way `tuner run` does; returns (result, host, config)."""
    from tuner.core.run.trainer import Trainer

    host = make_host(*extra_plugins, family=settings.get("model_family", "chroma"))
    config = make_config(host, settings, warnings)
    sink = warnings.append if warnings is not None else (lambda message: None)
    return Trainer(host, config, warn=sink).train(), host, config
