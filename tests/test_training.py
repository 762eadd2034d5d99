"""End-to-end training on the tiny Chroma: loss, saved LoRA, caches, outputs, hooks."""

from __future__ import annotations

import gc
import json
import math
import weakref
from collections import Counter

import pytest
import torch
from safetensors import safe_open

from tuner.core import hookimpl
from tuner.core.errors import ConfigError, DataError
from tuner.core.model.lora import METADATA_KEY, read_metadata
from tuner.core.run.trainer import Trainer

from .conftest import base_settings, make_config, make_host, train


class CallCounter:
    """Wraps family hooks through the plugin manager to count what a run calls."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.encoders = None
        self.encoders_alive_at_start = None
        self.events: list[str] = []

    @hookimpl(wrapper=True)
    def load_model(self, component):
        self.calls[f"load:{component}"] += 1
        loaded = yield
        if component == "text_encoders":
            self.encoders = weakref.ref(loaded)
        return loaded

    @hookimpl(wrapper=True)
    def encode_images(self):
        self.calls["encode_images"] += 1
        return (yield)

    @hookimpl(wrapper=True)
    def encode_prompts(self, prompts):
        self.calls["encode_prompts"] += len(prompts)
        return (yield)

    @hookimpl
    def training_event(self, event):
        self.events.append(event.name)
        if event.name == "run_start" and self.encoders is not None:
            gc.collect()
            self.encoders_alive_at_start = self.encoders() is not None


def predict(host, config, transformer, entry):
    g = torch.Generator().manual_seed(3)
    noisy = torch.randn(2, 16, 8, 8, generator=g)
    text = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in entry.items()}
    with torch.no_grad():
        return host.provide(
            "predict_flow",
            transformer=transformer,
            noisy_latents=noisy,
            sigmas=torch.tensor([0.3, 0.8]),
            text=text,
            config=config,
            generator=torch.Generator().manual_seed(0),
        )


def test_loss_falls_on_an_overfit_batch(tiny_chroma, one_image_dir, tmp_path):
    settings = base_settings(tiny_chroma, one_image_dir, tmp_path)
    settings.update(max_train_steps=100, learning_rate=1e-2, flux_lora_target="all+ffs", network_rank=8, seed=1)

    def first_and_last(losses):
        return sum(losses[:10]) / 10, sum(losses[-10:]) / 10

    trained = train(settings)[0].losses
    first, last = first_and_last(trained)
    assert last < 0.8 * first, (first, last)
    # control: the same draws of sigma and noise with a learning rate of zero do not improve
    frozen = train({**settings, "learning_rate": 0.0})[0].losses
    assert frozen[0] == trained[0]
    still_first, still_last = first_and_last(frozen)
    assert still_last > 0.9 * still_first, (still_first, still_last)


def test_saved_lora_reloads_in_diffusers_and_reproduces_the_trained_output(tiny_chroma, shapes_dir, tmp_path):
    from diffusers import ChromaPipeline

    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(network_rank=4, lora_alpha=12, max_train_steps=6, learning_rate=5e-3, gradient_checkpointing=True)
    host = make_host()
    config = make_config(host, settings)
    trainer = Trainer(host, config, warn=lambda m: None)
    result = trainer.train()
    lora_file = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    assert result.lora_files[-1] == lora_file

    prepared = trainer.prepare_data()
    entry = prepared.text.load(prepared.entries[0].text)
    trained = predict(host, config, trainer.model.eval(), entry)

    pipe = ChromaPipeline.from_pretrained(tiny_chroma, torch_dtype=torch.float32)
    base = predict(host, config, pipe.transformer, entry)
    pipe.load_lora_weights(str(lora_file))
    reloaded = predict(host, config, pipe.transformer, entry)
    assert not torch.allclose(base, trained, atol=1e-4)  # the LoRA does something
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-4)

    # the .alpha tensors carry the scale: without them diffusers assumes alpha = rank
    with safe_open(str(lora_file), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        assert METADATA_KEY in handle.metadata() and "lora_adapter_metadata" not in handle.metadata()
    alphas = [k for k in tensors if k.endswith(".alpha")]
    assert len(alphas) == len(trainer.targets) and all(float(tensors[k]) == 12.0 for k in alphas)
    assert all(k.startswith("transformer.") for k in tensors)
    stripped = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    pipe2 = ChromaPipeline.from_pretrained(tiny_chroma, torch_dtype=torch.float32)
    pipe2.load_lora_weights(stripped)
    assert not torch.allclose(predict(host, config, pipe2.transformer, entry), trained, atol=1e-4)

    meta = read_metadata(str(lora_file))
    assert meta["rank"] == 4 and meta["alpha"] == 12.0 and meta["steps"] == 6
    assert meta["base_model"] == str(tiny_chroma) and meta["targets"] == trainer.targets


def test_second_run_reuses_caches_and_never_calls_the_encoders(tiny_chroma, shapes_dir, tmp_path):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(max_train_steps=2, validation_prompt="a red circle", validation_steps=0)
    first = CallCounter()
    train(settings, ("counter", first))
    assert first.calls["encode_images"] == 3  # 12 images in batches of 4
    assert first.calls["encode_prompts"] == 12 + 2  # captions + validation prompt + empty negative
    assert first.encoders_alive_at_start is False  # released before training

    second = CallCounter()
    train({**settings, "output_dir": str(tmp_path / "out2")}, ("counter", second))
    assert second.calls["encode_images"] == 0 and second.calls["encode_prompts"] == 0
    assert second.calls["load:text_encoders"] == 0
    assert second.calls["load:vae"] == 1  # only to decode validation images

    third = CallCounter()  # a setting that changes the text encoding invalidates only the text cache
    train({**settings, "tokenizer_max_length": 24, "output_dir": str(tmp_path / "out3")}, ("counter", third))
    assert third.calls["encode_prompts"] == 14 and third.calls["encode_images"] == 0


def test_outputs_log_checkpoints_validation_and_events(tiny_chroma, shapes_dir, tmp_path):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(
        max_train_steps=4,
        checkpointing_steps=2,
        validation_steps=2,
        validation_prompts=["a red circle", "a blue square"],
        validation_num_inference_steps=3,
        gradient_accumulation_steps=2,
    )
    counter = CallCounter()
    result, _, _ = train(settings, ("counter", counter))
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"loss", "lr", "sigma", "elapsed_s"} <= set(row) and 0 < row["sigma"] < 1
        assert len(row["sigmas"]) == 2  # two micro-batches of one per optimizer step
    from PIL import Image

    for step in ("step_000002", "step_000004"):
        folder = out / "validation" / step
        assert Image.open(folder / "00.png").size == (64, 64)
        assert Image.open(folder / "grid.png").size == (128, 64)
        assert "01 seed 1: a blue square" in (folder / "prompts.txt").read_text()
    assert counter.events == [
        "run_start",
        "step_end",
        "step_end",
        "save",
        "validation",
        "step_end",
        "step_end",
        "save",
        "save",
        "validation",
        "run_end",
    ]  # checkpoint-2; then checkpoint-4 and the final LoRA


def test_validation_is_reproducible(tiny_chroma, shapes_dir, tmp_path):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(max_train_steps=2, validation_prompt="a red circle", validation_num_inference_steps=3)
    a, _, _ = train(settings)
    b, _, _ = train({**settings, "output_dir": str(tmp_path / "again")})
    assert a.losses == b.losses
    png = "validation/step_000002/00.png"
    assert (tmp_path / "out" / png).read_bytes() == (tmp_path / "again" / png).read_bytes()


def test_lora_targets(tiny_chroma, shapes_dir, tmp_path):
    def targets(value, *plugins):
        host = make_host(*plugins)
        config = make_config(host, {**base_settings(tiny_chroma, shapes_dir, tmp_path), "flux_lora_target": value})
        transformer = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
        return host.provide("lora_target_modules", config=config, transformer=transformer)

    assert len(targets("all")) == 14  # 8 in the double block, q/k/v in each of 2 single blocks
    assert len(targets("context")) == 4
    big = targets("all+ffs+embedder")
    assert "x_embedder" in big and "proj_out" in big and not any("distilled_guidance_layer" in n for n in big)
    assert targets(["to_q"]) == [
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.1.attn.to_q",
    ]
    with pytest.raises(ConfigError, match="flux_lora_target: \\['nothing'\\] matches no Linear module"):
        targets(["nothing"])
    with pytest.raises(
        ConfigError,
        match="distilled_guidance_layer \\(the approximator: LoRAs on it break Chroma\\), which chroma never adapts",
    ):
        targets(["to_q", "in_proj"])

    class OnlySingleBlocks:  # a third-party extension trimming the family's targets
        @hookimpl(wrapper=True)
        def lora_target_modules(self):
            names = yield
            return [n for n in names if n.startswith("single_")]

    assert len(targets("all", ("trim", OnlySingleBlocks()))) == 6


def test_dataset_problems(tiny_chroma, shapes_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("00_red_circle", "01_green_circle"):
        (data / f"{name}.png").write_bytes((shapes_dir / f"{name}.png").read_bytes())
    (data / "00_red_circle.txt").write_text("a red circle")
    (data / "broken.png").write_bytes(b"not an image")
    warnings: list[str] = []
    result, _, _ = train({**base_settings(tiny_chroma, data, tmp_path), "max_train_steps": 1}, warnings=warnings)
    assert result.steps == 1
    assert any(
        "2 image(s)" in w and "have no caption (no .txt or .caption file" in w for w in warnings
    )  # 01_green_circle, broken
    assert any("skipped 1 unreadable image(s): broken.png" in w for w in warnings)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no images"):
        train(base_settings(tiny_chroma, empty, tmp_path))
    with pytest.raises(DataError, match="is not a folder"):
        train(base_settings(tiny_chroma, tmp_path / "missing", tmp_path))


def test_a_missing_model_is_a_one_line_error(shapes_dir, tmp_path):
    from tuner.core.errors import ConfigError, PluginError

    settings = base_settings(tmp_path / "no-model", shapes_dir, tmp_path)
    with pytest.raises(ConfigError, match="no-model: no such folder") as info:  # said before any loading
        train(settings)
    assert "\n" not in str(info.value)
    offline = {**settings, "pretrained_model_name_or_path": "someone/not-cached"}  # a hub id, offline
    with pytest.raises(
        PluginError, match="someone/not-cached is not in the local hub cache and HF_HUB_OFFLINE"
    ) as info:
        train(offline)
    assert "\n" not in str(info.value)


def test_captions_and_files_a_dataset_folder_really_holds(tmp_path, shapes_dir):
    """Empty captions warn like missing ones; .TXT and UTF-16 captions are read; hidden files and
    folders are skipped; a symlinked subfolder is followed, a link loop is not."""
    from tuner.core.data.images import scan_dataset

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    image = (shapes_dir / "00_red_circle.png").read_bytes()
    for name in ("upper", "utf16", "empty", "blank", "missing", "sub/nested"):
        (data / f"{name}.png").write_bytes(image)
    (data / "upper.TXT").write_text("an upper-case extension")
    (data / "utf16.txt").write_bytes("a caption ünicode".encode("utf-16"))  # with its BOM
    (data / "empty.txt").write_text("")
    (data / "blank.txt").write_text("  \n\t ")
    (data / "sub" / "nested.txt").write_text("nested")
    (data / "._upper.png").write_bytes(b"macOS resource fork")
    (data / ".ipynb_checkpoints").mkdir()
    (data / ".ipynb_checkpoints" / "copy.png").write_bytes(image)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "linked.png").write_bytes(image)
    (elsewhere / "linked.txt").write_text("through a link")
    (data / "link").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(data, target_is_directory=True)  # a loop back: must end
    warnings: list[str] = []
    items = {item.image.relative_to(data).as_posix(): item.caption for item in scan_dataset(data, warnings.append)}
    assert items == {
        "blank.png": "",
        "empty.png": "",
        "link/linked.png": "through a link",
        "missing.png": "",
        "sub/nested.png": "nested",
        "upper.png": "an upper-case extension",
        "utf16.png": "a caption ünicode",
    }
    (warning,) = warnings
    assert warning.startswith(f"3 image(s) in {data} have no caption (no .txt or .caption file, or an empty one)")


def test_weights_are_never_unpickled(tiny_chroma, shapes_dir, tmp_path, monkeypatch):
    """A whole run (caching, training, validation, saving, self-test) with torch's unpickler
    forbidden; and a model folder that holds only .bin weights is a one-line refusal."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from tuner.core.errors import PluginError

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load was called: weights must come from safetensors")

    monkeypatch.setattr(torch, "load", forbidden)
    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "max_train_steps": 2}
    result, _, _ = train({**settings, "validation_prompt": "a red circle", "validation_num_inference_steps": 2})
    assert result.steps == 2
    monkeypatch.undo()

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_chroma, pickled)
    for weights in (pickled / "vae").glob("*.safetensors"):
        torch.save(load_file(weights), weights.with_name("diffusion_pytorch_model.bin"))
        weights.unlink()
    with pytest.raises(PluginError) as info:
        train({**settings, "pretrained_model_name_or_path": str(pickled), "cache_dir": str(tmp_path / "c2")})
    message = str(info.value)
    assert message.startswith("chroma: the vae of ") and "tuner never unpickles .bin files" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("schedule", "extra", "factor"),
    [
        ("linear", {}, lambda p: 1 - p),
        (  # two hard restarts; diffusers ends it at 0
            "cosine_with_restarts",
            {"lr_num_cycles": 2},
            lambda p: 0.0 if p >= 1 else 0.5 * (1 + math.cos(math.pi * ((2 * p) % 1.0))),
        ),
        ("polynomial", {"lr_power": 2.0}, lambda p: ((1e-3 - 1e-7) * (1 - p) ** 2 + 1e-7) / 1e-3),
    ],
)
def test_learning_rate_schedules_follow_their_formulas(tiny_chroma, shapes_dir, tmp_path, schedule, extra, factor):
    """diffusers' schedules by the names its users know, with their own keys (lr_num_cycles, lr_power)
    reaching them: the logged learning rate after warm-up is the formula's."""
    settings = {
        **base_settings(tiny_chroma, shapes_dir, tmp_path),
        "lr_scheduler": schedule,
        "lr_warmup_steps": 2,
        "max_train_steps": 10,
        **extra,
    }
    result, _, config = train(settings)
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows[:2]] == pytest.approx([5e-4, 1e-3])  # linear warm-up (after steps 1, 2)
    for row in rows[2:]:
        progress = (row["step"] - 2) / (10 - 2)
        assert row["lr"] == pytest.approx(1e-3 * factor(progress), rel=1e-6, abs=1e-12), (schedule, row["step"])
