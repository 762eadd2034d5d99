"""Driving diffusers pipelines with what a run already holds (public API for family plugins)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def partial_pipeline(pipeline_cls: Any, **components: Any) -> Any:
    """A pipeline built from the given components, every other one None (no text encoder when the
    prompts are already encoded, no VAE when only the transformer is needed)."""
    names = [n for n in inspect.signature(pipeline_cls.__init__).parameters if n != "self"]
    return pipeline_cls(**{**dict.fromkeys(names), **components})


def render(pipe: Any, request: Any, per_prompt: Callable[[dict[str, Any]], dict[str, Any]], **shared: Any) -> list[Any]:
    """One PIL image per prompt and seed of a ValidationRequest, with precomputed embeddings:
    ``per_prompt(text)`` gives the pipeline's embedding arguments, ``shared`` the rest."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    images = []
    for text, seed in zip(request.text, request.seeds, strict=True):
        out = pipe(
            **per_prompt(text),
            **shared,
            num_inference_steps=request.num_inference_steps,
            height=request.height,
            width=request.width,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
        )
        images.append(out.images[0])
    return images
