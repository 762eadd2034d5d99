"""Flux.2 as a family plugin written with the public API: the contract kit, the pipelines'
semantics (latents, packing, schedule), training and reload in diffusers, the ComfyUI (BFL) file,
resume and the estimate on the real configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuner.core.api import Interrupted, Trainer, build_config, estimate
from tuner.testing import make_host
from tuner.testing.contract import FamilyContract

from .test_resume import StopAt

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "models" / "tiny-flux2"  # built by tuner.plugins.flux2.tiny, seed 0
REAL = REPO / "examples" / "models" / "flux2-configs"


class TestFlux2Contract(FamilyContract):
    family = "flux2"
    plugin_module = "tuner.plugins.flux2.plugin"

    @pytest.fixture(scope="class")
    def tiny_model(self, tiny_flux2):
        return tiny_flux2  # built by tuner.plugins.flux2.tiny (test_examples: the bundled one is that)

    def settings(self, model, data, out):
        return {**super().settings(model, data, out), "model_flavour": "klein-4b", "tokenizer_max_length": 40}


def host_and_config(tmp_path, data, model=TINY, **extra):
    from tuner.plugins.flux2 import plugin

    host = make_host(("flux2", plugin), family="flux2")
    settings = {
        "model_family": "flux2",
        "model_flavour": "klein-4b",
        "pretrained_model_name_or_path": str(model),
        "data_dir": str(data),
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "resolution": 64,
        "tokenizer_max_length": 40,
        "network_rank": 4,
        "lora_alpha": 8,
        "train_batch_size": 1,
        "max_train_steps": 4,
        "mixed_precision": "no",
        "memory_estimate": False,
        "seed": 0,
        **extra,
    }
    return host, build_config(host, settings, "test.yaml", warn=lambda m: None)


def test_latents_are_the_pipelines_own(shapes_dir, tmp_path):
    """encode_images = Flux2KleinPipeline's reference-image encoding: the mode in 2x2 patches,
    normalised by the VAE's batch-norm statistics (which the tiny model sets away from identity)."""
    from diffusers import Flux2KleinPipeline

    host, config = host_and_config(tmp_path, shapes_dir)
    vae = host.provide("load_model", config=config, component="vae", dtype=torch.float32)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = host.provide("encode_images", vae=vae, pixels=pixels, config=config)
        pipe = Flux2KleinPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
        reference = pipe._encode_vae_image(pixels, generator=None)
        unnormalised = Flux2KleinPipeline._patchify_latents(vae.encode(pixels).latent_dist.mode())
    assert ours.shape == (2, 128, 4, 4)
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)
    assert not torch.allclose(ours, unnormalised, atol=1e-3)


def test_prediction_packs_and_positions_tokens_as_the_pipeline(shapes_dir, tmp_path):
    """predict_flow = the pipeline's transformer call: packed tokens, 4-axis ids, sigma as timestep;
    dev's guidance reaches the embedding, klein's transformer gets none."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    host, config = host_and_config(tmp_path, shapes_dir, flux_guidance_value=2.5)
    transformer = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(2, 128, 4, 6, generator=g), torch.randn(2, 40, 48, generator=g)
    sigmas = torch.tensor([0.3, 0.8])

    def ours(model):
        return host.provide(
            "predict_flow",
            transformer=model,
            noisy_latents=latents,
            sigmas=sigmas,
            text={"prompt_embeds": embeds},
            config=config,
            generator=torch.Generator().manual_seed(0),
        )

    with torch.no_grad():
        packed, ids = Flux2KleinPipeline._pack_latents(latents), Flux2KleinPipeline._prepare_latent_ids(latents)
        text_ids = Flux2KleinPipeline._prepare_text_ids(embeds)
        out = transformer(packed, embeds, sigmas, img_ids=ids, txt_ids=text_ids, guidance=None, return_dict=False)[0]
        reference = Flux2KleinPipeline._unpack_latents_with_ids(out, ids)
        torch.testing.assert_close(ours(transformer), reference, atol=1e-6, rtol=0)
        seen = {}
        dev = Flux2Transformer2DModel(**{**dict(transformer.config), "guidance_embeds": True})
        dev.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
        ours(dev)
    assert seen["guidance"].tolist() == [2.5, 2.5]


def test_dev_encodes_through_mistral_with_the_system_message_trains_with_guidance_and_validates(
    tiny_flux2_dev, shapes_dir, tmp_path
):
    """The dev flavour end to end: Flux2Pipeline's encode_prompt (BFL's system message in the chat
    template, layers 10/20/30 of Mistral3), training with dev's guidance embedding, and
    Flux2Pipeline's distilled-guidance validation."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    host, config = host_and_config(
        tmp_path,
        shapes_dir,
        tiny_flux2_dev,
        model_flavour="dev",
        tokenizer_max_length=80,  # the system message takes most of it
        max_train_steps=2,
        flux_guidance_value=3.0,
        validation_prompt="a red circle",
        validation_num_inference_steps=2,
    )
    encoders = host.provide("load_model", config=config, component="text_encoders", dtype=torch.float32)
    assert type(encoders).__name__ == "Flux2Pipeline" and type(encoders.text_encoder).__name__.startswith("Mistral3")
    fed = []
    encoders.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["input_ids"]), with_kwargs=True
    )
    text = host.provide(
        "encode_prompts",
        text_encoders=encoders,
        prompts=["a red circle"],
        config=config,
        device=torch.device("cpu"),
        references=None,
    )
    assert text["prompt_embeds"].shape == (1, 80, 48)
    assert SYSTEM_MESSAGE[:40] in encoders.tokenizer.decode(fed[0][0])
    trainer = Trainer(host, config, warn=lambda m: None)
    result = trainer.train()
    assert trainer.model.config.guidance_embeds  # dev's: predict_flow feeds it (see the packing test)
    assert result.steps == 2 and (result.validation_dirs[-1] / "00.png").is_file()


def test_training_sigmas_take_the_pipelines_resolution_shift(shapes_dir, tmp_path):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    from tuner.core.api import flow

    host, config = host_and_config(tmp_path, shapes_dir)
    draws = {}
    for side in (32, 64):  # 512 and 1024 px: 1024 and 4096 tokens of 128 channels
        generator = torch.Generator().manual_seed(0)
        draws[side] = host.provide(
            "sample_sigmas", config=config, batch_size=4096, latent_shape=(128, side, side), generator=generator
        )
    plain = flow.logit_normal(4096, torch.Generator().manual_seed(0))
    shift = math.exp(compute_empirical_mu(64 * 64, 50))
    torch.testing.assert_close(draws[64], flow.clamp_open_unit(flow.shift_sigmas(plain, shift)))
    assert draws[64].mean() > draws[32].mean() > plain.mean() + 0.1  # larger images: more noise


@pytest.fixture(scope="module")
def trained_flux2(tmp_path_factory, shapes_dir):
    """One overfit run on a single image, every Linear preset, both LoRA files written."""
    folder = tmp_path_factory.mktemp("flux2-run")
    one = folder / "one"
    one.mkdir()
    for suffix in (".png", ".txt"):
        (one / f"00_red_circle{suffix}").write_bytes((shapes_dir / f"00_red_circle{suffix}").read_bytes())
    host, config = host_and_config(
        folder,
        one,
        max_train_steps=60,
        learning_rate=1e-2,
        network_rank=8,
        lora_alpha=4,
        flux2_lora_target="all-linear",
        lora_format="all",
        validation_prompt="a red circle",
        validation_negative_prompt="blurry",
        validation_num_inference_steps=2,
        validation_steps=60,
    )
    trainer = Trainer(host, config, warn=lambda m: None)
    return trainer, trainer.train(), host, config


def test_loss_falls_and_the_lora_reproduces_the_trained_output_in_diffusers(trained_flux2):
    from diffusers import Flux2KleinPipeline

    trainer, result, host, config = trained_flux2
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert (result.validation_dirs[-1] / "00.png").is_file()  # CFG against the negative prompt
    text = {"prompt_embeds": torch.randn(1, 40, 48, generator=torch.Generator().manual_seed(1))}

    def predict(transformer):
        with torch.no_grad():
            return host.provide(
                "predict_flow",
                transformer=transformer,
                noisy_latents=torch.ones(1, 128, 4, 4),
                sigmas=torch.tensor([0.4]),
                text=text,
                config=config,
                generator=torch.Generator(),
            )

    trained = predict(trainer.model.eval())
    pipe = Flux2KleinPipeline.from_pretrained(TINY, torch_dtype=torch.float32)
    base = predict(pipe.transformer)
    pipe.load_lora_weights(str(Path(config.output_dir) / "pytorch_lora_weights.safetensors"))
    assert not torch.allclose(base, trained, atol=1e-4)
    torch.testing.assert_close(predict(pipe.transformer), trained, atol=1e-5, rtol=1e-4)


def bfl_checkpoint(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's Linear weights under BFL names by tuner's table (q/k/v fused, norm_out's
    halves swapped), as a BFL checkpoint holds them."""
    from tuner.plugins.fluxlike import bfl

    where = bfl.places(transformer, bfl.FLUX2)
    rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for module, place in where.items():
        weight = transformer.get_submodule(module).weight.detach()
        if place.swapped:
            weight = torch.cat(weight.chunk(2)[::-1])
        rows.setdefault(place.target, []).append((place.start, weight))
    return {
        f"{target}.weight": torch.cat([w for _, w in sorted(parts, key=lambda p: p[0])])
        for target, parts in rows.items()
    }


def test_the_bfl_table_is_the_inverse_of_diffusers_single_file_converter():
    """Every Linear of the model has a BFL name, and diffusers' own converter maps those names back
    to exactly the diffusers weights: the table tuner writes ComfyUI files with is right."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    transformer = Flux2Transformer2DModel.from_pretrained(TINY, subfolder="transformer")
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    converted = convert_flux2_transformer_checkpoint_to_diffusers(bfl_checkpoint(transformer))
    assert set(converted) == {f"{name}.weight" for name in linears}
    for name, module in linears.items():
        assert torch.equal(converted[f"{name}.weight"], module.weight), name


def test_the_comfyui_file_loads_completely_with_peft_deltas_and_the_diffusers_one_only_in_part(trained_flux2):
    from tuner.plugins.fluxlike import bfl

    trainer, _, _, config = trained_flux2
    model = trainer.model
    comfy = load_file(Path(config.output_dir) / "pytorch_lora_weights_comfyui.safetensors")
    names = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in comfy}
    known = {f"{bfl.PREFIX}{p.target}" for p in bfl.places(model, bfl.FLUX2).values()}
    assert names <= known and f"{bfl.PREFIX}double_blocks.0.img_attn.qkv" in names
    assert all(f"{name}.alpha" in comfy for name in names)  # ComfyUI ignores metadata
    deltas, unmatched = bfl.read_comfyui(comfy, model, bfl.FLUX2)
    assert unmatched == []
    peft = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            scale = module.scaling["default"]
            peft[name.removeprefix("base_model.model.")] = (
                scale * module.lora_B["default"].weight @ module.lora_A["default"].weight
            )
    assert set(deltas) == set(peft)
    for module, delta in peft.items():
        torch.testing.assert_close(deltas[module], delta.detach(), atol=1e-6, rtol=1e-5)
    # what ComfyUI 0.3 makes of the diffusers-layout file: Flux.1's name table, so MLPs and single blocks drop
    diffusers_file = load_file(Path(config.output_dir) / "pytorch_lora_weights.safetensors")
    partial, dropped = bfl.read_comfyui(diffusers_file, model, bfl.FLUX2)
    assert any(".ff.linear_in." in k for k in dropped) and any("single_transformer_blocks" in k for k in dropped)
    assert "transformer_blocks.0.attn.to_q" in partial and len(partial) < len(peft)
    # and `tuner check-lora` says both
    from typer.testing import CliRunner

    from tuner.core.cli import app

    check = ["check-lora", "--plugin", "flux2", "--model", str(TINY)]
    comfy_check = CliRunner().invoke(
        app, [*check[:1], str(Path(config.output_dir) / "pytorch_lora_weights_comfyui.safetensors"), *check[1:]]
    )
    assert comfy_check.exit_code == 0 and "OK: every key loads" in comfy_check.output, comfy_check.output
    as_comfyui = CliRunner().invoke(
        app,
        [
            *check[:1],
            str(Path(config.output_dir) / "pytorch_lora_weights.safetensors"),
            *check[1:],
            "--format",
            "comfyui",
        ],
    )
    assert as_comfyui.exit_code == 1 and "ff.linear_in" in as_comfyui.output, as_comfyui.output


def test_resume_is_bit_exact(shapes_dir, tmp_path):
    def run(folder, *plugins, **extra):
        from tuner.plugins.flux2 import plugin

        _, config = host_and_config(
            folder, shapes_dir, max_train_steps=4, train_batch_size=2, checkpointing_steps=2, lora_dropout=0.1, **extra
        )
        host = make_host(("flux2", plugin), *plugins, family="flux2")
        trainer = Trainer(host, config, warn=lambda m: None)
        for _, hooks in plugins:
            hooks.trainer = trainer
        return trainer.train()

    run(tmp_path / "a")
    with pytest.raises(Interrupted):
        run(tmp_path / "b", ("stop", StopAt(2)))
    run(tmp_path / "b", resume_from_checkpoint="latest")
    straight = load_file(tmp_path / "a" / "out" / "pytorch_lora_weights.safetensors")
    resumed = load_file(tmp_path / "b" / "out" / "pytorch_lora_weights.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("precision", ["int8-quanto", "nf4-bnb"])
def test_quantized_bases_train_unchanged(shapes_dir, tmp_path, precision):
    """The quantization backends know no family: Flux.2's Linears quantize, its high-precision
    modules (embedders, modulations, output) stay, and the LoRA trains and passes the self-test."""
    host = make_host(family="flux2", installed=True)  # the backends are installed plugins
    settings = dict(host_and_config(tmp_path, shapes_dir)[1].to_dict(), base_model_precision=precision)
    config = build_config(host, {**settings, "max_train_steps": 2}, "test.yaml", warn=lambda m: None)
    trainer = Trainer(host, config, warn=lambda m: None)
    result = trainer.train()
    assert result.steps == 2 and all(loss == loss for loss in result.losses)
    model = trainer.model
    kind = {"int8-quanto": "QLinear", "nf4-bnb": "Linear4bit"}[precision]
    assert type(model.transformer_blocks[0].ff.linear_in.get_base_layer()).__name__ == kind
    assert type(model.double_stream_modulation_img.linear).__name__ == "Linear"


def test_tuner_sigmas_shows_the_flux2_schedule():
    from typer.testing import CliRunner

    from tuner.core.cli import app

    means = []
    for resolution in (512, 1024):
        out = CliRunner().invoke(
            app, ["sigmas", "--plugin", "flux2", "--set", f"resolution={resolution}", "--samples", "4000", "--json"]
        )
        assert out.exit_code == 0, out.output
        histogram = json.loads(out.output)
        assert sum(histogram["counts"]) == 4000
        means.append(histogram["mean"])
    assert 0.5 < means[0] < means[1]


def test_the_estimate_runs_on_the_real_klein_config_and_dev_counts_its_sizes(shapes_dir, tmp_path):
    host, config = host_and_config(
        tmp_path,
        shapes_dir,
        REAL / "klein-4b",
        resolution=512,
        mixed_precision="bf16",
        network_rank=16,
        tokenizer_max_length=512,
        gradient_checkpointing=True,
    )
    found = estimate(host, config, "cuda")
    train = found.phase("train")
    assert train.parts["weights"] == pytest.approx(3.88e9 * 2, rel=0.01)
    assert found.peak_device > train.parts["weights"]
    index = json.loads((REAL / "dev" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "Mistral3ForConditionalGeneration"]
