"""The family's models as ``tuner estimate`` sees them: config files only (a local folder or a few
KB from the hub), models built on the meta device, parameters swapped for fake tensors."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from tuner.core.errors import PluginError, first_line


class ModelFiles:
    """The config files of a diffusers model folder or hub repository; never its weights."""

    def __init__(self, source: str, revision: str | None):
        self.source, self.revision = source, revision
        self.checked = False  # whether the hub was asked whether it can answer

    def json(self, name: str) -> dict[str, Any]:
        folder = Path(self.source)
        if folder.is_dir():
            path = folder / name
            if not path.is_file():
                raise PluginError(f"{path} is missing: the estimate needs the model's config files")
        else:
            from huggingface_hub import hf_hub_download

            from tuner.core.model.hub import check_hub_model

            if not self.checked:  # offline and not cached: one line at once, naming HF_HUB_OFFLINE
                check_hub_model(self.source, self.revision, "estimate: pretrained_model_name_or_path")
                self.checked = True
            try:
                path = Path(hf_hub_download(self.source, name, revision=self.revision))
            except Exception as exc:  # the hub client raises many kinds
                raise PluginError(
                    f"cannot read {name} of {self.source!r} ({first_line(exc)}); the estimate needs only the "
                    "config files (a few KB), from the hub or a local diffusers folder"
                ) from None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise PluginError(f"{path}: not valid JSON ({first_line(exc)})") from None

    def weight_bytes(self, subfolder: str, model: torch.nn.Module) -> int:
        """Size of a component's safetensors files in a local folder; otherwise (a hub id, a
        folder of config files) its parameters in bf16, as Chroma and Flux checkpoints hold them."""
        files = list((Path(self.source) / subfolder).glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files)
        return 2 * sum(p.numel() for p in model.parameters())

    def components(self) -> dict[str, tuple[str, str]]:
        """Component name -> (library, class) from ``model_index.json``."""
        index = self.json("model_index.json")
        return {k: tuple(v) for k, v in index.items() if isinstance(v, list) and len(v) == 2 and all(v)}


def build_on_meta(library: str, class_name: str, config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers or transformers model built from its config with every parameter on meta."""
    from accelerate import init_empty_weights

    cls = getattr(importlib.import_module(library), class_name)
    with init_empty_weights(), warnings.catch_warnings():
        # diffusers' own Flux-lineage models construct a class it has deprecated
        warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
        if getattr(cls, "config_class", None) is not None:  # transformers
            model = cls(cls.config_class.from_dict(config))
        else:  # diffusers
            model = cls.from_config(config)
    # torch's own cast: diffusers' `to` warns about fp32 modules, which matter for weights only
    model = torch.nn.Module.to(model, dtype)
    _tie_shared_weights(model)
    return model


def _tie_shared_weights(model: torch.nn.Module) -> None:
    """Share the parameters a transformers model declares tied (T5's encoder embedding is its
    ``shared`` table): checkpoints store them once, so they count once."""
    tied = getattr(model, "_tied_weights_keys", None)
    untied_output = getattr(getattr(model, "config", None), "tie_word_embeddings", True) is False
    output = model.get_output_embeddings() if untied_output and hasattr(model, "get_output_embeddings") else None
    for target, source in tied.items() if isinstance(tied, dict) else []:
        owner, _, name = target.rpartition(".")
        if output is not None and model.get_submodule(owner) is output:  # its own head (Qwen2.5-VL 7B)
            continue
        try:
            setattr(model.get_submodule(owner), name, model.get_parameter(source))
        except AttributeError:  # not in this variant of the model
            continue


def to_fake(module: torch.nn.Module, mode: Any) -> torch.nn.Module:
    """Swap every parameter and buffer for a fake tensor of the same shape and dtype, in place
    (tied parameters stay tied)."""
    swapped: dict[int, torch.Tensor] = {}

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in swapped:
            if tensor.device.type == "meta":
                value = torch.empty(tensor.shape, dtype=tensor.dtype)
            else:
                value = mode.from_tensor(tensor)
            if isinstance(tensor, torch.nn.Parameter):
                value = torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
            swapped[id(tensor)] = value
        return swapped[id(tensor)]

    with mode:
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):  # noqa: SLF001 - swap tensors in place, no public API
                for name, tensor in list(table.items()):
                    if tensor is not None:
                        table[name] = fake(tensor)
    return module


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
