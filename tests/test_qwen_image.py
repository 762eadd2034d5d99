"""Qwen-Image as a family plugin written with the public API: the contract kit, the pipelines'
semantics (template drop, latents, packing, schedule), training and reload in diffusers, the one
file ComfyUI reads too, resume and the estimate on the real configs; edit pairs (reference images)
with Qwen-Image-Edit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuner.core import hookimpl
from tuner.core.api import Interrupted, Trainer, build_config, estimate
from tuner.testing import make_host
from tuner.testing.contract import FamilyContract

from .test_resume import StopAt

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "models" / "tiny-qwen-image"  # built by tuner.plugins.qwen_image.tiny, seed 0
REAL = REPO / "examples" / "models" / "qwen-image-configs"


class TestQwenImageContract(FamilyContract):
    family = "qwen_image"
    plugin_module = "tuner.plugins.qwen_image.plugin"

    @pytest.fixture(scope="class")
    def tiny_model(self):
        return TINY  # test_examples: the bundled model is what the builder makes

    def settings(self, model, data, out):
        return {**super().settings(model, data, out), "tokenizer_max_length": 40}


def host_and_config(tmp_path, data, model=TINY, **extra):
    from tuner.plugins.qwen_image import plugin

    host = make_host(("qwen_image", plugin), family="qwen_image")
    settings = {
        "model_family": "qwen_image",
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


def test_the_dropped_template_tokens_are_exactly_the_template_prefix(shapes_dir, tmp_path):
    """The pipelines drop a fixed count of leading hidden states (34, edits 64): the tiny tokenizer
    must tokenize each template's prefix into exactly that many ids, or training would keep or cut
    the wrong tokens silently. What encode_prompts caches is the pipeline's encoding, row by row
    without the batch's padding."""
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    host, config = host_and_config(tmp_path, shapes_dir)
    encoders = host.provide("load_model", config=config, component="text_encoders", dtype=torch.float32)
    tokenizer = encoders.tokenizer
    for cls, user_part, count in ((QwenImagePipeline, "{}", 34), (QwenImageEditPipeline, "<|vision_start|>", 64)):
        pipe = cls(*[None] * (6 if cls is QwenImageEditPipeline else 5))  # the templates, no weights
        template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
        assert drop == count
        ids = tokenizer(template.format("a red circle")).input_ids
        assert tokenizer.decode(ids[:drop]) == template.split(user_part)[0]
    prompts = ["a red circle", "a big blue square on the left of a small cat"]
    ours = host.provide(
        "encode_prompts",
        text_encoders=encoders,
        prompts=prompts,
        config=config,
        device=torch.device("cpu"),
        references=None,
    )
    embeds, mask = encoders.encode_prompt(prompts, device="cpu", max_sequence_length=40)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, atol=0, rtol=0)
    assert ours["attention_mask"].sum(1).tolist() == mask.sum(1).tolist() and mask[0, -1] == 0


def test_latents_and_prediction_are_the_pipelines_own(shapes_dir, tmp_path):
    """encode_images = the edit pipelines' _encode_vae_image (one frame, mode, normalised by the VAE's
    latents_mean/std); predict_flow = the pipeline's transformer call (packed latents, img_shapes,
    the text mask, sigma as timestep = t / 1000), padding in the text changing nothing."""
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    host, config = host_and_config(tmp_path, shapes_dir)
    vae = host.provide("load_model", config=config, component="vae", dtype=torch.float32)
    transformer = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    with torch.no_grad():
        ours = host.provide("encode_images", vae=vae, pixels=pixels, config=config)
        edit = QwenImageEditPipeline(None, vae, None, None, None, None)
        reference = edit._encode_vae_image(pixels.unsqueeze(2), generator=None)[:, :, 0]
        assert ours.shape == (2, 16, 8, 6)
        torch.testing.assert_close(ours, reference, atol=0, rtol=0)
        latents, embeds = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 7, 16, generator=g)
        sigmas = torch.tensor([0.3, 0.8])
        mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])

        def ours_at(text):
            return host.provide(
                "predict_flow",
                transformer=transformer,
                noisy_latents=latents,
                sigmas=sigmas,
                text=text,
                config=config,
                generator=torch.Generator(),
            )

        packed = QwenImagePipeline._pack_latents(latents.unsqueeze(1), 2, 16, 8, 6)
        out = transformer(
            hidden_states=packed,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            timestep=sigmas,
            img_shapes=[[(1, 4, 3)]] * 2,
            return_dict=False,
        )[0]
        expected = QwenImagePipeline._unpack_latents(out, 64, 48, 8)[:, :, 0]
        prediction = ours_at({"prompt_embeds": embeds, "attention_mask": mask})
        torch.testing.assert_close(prediction, expected, atol=1e-6, rtol=0)
        padded = {
            "prompt_embeds": torch.cat([embeds, torch.zeros(2, 3, 16)], 1),
            "attention_mask": torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1),
        }
        torch.testing.assert_close(ours_at(padded), prediction, atol=1e-5, rtol=0)


def test_training_sigmas_take_the_models_resolution_shift(shapes_dir, tmp_path):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from tuner.core.api import flow

    host, config = host_and_config(tmp_path, shapes_dir, pretrained_model_name_or_path=str(REAL / "base"))
    draws = {}
    for side in (64, 128):  # 512 and 1024 px: 1024 and 4096 tokens
        generator = torch.Generator().manual_seed(0)
        draws[side] = host.provide(
            "sample_sigmas", config=config, batch_size=4096, latent_shape=(16, side, side), generator=generator
        )
    plain = flow.logit_normal(4096, torch.Generator().manual_seed(0))
    shift = math.exp(calculate_shift(64 * 64, 256, 8192, 0.5, 0.9))  # Qwen-Image's scheduler constants
    torch.testing.assert_close(draws[128], flow.clamp_open_unit(flow.shift_sigmas(plain, shift)))
    assert draws[128].mean() > draws[64].mean() > plain.mean()


@pytest.fixture(scope="module")
def trained_qwen(tmp_path_factory, shapes_dir):
    """One overfit run on a single image, every Linear preset, the LoRA written once."""
    folder = tmp_path_factory.mktemp("qwen-run")
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
        qwen_image_lora_target="all-linear",
        validation_prompt="a red circle",
        validation_negative_prompt="blurry",
        validation_num_inference_steps=2,
        validation_steps=60,
    )
    trainer = Trainer(host, config, warn=lambda m: None)
    return trainer, trainer.train(), host, config


def test_the_last_blocks_text_stream_trains_nothing_so_ddp_looks_for_unused_weights(trained_qwen):
    """The last block's text queries, text out projection and text MLP feed no output: after 60
    steps their LoRA is still at its initialisation (lora_B zero). DDP stops on the second step
    waiting for their gradients unless it looks for unused weights (2 processes checked by hand:
    with it, DDP and FSDP2 train the same, within 5e-5 of one process, whose batch is padded to
    its longest prompt)."""
    from tuner.core.training.runtime import new_accelerator

    trainer, _, host, _ = trained_qwen
    last = max(int(n.split(".")[1]) for n, _ in trainer.model.named_modules() if n.startswith("transformer_blocks."))
    untrained = {
        name.split(f"transformer_blocks.{last}.")[1].removesuffix(".lora_B.default")
        for name, module in trainer.model.named_modules()
        if name.startswith(f"transformer_blocks.{last}.") and name.endswith("lora_B.default")
        and not module.weight.any()
    }  # fmt: skip
    assert untrained == {"attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2"}
    assert host.family.unused_weights
    assert new_accelerator("no", 60, host.family.unused_weights).ddp_handler.find_unused_parameters


def test_loss_falls_and_the_lora_reproduces_the_trained_output_in_diffusers(trained_qwen):
    from diffusers import QwenImagePipeline

    trainer, result, host, config = trained_qwen
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert (result.validation_dirs[-1] / "00.png").is_file()  # real CFG against the negative prompt
    g = torch.Generator().manual_seed(1)
    text = {"prompt_embeds": torch.randn(1, 9, 16, generator=g), "attention_mask": torch.ones(1, 9, dtype=torch.long)}

    def predict(transformer):
        with torch.no_grad():
            return host.provide(
                "predict_flow",
                transformer=transformer,
                noisy_latents=torch.ones(1, 16, 8, 8),
                sigmas=torch.tensor([0.4]),
                text=text,
                config=config,
                generator=torch.Generator(),
            )

    trained = predict(trainer.model.eval())
    pipe = QwenImagePipeline.from_pretrained(TINY, torch_dtype=torch.float32)
    base = predict(pipe.transformer)
    pipe.load_lora_weights(str(Path(config.output_dir) / "pytorch_lora_weights.safetensors"))
    assert not torch.allclose(base, trained, atol=1e-4)
    torch.testing.assert_close(predict(pipe.transformer), trained, atol=1e-5, rtol=1e-4)


def test_comfyui_reads_the_diffusers_file_completely_at_the_trained_strength(trained_qwen):
    """ComfyUI 0.3's QwenImage key map: for every weight diffusion_model.X.weight, the LoRA keys X,
    transformer.X and lycoris_X; it ignores metadata and scales by .alpha / rank (1 without one).
    The file names only mapped modules, and lora_B carries alpha / rank, so each delta B @ A is
    peft's."""
    trainer, _, _, config = trained_qwen
    model = trainer.model
    weights = {name.removeprefix("base_model.model.").replace(".base_layer", "") for name, _ in model.named_modules()}
    comfy_map = {f"transformer.{name}" for name in weights} | set(weights)
    tensors = load_file(Path(config.output_dir) / "pytorch_lora_weights.safetensors")
    assert not any(k.endswith(".alpha") for k in tensors)
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    assert modules <= comfy_map and "transformer.transformer_blocks.0.img_mod.1" in modules
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = "transformer." + name.removeprefix("base_model.model.")
            peft = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            comfy = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
            torch.testing.assert_close(comfy, peft.detach(), atol=1e-6, rtol=1e-5)
    from typer.testing import CliRunner

    from tuner.core.cli import app

    out = CliRunner().invoke(
        app,
        [
            "check-lora",
            str(Path(config.output_dir) / "pytorch_lora_weights.safetensors"),
            "--plugin",
            "qwen_image",
            "--model",
            str(TINY),
            "--format",
            "comfyui",
        ],
    )
    assert out.exit_code == 0 and "OK: every key loads" in out.output, out.output


def test_resume_is_bit_exact(shapes_dir, tmp_path):
    def run(folder, *plugins, **extra):
        from tuner.plugins.qwen_image import plugin

        _, config = host_and_config(
            folder, shapes_dir, max_train_steps=4, train_batch_size=2, checkpointing_steps=2, lora_dropout=0.1, **extra
        )
        host = make_host(("qwen_image", plugin), *plugins, family="qwen_image")
        trainer = Trainer(host, config, warn=lambda m: None)
        for _, hooks in plugins:
            hooks.trainer = trainer
        return trainer.train()

    straight, resumed = straight_and_resumed(run, tmp_path)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_int8_base_trains(shapes_dir, tmp_path):
    host = make_host(family="qwen_image", installed=True)  # the backends are installed plugins
    settings = dict(host_and_config(tmp_path, shapes_dir)[1].to_dict(), base_model_precision="int8-quanto")
    config = build_config(host, {**settings, "max_train_steps": 2}, "test.yaml", warn=lambda m: None)
    trainer = Trainer(host, config, warn=lambda m: None)
    result = trainer.train()
    assert result.steps == 2 and all(loss == loss for loss in result.losses)
    block = trainer.model.transformer_blocks[0]
    assert type(block.attn.to_q.get_base_layer()).__name__ == "QLinear"
    assert type(trainer.model.img_in).__name__ == "Linear"


def test_the_estimate_runs_on_the_real_configs(shapes_dir, tmp_path):
    host, config = host_and_config(
        tmp_path,
        shapes_dir,
        REAL / "base",
        resolution=1024,
        mixed_precision="bf16",
        network_rank=16,
        tokenizer_max_length=512,
        gradient_checkpointing=True,
    )
    found = estimate(host, config, "cuda")
    train = found.phase("train")
    assert train.parts["weights"] == pytest.approx(20.43e9 * 2, rel=0.01)
    assert found.phase("encode text").parts["text encoders"] == pytest.approx(8.29e9 * 2, rel=0.01)  # its own lm_head
    index = json.loads((REAL / "edit" / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"


EDIT = REPO / "examples" / "models" / "tiny-qwen-image-edit"  # built by build_tiny_qwen_image(edit=True)
PAIRS = REPO / "examples" / "data" / "edit-pairs"


def test_reference_sizes_are_the_edit_pipelines(shapes_dir, tmp_path):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    host, config = host_and_config(tmp_path, shapes_dir, EDIT)
    edit = host.provide("reference_sizes", config=config, width=1600, height=800)
    assert (
        edit
        == {"vae": (1440, 736), "encoder": (1440, 736)}
        == {k: calculate_dimensions(1024 * 1024, 2)[:2] for k in ("vae", "encoder")}
    )
    plus = tmp_path / "edit-plus"  # Qwen-Image-Edit-2509: the encoder sees a 384 x 384 area
    plus.mkdir()
    (plus / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    host, config = host_and_config(tmp_path, shapes_dir, plus)
    assert host.provide("reference_sizes", config=config, width=1600, height=800) == {
        "vae": (1440, 736),
        "encoder": calculate_dimensions(384 * 384, 2)[:2],
    }


def test_edit_pairs_train_validate_and_a_changed_reference_re_encodes_only_its_pair(tmp_path):
    """Pairs by name (one target without its reference is skipped, counted); the instruction is
    cached as the Edit pipeline encodes it with its reference (at calculate_dimensions' size), the
    reference's latents with the target's; the loss falls; validation renders from
    validation_reference_image; a changed reference re-encodes only its own pair."""
    import shutil

    from PIL import Image

    from tuner.core.data.cache import conditioning_key

    data = tmp_path / "pairs"
    shutil.copytree(PAIRS, data)
    (data / "references" / "07_yellow_square.png").unlink()
    warnings = []

    def run(steps, **extra):
        host, config = host_and_config(
            tmp_path,
            data / "targets",
            EDIT,
            conditioning_data_dir=str(data / "references"),
            reference_pixels=32 * 32,
            train_batch_size=2,
            max_train_steps=steps,
            learning_rate=1e-2,
            validation_prompt="invert the colors",
            validation_guidance=1.0,
            validation_num_inference_steps=2,
            validation_steps=steps,
            **extra,
        )
        trainer = Trainer(host, config, warn=warnings.append)
        return trainer, trainer.train(), host, config

    trainer, result, host, config = run(30, validation_reference_image=str(data / "references" / "00_red_circle.png"))
    assert any("skipped 1 image(s) without a reference" in w for w in warnings), warnings
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.9 * first, (first, last)
    assert (result.validation_dirs[-1] / "00.png").is_file()
    text_dir = next((tmp_path / "cache" / "text").iterdir())
    latent_dir = next((tmp_path / "cache" / "latents").iterdir())
    reference = data / "references" / "02_blue_circle.png"
    stored = load_file(text_dir / f"{conditioning_key('invert the colors', reference)}.safetensors")
    encoders = host.provide("load_model", config=config, component="text_encoders", dtype=torch.float32)
    with Image.open(reference) as img:
        resized = encoders.image_processor.resize(img.convert("RGB"), 32, 32)  # the pipeline's own resize
    with torch.no_grad():
        embeds, _ = encoders.encode_prompt(["invert the colors"], image=[resized], device="cpu", max_sequence_length=40)
    torch.testing.assert_close(stored["prompt_embeds"], embeds[0], atol=1e-5, rtol=0)
    assert load_file(next(latent_dir.glob("*.safetensors")))["reference"].shape == (16, 4, 4)  # 32 px at 1/8
    # `tuner sample --recipe` renders the validation image again, bit for bit; --reference edits another
    from typer.testing import CliRunner

    from tuner.core.cli import app

    recipe = Path(config.output_dir) / "recipe.json"
    other = data / "references" / "06_blue_square.png"
    for folder, extra in (("again", []), ("other", ["--reference", str(other)])):
        out = CliRunner().invoke(app, ["sample", "--recipe", str(recipe), "--out", str(tmp_path / folder), *extra])
        assert out.exit_code == 0, out.output
    validation = torch.tensor(list(Image.open(result.validation_dirs[-1] / "00.png").getdata()))
    again = torch.tensor(list(Image.open(next((tmp_path / "again").glob("*.png"))).getdata()))
    edited_other = torch.tensor(list(Image.open(next((tmp_path / "other").glob("*.png"))).getdata()))
    assert torch.equal(again, validation) and not torch.equal(edited_other, validation)
    texts, latents = set(text_dir.glob("*.safetensors")), set(latent_dir.glob("*.safetensors"))
    # seven pairs and the empty negative prompt with the validation reference (the validation prompt
    # with that reference is one of the pairs: encoded once)
    assert len(texts) == 7 + 1
    Image.open(reference).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(reference)  # one reference changes
    run(2)  # without validation_reference_image: the first pair's reference, recorded in the recipe
    assert json.loads(recipe.read_text())["settings"]["validation_reference_image"].endswith("00_red_circle.png")
    assert len(set(text_dir.glob("*.safetensors")) - texts) == 1
    assert len(set(latent_dir.glob("*.safetensors")) - latents) == 1


def test_without_torchvision_the_edit_processor_is_assembled_from_its_image_half():
    """transformers 5.24's Qwen2VLProcessor will not load without torchvision (its video half needs
    it), even for still images: tuner.plugins.qwen_image.fixes builds it from the tokenizer and the
    PIL image processor. When this test fails on the ImportError, a release has fixed the bug."""
    import importlib.util

    from transformers import Qwen2VLProcessor

    from tuner.plugins.qwen_image import fixes

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the processor loads as the pipeline loads it")
    with pytest.raises(ImportError, match="orchvision"):
        Qwen2VLProcessor.from_pretrained(EDIT / "processor")
    processor = fixes.still_image_processor(str(EDIT / "processor"))
    from PIL import Image

    out = processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>invert"],
        images=[Image.new("RGB", (56, 56))],
        return_tensors="pt",
    )
    pads = int((out["input_ids"] == processor.image_token_id).sum())
    assert pads == int(out["image_grid_thw"].prod()) // 4  # one token per 2x2 merged patch


class SeenText:
    """Keeps the text each predict_flow call receives (a wrapper, as a third-party plugin would)."""

    def __init__(self):
        self.seen = []

    @hookimpl(wrapper=True)
    def predict_flow(self, text):
        self.seen.append({k: v.detach().clone() for k, v in text.items()})
        return (yield)


def test_dropped_instructions_train_with_their_own_references_encoding(tmp_path):
    """Caption dropout on edit pairs: a dropped instruction is the empty prompt encoded with that
    pair's own reference (what the edit pipelines' negative prompt is at inference), and the
    reference's latents stay."""
    from tuner.core.data.cache import conditioning_key

    spy = SeenText()
    _, config = host_and_config(
        tmp_path,
        PAIRS / "targets",
        EDIT,
        conditioning_data_dir=str(PAIRS / "references"),
        reference_pixels=32 * 32,
        train_batch_size=2,
        max_train_steps=6,
        caption_dropout_probability=0.5,
    )
    from tuner.plugins.qwen_image import plugin

    host = make_host(("qwen_image", plugin), ("spy", spy), family="qwen_image")
    Trainer(host, config, warn=lambda m: None).train()
    text_dir = next((tmp_path / "cache" / "text").iterdir())
    stored = {
        (prompt, ref.name): load_file(text_dir / f"{conditioning_key(prompt, ref)}.safetensors")["prompt_embeds"]
        for ref in sorted((PAIRS / "references").glob("*.png"))
        for prompt in ("", "invert the colors")
    }
    assert len(spy.seen) == 6 and all("reference_latents" in t for t in spy.seen)
    dropped = 0
    for text in spy.seen:
        for row in range(2):
            embeds = text["prompt_embeds"][row, : int(text["attention_mask"][row].sum())]
            (match,) = [key for key, e in stored.items() if e.shape == embeds.shape and torch.equal(e, embeds)]
            dropped += match[0] == ""
    assert 0 < dropped < 12  # some rows dropped, each to the empty prompt with its own reference


def test_edit_pairs_resume_bit_exact_and_their_reference_tokens_are_estimated(tmp_path):
    """A stopped edit run (pairs, dropped instructions with their own references) resumes to the
    same LoRA bit for bit; the estimate counts the reference latents riding along."""
    settings = {
        "conditioning_data_dir": str(PAIRS / "references"),
        "reference_pixels": 32 * 32,
        "train_batch_size": 2,
        "caption_dropout_probability": 0.3,
        "max_train_steps": 4,
        "checkpointing_steps": 2,
    }

    def run(folder, *plugins, **extra):
        from tuner.plugins.qwen_image import plugin

        _, config = host_and_config(folder, PAIRS / "targets", EDIT, **settings, **extra)
        host = make_host(("qwen_image", plugin), *plugins, family="qwen_image")
        trainer = Trainer(host, config, warn=lambda m: None)
        for _, hooks in plugins:
            hooks.trainer = trainer
        return trainer.train()

    straight, resumed = straight_and_resumed(run, tmp_path)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    def activations(model, **extra):
        host, config = host_and_config(tmp_path / "e", PAIRS / "targets", model, resolution=64, **extra)
        return estimate(host, config, "cpu").phase("train").parts["batch, gradients, activations"]

    assert activations(EDIT, reference_pixels=64 * 64) > activations(TINY)  # the same transformer config


def straight_and_resumed(run, tmp_path) -> tuple[dict, dict]:
    """``run`` straight through in ``a``; in ``b`` stopped at step 2 (Ctrl-C's path) and resumed:
    the two final LoRA files."""
    run(tmp_path / "a")
    with pytest.raises(Interrupted):
        run(tmp_path / "b", ("stop", StopAt(2)))
    run(tmp_path / "b", resume_from_checkpoint="latest")
    return tuple(load_file(tmp_path / folder / "out" / "pytorch_lora_weights.safetensors") for folder in "ab")
