"""Loading the frozen denoiser quantized, block by block, so peak memory stays near the quantized size.

The model is built on the meta device, then each block's weights are read from the safetensors
files (memory-mapped, one tensor at a time) and the precision's ``quantize`` function (registered
by its plugin in a :class:`~tuner.core.host.records.PrecisionInfo`) quantizes that block before the next
one is read. The family declares which diffusers class to build
(``FamilyInfo.transformer_class``) and which modules stay in high precision
(``high_precision_modules``); the quantizer never imports a family and the family never imports a
quantization library.
"""

from __future__ import annotations

import functools
import gc
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuner.core.config.values import model_source
from tuner.core.errors import PluginError, first_line
from tuner.core.fixes import damaged_safetensors

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config
    from tuner.core.host.manager import PluginHost
    from tuner.core.host.records import PrecisionInfo


# Freed float weights are handed back to the OS (malloc_trim) once this many bytes were read since
# the last time: after every block of a real model (each is larger), every few blocks of a small
# one. Each trim costs its walk of the heap and the page faults of the next allocations
# (benchmarks/quantized_load.py: trimming after each of Chroma's 64 units doubled a narrow model's
# load; never trimming lets RSS grow to the whole float model).
TRIM_BYTES = 16 * 2**20


def require_backend(precision: PrecisionInfo) -> None:
    """A one-line error with the install hint when the precision's library cannot be imported."""
    for module in precision.requires:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise PluginError(
                f"base_model_precision {precision.name} needs {module} ({exc}); {precision.install_hint}"
            ) from None


def import_object(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def block_units(model: torch.nn.Module) -> list[str]:
    """Names of the loading units: each repeated block, and each other top-level part, in order."""
    block_classes = set(getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or [])

    def holds_blocks(module: torch.nn.Module) -> bool:
        return any(type(m).__name__ in block_classes for m in module.modules())

    units: list[str] = []

    def walk(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if type(child).__name__ in block_classes or not holds_blocks(child):
                units.append(full)
            else:
                walk(child, full + ".")

    walk(model, "")
    return units


class WeightFiles:
    """Tensor name -> safetensors file of a diffusers model folder; tensors are copied out per unit.

    A sharded folder is read through its ``*.safetensors.index.json``, an unsharded one from
    ``diffusion_pytorch_model.safetensors``: other weight files in the folder (a stale save of
    another size, found on a GPU: docs/benchmarks.md) are never mixed in.

    Files are memory-mapped only while one unit is read, so the mapped pages of the whole model
    never count against the process at once.
    """

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:  # sharded: the index says which file holds each tensor, as diffusers reads it
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise PluginError(f"{indexes[0]}: not a safetensors index ({first_line(exc)})") from None
            self.where = {name: folder / file for name, file in weight_map.items()}
            self.files = sorted(set(self.where.values()))
            absent = [f for f in self.files if not f.is_file()]
            if absent:
                raise PluginError(f"{indexes[0]} names {absent[0].name}, which is not in {folder}")
            _refuse_damaged(self.files)
            return
        # one file: diffusers' own name when present, so a stray file beside it is never mixed in
        own = folder / "diffusion_pytorch_model.safetensors"
        self.files = [own] if own.is_file() else sorted(folder.glob("*.safetensors"))
        if not self.files:
            raise PluginError(f"{folder} holds no .safetensors weights (tuner never unpickles .bin files)")
        _refuse_damaged(self.files)
        for file in self.files:
            with safe_open(str(file), framework="pt") as handle:
                self.where.update(dict.fromkeys(handle.keys(), file))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        tensors = {}
        for file in sorted({self.where[n] for n in names}):
            with safe_open(str(file), framework="pt") as handle:
                for name in names:
                    if self.where[name] == file:
                        tensors[name] = handle.get_tensor(name).clone()  # own memory, not the mapping
        return tensors


def _refuse_damaged(files: list[Path]) -> None:
    damaged = damaged_safetensors([str(f) for f in files])
    if damaged is not None:
        raise PluginError(damaged)


def cast_input_as_autocast(layer: torch.nn.Module, args: tuple) -> tuple | None:
    """A forward pre-hook for quantized layers: the input in the autocast dtype, as autocast casts a
    plain Linear's. Quantized layers bypass autocast and compute in (and return) the dtype they are
    given; the norms before them hand over fp32, so without it the residual stream of every block
    ran in fp32 (bitsandbytes' NF4: about 2 GiB more than bf16 for the real Chroma at 1024 px on
    an H200) and optimum-quanto's fp8 kernel on CUDA (Marlin's) refused the input outright."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or not torch.is_autocast_enabled(x.device.type):
        return None
    return (x.to(torch.get_autocast_dtype(x.device.type)), *args[1:])


def release_freed_memory(collect: bool = True) -> None:
    """Hand freed memory back to the OS. glibc keeps large freed blocks after its mmap threshold
    has grown, so without this the resident size grows with every quantized layer although the
    model does not. ``collect=False`` skips the (slow) garbage collection, for per-layer calls."""
    if collect:
        gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def _local_folder(source: str, subfolder: str, revision: str | None) -> Path:
    folder = Path(source)
    if folder.is_dir():
        return folder / subfolder
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(source, revision=revision, allow_patterns=[f"{subfolder}/*"])
    except Exception as exc:  # the hub client raises many kinds
        raise PluginError(f"cannot download {subfolder} of {source!r}: {first_line(exc)}") from None
    return Path(root) / subfolder


def load_quantized(host: PluginHost, config: Config, dtype: torch.dtype, device: Any = "cpu") -> torch.nn.Module:
    """Build the family's denoiser on meta, then stream and quantize it block by block. Each block
    is put on ``device`` before it is quantized, so on a GPU the accelerator quantizes (both
    bitsandbytes and quanto quantize CUDA tensors there) and the CPU never holds the model."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    family = host.family
    info = host.precisions[config.base_model_precision]
    require_backend(info)
    if info.quantize is None:
        raise PluginError(f"base_model_precision {info.name} ({info.plugin}) registers no quantize function")
    if not family.transformer_class:
        raise PluginError(
            f"model family {family.name} ({family.plugin}) does not declare a transformer_class to quantize"
        )
    cls = import_object(family.transformer_class)
    folder = _local_folder(model_source(config, family.flavours), family.transformer_subfolder, config.revision)
    model_config = json.loads((folder / "config.json").read_text())
    with init_empty_weights():
        model = cls.from_config(model_config)
    keep = list(host.call("high_precision_modules", transformer=model, config=config) or [])
    weights = WeightFiles(folder)
    expected = set(model.state_dict())
    missing = sorted(expected - set(weights.where))
    if missing:
        raise PluginError(
            f"{folder}: weights for {missing[0]} (and {len(missing) - 1} more) are missing; "
            f"is this a diffusers {cls.__name__} folder?"
        )
    unread = 0
    for unit in block_units(model):
        tensors = weights.read(sorted(n for n in expected if n.startswith(unit + ".")))
        unread += sum(t.numel() * t.element_size() for t in tensors.values())
        for name in list(tensors):
            tensor = tensors.pop(name)
            set_module_tensor_to_device(
                model, name, device, value=tensor, dtype=dtype if tensor.is_floating_point() else None
            )
            del tensor
        exclude = [k for k in keep if k == unit or k.startswith(unit + ".") or unit.startswith(k + ".")]
        info.quantize(model, unit, exclude)
        # malloc_trim only (see TRIM_BYTES): the unit's float tensors are freed by reference
        # counting (no cycles hold them), and a full collection costs ~0.3 s per call in a process
        # holding torch and diffusers (benchmarks/quantized_load.py: 64 of them were 20 s of 21)
        if unread >= TRIM_BYTES:
            release_freed_memory(collect=False)
            unread = 0
    model.requires_grad_(False)
    return model.eval()


def excluded(name: str, exclude: list[str]) -> bool:
    """True when ``name`` is one of ``exclude`` or lies under one of them."""
    return any(name == k or name.startswith(k + ".") for k in exclude)


def plain_linears(model: torch.nn.Module, unit: str, exclude: list[str]) -> list[str]:
    """Full names of the still-unquantized ``nn.Linear`` modules in ``unit`` that may be quantized."""
    root = model.get_submodule(unit) if unit else model
    prefix = f"{unit}." if unit else ""
    names = [f"{prefix}{n}" if n else unit for n, m in root.named_modules() if type(m) is torch.nn.Linear]
    return [n for n in names if not excluded(n, exclude)]


def quantized_bytes(model: torch.nn.Module, precision: PrecisionInfo | None = None) -> int:
    """Bytes of the model's weights as stored: quantized tensors count their packed data and scales
    (tensor subclasses by their inner tensors; what else the precision keeps beside a weight by its
    ``stored_tensors``)."""
    extra = precision.stored_tensors if precision is not None else None
    return sum(t.numel() * t.element_size() for w in [*model.parameters(), *model.buffers()] for t in stored(w, extra))


def wrapper_subclass(tensor: Any) -> bool:
    """Whether ``tensor`` is stored in inner tensors (a quantized weight: optimum-quanto's, torchao's),
    not the estimate's fake tensors, which look alike."""
    from torch._subclasses.fake_tensor import FakeTensor  # no public path

    return hasattr(tensor, "__tensor_flatten__") and not isinstance(tensor, FakeTensor)


def stored(tensor: Any, extra: Any = None) -> list[torch.Tensor]:
    """The plain tensors a (possibly quantized) tensor is stored in."""
    if wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()  # a wrapper subclass (quanto): its inner tensors
        return [t for name in names for t in stored(getattr(tensor, name), extra)]
    return [tensor, *(extra(tensor) if extra is not None else [])]
