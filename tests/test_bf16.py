"""The whole path under mixed_precision: bf16, as users run it on a GPU, for every base precision
and both families: cache, train, checkpoint, resume (bit-exact), save, self-test, validation, and
`tuner sample` from the recipe. The rest of the suite runs fp32 (bf16 matmuls are ~20x slower on
this CPU); on the tiny models bf16 costs little, and dtype mistakes hide exactly here."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .conftest import base_settings, train

PRECISIONS = ["no_change", "int8-quanto", "int4-quanto", "nf4-bnb", "fp8-quanto"]


@pytest.mark.parametrize("family", ["chroma", "flux"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_bf16_end_to_end(family, precision, tiny_chroma, tiny_flux, shapes_dir, tmp_path):
    from typer.testing import CliRunner

    from tuner.core.cli import app

    model = tiny_chroma if family == "chroma" else tiny_flux
    settings = {
        **base_settings(model, shapes_dir, tmp_path, family=family),
        "mixed_precision": "bf16",
        "base_model_precision": precision,
        "gradient_checkpointing": True,
        "train_batch_size": 2,
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "validation_prompts": ["a red circle"],
        "validation_num_inference_steps": 2,
        "lora_format": "all",
    }
    straight, _, _ = train({**settings, "output_dir": str(tmp_path / "straight")})
    half, _, _ = train({**settings, "max_train_steps": 2})
    resumed, _, _ = train({**settings, "resume_from_checkpoint": "latest"})
    assert resumed.resumed_from.name == "checkpoint-2"
    assert half.losses + resumed.losses == straight.losses  # bit-exact in bf16 too
    assert all(torch.isfinite(torch.tensor(straight.losses)))

    out = tmp_path / "out"
    assert len(resumed.lora_files) == 2  # diffusers and ComfyUI, each reread by the self-test
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert {t.dtype for t in lora.values()} == {torch.float32}  # adapters train and save in fp32
    reference = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(lora[k], reference[k]) for k in reference)

    validation = out / "validation" / "step_000004" / "00.png"
    rendered = CliRunner().invoke(app, ["sample", "--recipe", str(out / "recipe.json"), "--out", str(tmp_path / "s")])
    assert rendered.exit_code == 0, rendered.output
    sample = next((tmp_path / "s").glob("00_*.png"))
    assert list(Image.open(sample).getdata()) == list(Image.open(validation).getdata())  # the recipe reproduces it
