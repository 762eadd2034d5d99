"""Validation during a run (images per prompt at fixed seeds, a grid, the prompts) and the recipe
that lets ``tuner sample`` and a diffusers snippet reproduce them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuner.core.config.keys.validation import validation_prompts, validation_sizes
from tuner.core.data.cache import conditioning_key
from tuner.core.data.pairs import open_reference
from tuner.core.host import events
from tuner.core.host.records import ValidationRequest
from tuner.core.io import atomic_write
from tuner.core.outputs.export import LORA_FILE
from tuner.core.run.sampling import render_sizes
from tuner.core.training.sharding import is_sharded

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.data.cache import PreparedData
    from tuner.core.training.state import RunContext


class Validator:
    """Renders a run's validation prompts with the training transformer. The VAE and the inference
    scheduler are loaded on first use and kept."""

    def __init__(self, ctx: RunContext, prepared: PreparedData):
        self.ctx, self.prepared = ctx, prepared
        self.prompts = validation_prompts(ctx.config)
        self.components: dict[str, Any] = {}

    def renders(self, model: torch.nn.Module) -> bool:
        """The main process renders; under FSDP2 every process does (the forward of a sharded model
        gathers its weights from all of them), and the main one writes."""
        return bool(self.prompts) and (self.ctx.is_main or is_sharded(model))

    def seeds(self) -> list[int]:
        config = self.ctx.config
        first = config.seed if config.validation_seed is None else config.validation_seed
        return [first + i for i in range(len(self.prompts))]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return validation_sizes(self.ctx.config)

    def component(self, name: str) -> Any:
        ctx = self.ctx
        if name not in self.components:
            loaded = ctx.host.provide("load_model", config=ctx.config, component=name, dtype=ctx.weight_dtype)
            self.components[name] = loaded.to(ctx.device) if name == "vae" else loaded
        return self.components[name]

    def run(self, model: torch.nn.Module, step: int) -> list[Path]:
        """Render every prompt at every validation size; write PNGs, a grid per size and the prompts
        to ``output_dir/validation/step_N``; returns ``[that folder]`` (``[]`` without prompts or off
        the main process). With one size the files are ``NN.png`` and ``grid.png``, with several
        ``NN_WxH.png`` and ``grid_WxH.png``."""
        if not self.renders(model):
            return []
        ctx, config = self.ctx, self.ctx.config
        text = self.prepared.text
        reference = Path(config.validation_reference_image) if config.get("validation_reference_image") else None
        folder = ctx.output_dir / "validation" / f"step_{step:06d}"
        seeds, written = self.seeds(), []
        was_training = model.training
        model.eval()
        rng = torch.get_rng_state()  # validation must not disturb the training's random stream
        request = ValidationRequest(
            transformer=model,
            vae=self.component("vae"),
            scheduler=self.component("scheduler"),
            prompts=self.prompts,
            text=[_batched(text.load(conditioning_key(p, reference)), ctx.device) for p in self.prompts],
            negative_text=_batched(
                text.load(conditioning_key(config.validation_negative_prompt or "", reference)), ctx.device
            ),
            seeds=seeds,
            width=self.sizes[0][0],
            height=self.sizes[0][1],
            num_inference_steps=config.validation_num_inference_steps,
            config=config,
            device=ctx.device,
            reference=open_reference(reference) if reference is not None else None,
        )
        for (width, height), images in render_sizes(ctx.host, request, self.sizes, ctx.autocast):
            if not ctx.is_main:
                continue
            suffix = f"_{width}x{height}" if len(self.sizes) > 1 else ""
            paths = [folder / f"{i:02d}{suffix}.png" for i in range(len(images))]
            for path, image in zip(paths, images, strict=True):
                atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            atomic_write(
                folder / f"grid{suffix}.png", lambda tmp, images=images: image_grid(images).save(tmp, format="PNG")
            )
            written += paths
        torch.set_rng_state(rng)
        model.train(was_training)
        if not ctx.is_main:
            return []
        lines = "".join(f"{i:02d} seed {s}: {p}\n" for i, (p, s) in enumerate(zip(self.prompts, seeds, strict=True)))
        atomic_write(folder / "prompts.txt", lambda tmp: Path(tmp).write_text(lines))
        ctx.emit(events.Validation, step, folder=str(folder), images=[str(p) for p in written])
        ctx.log(f"step {step}: {len(written)} validation image(s) in {folder}")
        return [folder]

    def write_recipe(self, lora_files: list[Path], suffix: str = "") -> Path:
        """recipe.json and a README with a diffusers snippet, so the previews can be reproduced
        (``suffix``: the previews were rendered with the EMA, whose files end in ``_ema``)."""
        from tuner.core.outputs.export import with_suffix
        from tuner.core.run.sampling import make_recipe, write_recipe

        ctx = self.ctx
        lora = next((p for p in lora_files if p.name == with_suffix(LORA_FILE, suffix)), lora_files[0])
        recipe = make_recipe(
            ctx.host, ctx.config, lora, self.component("scheduler"), self.prompts, self.seeds(), self.sizes
        )
        return write_recipe(ctx.output_dir, recipe, ctx.host.hook.recipe_snippet(recipe=recipe))


def _batched(entry: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.unsqueeze(0).to(device) for k, v in entry.items()}


def image_grid(images: list[Any]) -> Any:
    from PIL import Image

    columns = min(len(images), 4)
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
