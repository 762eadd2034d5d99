"""model_type: full: every weight of the denoiser trains (the family's frozen modules aside), with
fp32 master weights or bf16 weights and stochastic rounding; the outputs are a diffusers folder and
ComfyUI's single file; checkpoints resume bit for bit; LoRA-only keys are refused."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuner.core.errors import ConfigError, Interrupted
from tuner.core.training.full import stochastic_round

from .conftest import base_settings, make_config, make_host, train
from .test_resume import StopAt, run_trainer


def full_settings(model, data, tmp_path, **extra):
    settings = base_settings(model, data, tmp_path)
    for key in ("network_rank", "lora_alpha"):
        settings.pop(key)
    return {**settings, "model_type": "full", **extra}


def test_stochastic_rounding_keeps_small_updates_and_is_unbiased():
    """An update of a quarter of bf16's last place: round-to-nearest loses it every time, stochastic
    rounding keeps it in expectation (100 updates move the weight by about 25 places); and over
    10,000 draws the rounded mean is the fp32 value."""
    one = torch.ones(1000, dtype=torch.bfloat16)
    ulp = 2.0**-7  # bf16's spacing at 1.0
    g = torch.Generator().manual_seed(0)
    nearest, stochastic = one.clone(), one.clone()
    for _ in range(100):
        nearest = (nearest.float() + ulp / 4).to(torch.bfloat16)
        stochastic = stochastic_round(stochastic.float() + ulp / 4, g)
    assert torch.equal(nearest, one)
    assert (stochastic.float() - 1).mean().item() == pytest.approx(100 * ulp / 4, rel=0.1)
    value = torch.full((10_000,), 1 + 0.3 * ulp)
    rounded = stochastic_round(value, g).float()
    assert set(rounded.unique().tolist()) == {1.0, 1 + ulp}
    assert rounded.mean().item() == pytest.approx(1 + 0.3 * ulp, abs=ulp * 0.02)
    negative = stochastic_round(-value, g).float()
    assert negative.mean().item() == pytest.approx(-(1 + 0.3 * ulp), abs=ulp * 0.02)
    assert torch.isinf(stochastic_round(torch.tensor([float("inf")]), g)).all()


def width_converter(family: str, inner_dim: int):
    """diffusers 0.42's convert_<family>_transformer_checkpoint_to_diffusers with the model's width:
    the function hard-codes the real model's (inner_dim = 3072), so a tiny model's file cannot pass
    through from_single_file (the test below shows it). Its own code, with the one constant changed."""
    from diffusers.loaders import single_file_utils

    name = f"convert_{family}_transformer_checkpoint_to_diffusers"
    source = inspect.getsource(getattr(single_file_utils, name))
    assert "    inner_dim = 3072\n" in source  # when this fails, diffusers reads the width itself
    namespace = dict(vars(single_file_utils))
    exec(source.replace("    inner_dim = 3072\n", f"    inner_dim = {inner_dim}\n"), namespace)  # noqa: S102
    return namespace[name]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_chroma, shapes_dir):
    folder = tmp_path_factory.mktemp("full")
    settings = full_settings(
        tiny_chroma,
        shapes_dir,
        folder,
        max_train_steps=30,
        train_batch_size=2,
        validation_prompt="a red circle",
        validation_num_inference_steps=2,
        validation_steps=30,
    )
    warnings: list[str] = []
    result, host, config = train(settings, warnings=warnings)
    return result, host, config, folder


def test_a_full_fine_tune_lowers_the_loss_and_writes_a_folder_and_a_comfyui_file(full_run, tiny_chroma):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    result, host, config, folder = full_run
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.9 * first, (first, last)
    out = Path(config.output_dir)
    trained = ChromaTransformer2DModel.from_pretrained(out / "transformer")
    base = ChromaTransformer2DModel.from_pretrained(tiny_chroma, subfolder="transformer")
    after, before = trained.state_dict(), base.state_dict()
    frozen = [k for k in after if k.startswith("distilled_guidance_layer.")]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # Chroma's approximator
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert len(changed) == len(after) - len(frozen)  # every other tensor trained
    # the family's pipeline takes the folder as its transformer
    pipe = ChromaPipeline.from_pretrained(tiny_chroma, transformer=trained)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert (result.validation_dirs[-1] / "00.png").is_file()
    # ComfyUI's single file: diffusers' own converter reads it back to the same tensors
    single = load_file(out / "chroma_comfyui.safetensors")
    assert all(k.startswith("model.diffusion_model.") for k in single)
    with pytest.raises(RuntimeError, match="split"):  # diffusers' converter assumes Chroma's 3072 width
        convert_chroma_transformer_checkpoint_to_diffusers(dict(single))
    converted = width_converter("chroma", trained.inner_dim)(dict(single))
    assert set(converted) == set(after)
    assert all(torch.equal(converted[k], after[k]) for k in after)


def test_resume_is_bit_exact_with_fp32_masters_and_with_stochastic_rounding(tiny_chroma, one_image_dir, tmp_path):
    def run(folder, *plugins, **extra):
        settings = full_settings(
            tiny_chroma, one_image_dir, folder, max_train_steps=4, checkpointing_steps=2, seed=3, **extra
        )
        return run_trainer(settings, *plugins, warnings=[])

    for name, extra in (("fp32", {}), ("sr", {"mixed_precision": "bf16", "bf16_stochastic_rounding": True})):
        run(tmp_path / name / "a", **extra)
        stop = StopAt(2)
        with pytest.raises(Interrupted):
            run(tmp_path / name / "b", ("stop", stop), **extra)
        run(tmp_path / name / "b", resume_from_checkpoint="latest", **extra)
        straight = load_file(next((tmp_path / name / "a" / "out" / "transformer").glob("*.safetensors")))
        resumed = load_file(next((tmp_path / name / "b" / "out" / "transformer").glob("*.safetensors")))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name
        dtype = torch.bfloat16 if extra else torch.float32
        assert straight["x_embedder.weight"].dtype == dtype


def test_lora_settings_and_a_quantized_base_are_refused_in_one_line(tiny_chroma, shapes_dir, tmp_path):
    host = make_host()
    for extra, key in (
        ({"network_rank": 8}, "network_rank"),
        ({"chroma_lora_target": "all"}, "chroma_lora_target"),
        ({"base_model_precision": "int8-quanto"}, "base_model_precision"),
        ({"bf16_stochastic_rounding": True}, "bf16_stochastic_rounding"),  # needs mixed_precision: bf16
    ):
        with pytest.raises(ConfigError, match=key) as caught:
            make_config(host, full_settings(tiny_chroma, shapes_dir, tmp_path, **extra))
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="model_type: full only"):
        make_config(host, {**base_settings(tiny_chroma, shapes_dir, tmp_path), "bf16_stochastic_rounding": True})


def test_the_estimate_counts_master_weights_gradients_and_optimizer_state(tiny_chroma, shapes_dir, tmp_path):
    """fp32 masters: weights, gradients and AdamW's two moments at 4 bytes per parameter; with
    stochastic rounding the weights and gradients halve, the moments stay fp32, and one
    parameter's fp32 copy at a time adds nothing a model-sized temporary would; Adafactor keeps a
    fraction of that state."""
    from diffusers import ChromaTransformer2DModel

    from tuner.core.api import estimate

    model = ChromaTransformer2DModel.from_pretrained(tiny_chroma, subfolder="transformer")
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("distilled_guidance_layer"))
    host = make_host()

    def train_phase(**extra):
        settings = full_settings(tiny_chroma, shapes_dir, tmp_path, memory_estimate=True, **extra)
        return estimate(host, make_config(host, settings), "cpu").phase("train").parts

    masters = train_phase()
    assert masters["weights"] == pytest.approx(4 * total, rel=0.01)
    assert masters["LoRA + optimizer state"] == pytest.approx(2 * 4 * trained, rel=0.05)
    rounded = train_phase(mixed_precision="bf16", bf16_stochastic_rounding=True)
    assert rounded["weights"] == pytest.approx(2 * total, rel=0.01)
    assert rounded["LoRA + optimizer state"] == pytest.approx(2 * 4 * trained, rel=0.05)
    factored = train_phase(mixed_precision="bf16", bf16_stochastic_rounding=True, optimizer="adafactor")
    assert factored["LoRA + optimizer state"] < 0.5 * rounded["LoRA + optimizer state"]


def test_tuner_sample_renders_the_fine_tuned_folder_as_validation_did(full_run, tiny_chroma, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from tuner.core.cli import app

    result, _, config, _ = full_run
    settings = {
        "pretrained_model_name_or_path": tiny_chroma,
        "pretrained_transformer_model_name_or_path": config.output_dir,  # finds transformer/ inside
        "resolution": 64,
        "tokenizer_max_length": 16,
        "mixed_precision": "no",
    }
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    command = ["sample", "--plugin", "chroma", "--prompt", "a red circle", "--seed", "0", "--steps", "2"]
    out = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "s"), *overrides])
    assert out.exit_code == 0, out.output
    sampled = Image.open(next((tmp_path / "s").glob("*.png")))
    validation = Image.open(result.validation_dirs[-1] / "00.png")
    assert list(sampled.getdata()) == list(validation.getdata())


def test_a_rollback_before_the_first_checkpoint_reads_the_base_weights_again(tiny_chroma, one_image_dir, tmp_path):
    """The start of a full fine-tune is not copied into RAM (it would be the whole model): a rollback
    to it reloads the base model's weights."""
    from .test_resume import PoisonSteps

    settings = full_settings(
        tiny_chroma, one_image_dir, tmp_path, max_train_steps=4, divergence_skip_limit=2, learning_rate=1e-2
    )
    trainer, result = run_trainer(settings, ("poison", PoisonSteps({3, 4})))  # steps 3 and 4: no checkpoint yet
    assert result.steps == 4 and result.rollbacks == 1
    assert trainer.checkpoints.start.adapter is None
    weights = load_file(next((Path(settings["output_dir"]) / "transformer").glob("*.safetensors")))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_full_fine_tune_that_cannot_fit_is_told_what_shrinks_it(tiny_chroma, shapes_dir, tmp_path):
    from tuner.core.api import estimate
    from tuner.core.estimate import shortfalls

    host = make_host()
    config = make_config(host, full_settings(tiny_chroma, shapes_dir, tmp_path, memory_estimate=True))
    found = estimate(host, config, "cuda")
    found.phases = [p for p in found.phases if p.name == "train"]  # as at a real size: training is the peak
    (line,) = shortfalls(found, free_device=1024, free_ram=None, full=True)
    assert "of cuda memory (train)" in line and "bf16_stochastic_rounding: true" in line and "adafactor" in line
    (lora_line,) = shortfalls(found, free_device=1024, free_ram=None)
    assert "quantized base_model_precision" in lora_line  # what helps a LoRA


def test_flux_writes_the_same_single_file_layout(tiny_flux, one_image_dir, tmp_path):
    from diffusers import FluxTransformer2DModel

    settings = full_settings(tiny_flux, one_image_dir, tmp_path, max_train_steps=2)
    settings["model_family"] = "flux"
    train(settings)
    out = Path(settings["output_dir"])
    trained = FluxTransformer2DModel.from_pretrained(out / "transformer").state_dict()
    converted = width_converter("flux", FluxTransformer2DModel.load_config(out / "transformer")["num_attention_heads"]
                                * FluxTransformer2DModel.load_config(out / "transformer")["attention_head_dim"])(
        dict(load_file(out / "flux_comfyui.safetensors")))  # fmt: skip
    assert set(converted) == set(trained)
    assert all(torch.equal(converted[k], trained[k]) for k in trained)


def test_flux2_writes_bfls_layout_that_from_single_file_reads(tiny_flux2, one_image_dir, tmp_path):
    """Flux.2's converter reads any width: the file goes through from_single_file itself."""
    from diffusers import Flux2Transformer2DModel

    settings = full_settings(tiny_flux2, one_image_dir, tmp_path, max_train_steps=2, model_flavour="klein-4b")
    settings.update(model_family="flux2", tokenizer_max_length=40)
    result, _, _ = train(settings)
    out = Path(settings["output_dir"])
    trained = Flux2Transformer2DModel.from_pretrained(out / "transformer").state_dict()
    single = Flux2Transformer2DModel.from_single_file(
        str(out / "flux2_comfyui.safetensors"), config=str(tiny_flux2), subfolder="transformer"
    ).state_dict()
    assert set(single) == set(trained) and all(torch.equal(single[k], trained[k]) for k in trained)
