"""docs/tutorial.md is followable alone: its code blocks, assembled in order into an empty folder,
are the package in examples/tuner-sd3, every Python file compiles as pasted, and the package,
installed from that folder, trains from the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

EXAMPLE = REPO / "examples" / "tuner-sd3"
# a fenced block whose first line names the file it belongs to
BLOCK = re.compile(r"```\w*\n# file: (\S+)\n(.*?)```", re.S)


def assemble(folder: Path) -> dict[str, str]:
    """Write the tutorial's files into ``folder``: the blocks of one file, in order."""
    parts: dict[str, list[str]] = {}
    for path, body in BLOCK.findall((REPO / "docs" / "tutorial.md").read_text()):
        parts.setdefault(path, []).append(body.strip("\n"))
    files = {path: "\n\n\n".join(chunks) + "\n" for path, chunks in parts.items()}
    for path, text in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    return files


def test_the_tutorial_assembles_into_the_example_package(tmp_path):
    files = assemble(tmp_path)
    package = {
        "pyproject.toml",
        "sd3-tiny.yaml",
        *(f"tuner_sd3/{n}.py" for n in ("__init__", "plugin", "model", "tiny")),
    }
    assert package | {"tests/test_contract.py"} == set(files)
    for path in package:  # the example is what the tutorial builds, to the byte
        assert files[path] == (EXAMPLE / path).read_text(), f"docs/tutorial.md and examples/tuner-sd3/{path} differ"
    for path, text in files.items():
        if path.endswith(".py"):
            compile(text, path, "exec")  # valid Python when pasted


@pytest.mark.slow
def test_the_tutorial_package_installs_and_trains(tmp_path):
    source, site = tmp_path / "tuner-sd3", tmp_path / "site"
    assemble(source)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", site, source],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    # the installed copy comes first on the path: its distribution shadows the editable example's
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import tuner_sd3; print(tuner_sd3.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert where.stdout.strip().startswith(str(site))
    cli = [sys.executable, "-m", "tuner.core.cli"]
    model = tmp_path / "tiny-sd3"
    subprocess.run([*cli, "sd3-make-tiny", str(model)], check=True, capture_output=True, env=env)
    from tuner.testing import shapes_dataset

    overrides = {
        "pretrained_model_name_or_path": model,
        "data_dir": shapes_dataset(tmp_path / "data", size=64),
        "output_dir": tmp_path / "out",
        "cache_dir": tmp_path / "cache",
        "max_train_steps": 2,
        "validation_num_inference_steps": 2,
    }
    args = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    out = subprocess.run(
        [*cli, "run", "--plugin", "sd3", "--config", source / "sd3-tiny.yaml", *args],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "self-test passed" in out.stdout
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
