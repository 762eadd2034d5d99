"""The seed's first answer to out-of-memory at start: offload_during_startup, and quantized text
encoders (text_encoder_N_precision), in caching, in the cache key and in the estimate."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .conftest import base_settings, make_config, make_host, train

CPU = torch.device("cpu")


def layers_with_weights(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if list(m.parameters(recurse=False))]


class MaterializedLayers(TorchDispatchMode):
    """At every operator, counts the layers whose own weights are materialized (not on meta)."""

    def __init__(self, layers: list[torch.nn.Module]):
        super().__init__()
        self.layers, self.counts = layers, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts.append(sum(any(not p.is_meta for p in m.parameters(recurse=False)) for m in self.layers))
        return func(*args, **(kwargs or {}))


def encode(host, config, offloaded_check: list):
    """Encode two images and two captions the way caching does; record what was materialized."""
    from tuner.core.model.encoders import load_text_encoders, load_vae

    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = load_vae(host, config, CPU, torch.float32)
    vae_layers = layers_with_weights(vae)
    with torch.no_grad(), MaterializedLayers(vae_layers) as watch:
        latents = host.provide("encode_images", vae=vae, pixels=pixels, config=config)
    offloaded_check.append(("vae", len(vae_layers), watch.counts, all(p.is_meta for p in vae.parameters())))
    encoders = load_text_encoders(host, config, CPU, torch.float32)
    t5_layers = layers_with_weights(encoders.encoder)
    with torch.no_grad(), MaterializedLayers(t5_layers) as watch:
        text = host.provide(
            "encode_prompts",
            text_encoders=encoders,
            prompts=["a red circle", "a cat"],
            config=config,
            device=CPU,
            references=None,
        )
    offloaded_check.append(("t5", len(t5_layers), watch.counts, all(p.is_meta for p in encoders.encoder.parameters())))
    return latents, text


def test_offloaded_encoders_keep_their_weights_off_the_device_between_layers(tiny_chroma, shapes_dir, tmp_path):
    host = make_host()
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    whole: list = []
    latents, text = encode(host, make_config(host, settings), whole)
    for name, layers, counts, on_meta in whole:  # without the key: every layer's weights all along
        assert set(counts) == {layers} and not on_meta, name

    offloaded: list = []
    config = make_config(host, {**settings, "offload_during_startup": True})
    offloaded_latents, offloaded_text = encode(host, config, offloaded)
    for name, layers, counts, on_meta in offloaded:
        assert layers > 5, name
        assert max(counts) == 1, name  # one layer's weights at a time, while it runs
        assert on_meta, name  # between uses the module holds no weights (they wait in system RAM)
    torch.testing.assert_close(offloaded_latents, latents, rtol=0, atol=0)
    assert offloaded_text.keys() == text.keys()
    for key in text:
        torch.testing.assert_close(offloaded_text[key], text[key], rtol=0, atol=0)


def test_a_run_with_offload_trains_like_one_without(tiny_chroma, shapes_dir, tmp_path):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path / "a")
    plain, _, _ = train(settings)
    offloaded, _, _ = train({**base_settings(tiny_chroma, shapes_dir, tmp_path / "b"), "offload_during_startup": True})
    assert offloaded.losses == plain.losses


def test_the_estimate_counts_offloaded_caching_one_layer_at_a_time(tiny_chroma, shapes_dir, tmp_path):
    from tuner.core.estimate import estimate

    host = make_host()
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    whole = estimate(host, make_config(host, settings), "cuda")
    offloaded = estimate(host, make_config(host, {**settings, "offload_during_startup": True}), "cuda")
    for phase in ("encode images", "encode text"):
        before, after = whole.phase(phase), offloaded.phase(phase)
        weights = next(iter(before.parts.values()))
        layer = next(iter(after.parts.values()))
        assert layer < weights
        assert after.device < before.device, phase
        assert after.device <= before.device - weights + layer + 1024, phase  # the weights, not the activations
        assert after.ram - before.ram < 64 * 2**20  # the weights still pass through RAM (+ this process's growth)
    assert offloaded.phase("train").device == whole.phase("train").device


def test_text_encoder_precision_quantizes_t5_and_keys_the_text_cache(tiny_chroma, shapes_dir, tmp_path):
    from tuner.core.data.cache import TensorCache, cache_key
    from tuner.core.model.encoders import load_text_encoders

    host = make_host()
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    plain = make_config(host, settings)
    quantized = make_config(host, {**settings, "text_encoder_1_precision": "int8-quanto"})
    encoders = load_text_encoders(host, quantized, CPU, torch.float32)
    kinds = {type(m).__name__ for m in encoders.encoder.modules()}
    assert "QLinear" in kinds and "Linear" not in kinds  # every Linear of T5 is int8 now
    reference = load_text_encoders(host, plain, CPU, torch.float32)
    prompts = ["a red circle on a white background"]
    with torch.no_grad():
        a = host.provide(
            "encode_prompts", text_encoders=encoders, prompts=prompts, config=quantized, device=CPU, references=None
        )
        b = host.provide(
            "encode_prompts", text_encoders=reference, prompts=prompts, config=plain, device=CPU, references=None
        )
    error = (a["prompt_embeds"] - b["prompt_embeds"]).abs().max() / b["prompt_embeds"].abs().max()
    assert 0 < error < 0.05  # int8 changes the encoding a little, so it must not share a cache
    root = tmp_path / "cache"
    keyed = {TensorCache(root, "text", cache_key(host, c, "text", "text_encoder")).dir for c in (plain, quantized)}
    assert len(keyed) == 2
    latents = {TensorCache(root, "latents", cache_key(host, c, "latents", "vae")).dir for c in (plain, quantized)}
    assert len(latents) == 1  # image latents do not depend on the text encoder

    result, _, _ = train({**settings, "text_encoder_1_precision": "int8-quanto", "max_train_steps": 2})
    assert result.steps == 2

    # the estimate counts the encoder as the backend stores it
    from tuner.core.estimate import estimate
    from tuner.core.model.quantize import quantized_bytes

    counted = estimate(host, quantized, "cuda").phase("encode text").parts["text encoders"]
    stored = quantized_bytes(encoders.encoder, host.precisions["int8-quanto"])
    assert counted == pytest.approx(stored, rel=0.01)
    assert counted < 0.6 * estimate(host, plain, "cuda").phase("encode text").parts["text encoders"]


@pytest.fixture(scope="module")
def chroma1_nf4(tmp_path_factory):
    from tuner.core.estimate import estimate_precisions

    from .conftest import REPO

    host = make_host()
    settings = {
        "pretrained_model_name_or_path": str(REPO / "examples" / "models" / "chroma1-configs"),
        "resolution": 1024,
        "network_rank": 16,
        "base_model_precision": "nf4-bnb",
        "validation_prompt": "a photo",
    }
    # both caching variants over one traced training step (what `tuner estimate --plan` does)
    found = estimate_precisions(host, make_config(host, settings), ["nf4-bnb"], "cuda", offloads=[False, True])
    return dict(zip((False, True), found, strict=True))


@pytest.mark.slow
def test_real_chroma_at_nf4_peaks_in_training_with_offload(chroma1_nf4):
    """Without the key T5-XXL in bf16 (10.9 GiB) is the peak of a 4-bit run; with it, training is."""
    from tuner.core.estimate import GiB, shortfalls

    whole, offloaded = chroma1_nf4[False], chroma1_nf4[True]
    assert whole.peak_phase.name == "encode text"
    assert offloaded.peak_phase.name == "train"
    # T5-XXL's activations for a batch of 8 x 512 tokens and its largest layer (the 251 MiB embedding)
    assert offloaded.phase("encode text").device < 2.5 * GiB < 10 * GiB < whole.phase("encode text").device
    (line,) = shortfalls(whole, 9 * GiB, 64 * GiB)  # an 8-9 GB card: caching does not fit
    assert "(encode text)" in line and "offload_during_startup: true" in line
