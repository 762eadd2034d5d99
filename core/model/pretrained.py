"""Loading a family's components with ``from_pretrained``: safetensors only, one-line errors, and
the default ``load_model`` a family gets from its record (``FamilyInfo.transformer_class``,
``vae_class``, ``scheduler_class``, ``pipeline_class``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from tuner.core.config.values import model_source
from tuner.core.errors import PluginError, first_line
from tuner.core.fixes import READ_ERRORS, damaged_safetensors
from tuner.core.host.records import FamilyInfo
from tuner.core.model.quantize import import_object


def load_component(family: str, source: str, component: str, loaders: dict[str, Callable[[], Any]]) -> Any:
    """Call the loader of ``component`` (a ``from_pretrained`` call) with one-line errors."""
    if component not in loaders:
        raise PluginError(f"{family}: unknown model component {component!r}")
    try:
        return loaders[component]()
    except READ_ERRORS as exc:  # with safetensors' own error for a truncated file (tuner.core.fixes)
        named = re.findall(r"['\"]([^'\"]+\.safetensors)['\"]", str(exc))  # files diffusers names
        damaged = damaged_safetensors(named or [source])  # the files it names, else the model's folder
        if damaged is not None:
            raise PluginError(f"{family}: {damaged}") from None
        if ".safetensors" in str(exc) or "use_safetensors" in str(exc):
            raise PluginError(
                f"{family}: the {component} of {source!r} has no .safetensors weights (tuner never unpickles "
                f".bin files; convert them to safetensors): {first_line(exc)}"
            ) from None
        raise PluginError(f"{family}: cannot load the {component} of {source!r}: {first_line(exc)}") from None


class Pretrained:
    """``from_pretrained`` on one model source (a hub id or a local diffusers folder, at the run's
    revision): safetensors only, weights in the run's dtype (the hub client honours HF_ENDPOINT)."""

    def __init__(self, source: str, revision: str | None, dtype: torch.dtype):
        self.source, self.dtype = source, dtype
        self.options = {"revision": revision} if revision else {}

    def model(self, cls: Any, subfolder: str) -> Any:
        """A diffusers model (``torch_dtype``)."""
        return cls.from_pretrained(
            self.source, subfolder=subfolder, torch_dtype=self.dtype, use_safetensors=True, **self.options
        )

    def encoder(self, cls: Any, subfolder: str) -> Any:
        """A transformers text encoder (``dtype``), in eval mode."""
        return cls.from_pretrained(
            self.source, subfolder=subfolder, dtype=self.dtype, use_safetensors=True, **self.options
        ).eval()

    def tokenizer(self, subfolder: str) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.source, subfolder=subfolder, **self.options)

    def scheduler(self, cls: Any, subfolder: str = "scheduler") -> Any:
        return cls.from_pretrained(self.source, subfolder=subfolder, **self.options)

    def text_pipeline(self, cls: Any, **components: Any) -> Any:
        """The pipeline without transformer and VAE: its text encoders, tokenizers and encode_prompt
        (``components`` given instead of loaded, e.g. a processor built another way)."""
        return cls.from_pretrained(
            self.source,
            transformer=None,
            vae=None,
            use_safetensors=True,
            **components,
            **pipeline_dtype(self.dtype),
            **self.options,
        )


def pipeline_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype argument of ``DiffusionPipeline.from_pretrained``: ``dtype`` from diffusers 0.42
    (``torch_dtype`` warns there), ``torch_dtype`` before."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42.0.dev0") else "torch_dtype": dtype}


def load_declared(family: FamilyInfo, config: Any, component: str, dtype: torch.dtype) -> Any:
    """``load_model`` from the family's record: each class it declares, from its subfolder."""
    hub = Pretrained(model_source(config, family.flavours), config.revision, dtype)
    own = config.get("pretrained_transformer_model_name_or_path")  # a fine-tuned denoiser beside the base

    def transformer(cls: Any) -> Any:
        if not own:
            return hub.model(cls, family.transformer_subfolder)
        from pathlib import Path

        subfolder = config.get("pretrained_transformer_subfolder")
        if subfolder is None and (Path(own) / family.transformer_subfolder).is_dir():
            subfolder = family.transformer_subfolder  # the run's output folder, or a whole pipeline
        return Pretrained(own, None, dtype).model(cls, subfolder)

    declared = {
        "transformer": (family.transformer_class, transformer),
        "vae": (family.vae_class, lambda cls: hub.model(cls, "vae")),
        "scheduler": (family.scheduler_class, hub.scheduler),
        "text_encoders": (family.pipeline_class, hub.text_pipeline),
    }
    if component in declared and not declared[component][0]:
        field = {"transformer": "transformer_class", "text_encoders": "pipeline_class"}.get(
            component, f"{component}_class"
        )
        raise PluginError(
            f"model family {family.name} ({family.plugin}) declares no {field} and does not load its {component} itself"
        )
    loaders = {name: (lambda c=cls, load=load: load(import_object(c))) for name, (cls, load) in declared.items()}
    return load_component(family.name, hub.source, component, loaders)
