"""Chroma's attention mask: real tokens plus one pad, image tokens never masked, boolean everywhere.

Invariance: changing the embeddings after the first pad token must change nothing, in the
training forward (with and without gradient checkpointing) and at validation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuner.core.errors import DataError
from tuner.core.fixes import checkpoint_blocks
from tuner.core.host.records import ValidationRequest
from tuner.plugins.fluxlike import latents as fl

from .conftest import base_settings, make_config, make_host

TOKENS, REAL = 16, 5  # 5 real tokens (incl. </s>), so position 5 is the kept pad


@pytest.fixture(scope="module")
def host():
    return make_host()


@pytest.fixture
def config(host, tiny_chroma, shapes_dir, tmp_path):
    return make_config(host, base_settings(tiny_chroma, shapes_dir, tmp_path))


def fresh_transformer(host, config):
    transformer = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
    return transformer.eval()


def text_pair(seed=0):
    """Cached-style text and a copy whose embeddings after the first pad are different."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, TOKENS, 32, generator=g)
    tokenizer_mask = torch.zeros(1, TOKENS, dtype=torch.bool)
    tokenizer_mask[:, :REAL] = True
    text = {"prompt_embeds": embeds, "attention_mask": fl.keep_first_pad(tokenizer_mask)}
    changed = {**text, "prompt_embeds": embeds.clone()}
    changed["prompt_embeds"][:, REAL + 1 :] = torch.randn(1, TOKENS - REAL - 1, 32, generator=g) * 5
    return text, changed


def predict(host, config, transformer, text, grad=False):
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(1, 16, 8, 8, generator=g)
    sigmas = torch.tensor([0.6])
    with torch.set_grad_enabled(grad):
        return host.provide(
            "predict_flow",
            transformer=transformer,
            noisy_latents=noisy,
            sigmas=sigmas,
            text=text,
            config=config,
            generator=torch.Generator().manual_seed(0),
        )


def test_keep_first_pad_and_joint_mask():
    tokenizer_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = fl.keep_first_pad(tokenizer_mask)
    assert mask.tolist() == [[True, True, True, True, False, False], [True] * 6]
    joint = fl.joint_mask(mask, 3)
    assert joint.dtype == torch.bool and joint[:, 6:].all() and joint[0, :6].tolist() == mask[0].tolist()


def test_t5_padding_zero_zeroes_masked_embeddings():
    text, _ = text_pair()
    embeds, mask = fl.conditioning(text, "zero")
    assert torch.all(embeds[~mask] == 0) and torch.equal(embeds[mask], text["prompt_embeds"][mask])
    untouched, _ = fl.conditioning(text, "unmodified")
    assert torch.equal(untouched, text["prompt_embeds"])


def test_packing_matches_diffusers_layout():
    from diffusers import ChromaPipeline

    latents = torch.randn(2, 16, 8, 6)
    assert torch.equal(fl.pack(latents), ChromaPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(fl.unpack(fl.pack(latents), 8, 6), latents)
    ids = ChromaPipeline._prepare_latent_image_ids(1, 4, 3, "cpu", torch.float32)
    assert torch.equal(fl.image_ids(8, 6), ids)


def test_diffusers_checkpointing_drops_the_mask(host, config):
    """The diffusers bug tuner.core.fixes works around. If this fails, diffusers fixed it:
    drop fixes.checkpoint_blocks and use model.enable_gradient_checkpointing()."""
    transformer = fresh_transformer(host, config)
    transformer.enable_gradient_checkpointing()
    text, changed = text_pair()
    a, b = predict(host, config, transformer, text, grad=True), predict(host, config, transformer, changed, grad=True)
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_forward_ignores_tokens_after_the_first_pad(host, config, checkpointing):
    transformer = fresh_transformer(host, config)
    if checkpointing:
        assert checkpoint_blocks(transformer) == 3  # 1 double + 2 single blocks
    text, changed = text_pair()
    a, b = predict(host, config, transformer, text, grad=True), predict(host, config, transformer, changed, grad=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # ...while the kept pad token and the real tokens do matter (the check can fail)
    pad_changed = {**text, "prompt_embeds": text["prompt_embeds"].clone()}
    pad_changed["prompt_embeds"][:, REAL] += 3.0
    assert not torch.allclose(a, predict(host, config, transformer, pad_changed, grad=True), atol=1e-4)


def test_checkpointing_changes_neither_outputs_nor_gradients(host, config):
    text, _ = text_pair()
    results = []
    for checkpointing in (False, True):
        transformer = fresh_transformer(host, config)
        if checkpointing:
            checkpoint_blocks(transformer)
        out = predict(host, config, transformer, text, grad=True)
        out.square().mean().backward()
        results.append((out.detach(), transformer.x_embedder.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def render(host, config, transformer, text, negative, mask_dtype=torch.bool):
    vae = host.provide("load_model", config=config, component="vae", dtype=torch.float32)
    scheduler = host.provide("load_model", config=config, component="scheduler", dtype=torch.float32)
    cast = lambda t: {**t, "attention_mask": t["attention_mask"].to(mask_dtype)}  # noqa: E731
    request = ValidationRequest(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        prompts=["p"],
        text=[cast(text)],
        negative_text=cast(negative),
        seeds=[7],
        width=64,
        height=64,
        num_inference_steps=4,
        config=config,
    )
    with torch.no_grad():
        return np.asarray(host.provide("generate_images", request=request)[0], dtype=np.int16)


def test_validation_ignores_tokens_after_the_first_pad(host, config):
    assert config.validation_guidance_real > 1  # real CFG: the negative prompt's mask matters too
    transformer = fresh_transformer(host, config)
    text, changed = text_pair(0)
    negative, negative_changed = text_pair(1)
    same = render(host, config, transformer, text, negative)
    assert np.array_equal(same, render(host, config, transformer, changed, negative_changed))


def test_pipeline_float_mask_does_not_mask(host, config):
    """Why tuner hands ChromaPipeline boolean masks: a float 0/1 mask is added as a bias, so padding
    leaks into the images (the pipeline builds exactly such a mask from a prompt)."""
    from diffusers import ChromaPipeline

    transformer = fresh_transformer(host, config)
    text, changed = text_pair(0)
    float_mask = text["attention_mask"].float()
    pipe = ChromaPipeline(
        scheduler=host.provide("load_model", config=config, component="scheduler", dtype=None),
        vae=host.provide("load_model", config=config, component="vae", dtype=torch.float32),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    outputs = []
    for t in (text, changed):
        outputs.append(
            pipe(
                prompt_embeds=t["prompt_embeds"],
                prompt_attention_mask=float_mask,
                guidance_scale=1.0,
                num_inference_steps=2,
                height=64,
                width=64,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
            ).images
        )
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)


def test_text_cache_without_masks_is_refused(host, config, tmp_path):
    from tuner.core.data.cache import prepare_caches
    from tuner.core.data.images import scan_dataset

    items = scan_dataset(config.data_dir, lambda m: None)[:1]
    prepared = prepare_caches(host, config, items, [], "cpu", torch.float32, lambda m: None)
    # an entry written by a tool that did not store masks
    key = prepared.entries[0].text
    prepared.text.save(key, {"prompt_embeds": prepared.text.load(key)["prompt_embeds"]})
    with pytest.raises(DataError, match=r"has no attention_mask .*delete .* to rebuild the text cache"):
        prepare_caches(host, config, items, [], "cpu", torch.float32, lambda m: None)
