"""Workarounds for bugs in the libraries tuner builds on, each in one place with the test that shows it.

* diffusers 0.42 ``ChromaTransformer2DModel``: with ``enable_gradient_checkpointing()`` the
  single-stream blocks are called without ``attention_mask``, so padding is attended under
  checkpointing (tests/test_masking.py::test_diffusers_checkpointing_drops_the_mask shows it).
  :func:`checkpoint_blocks` checkpoints each transformer block by wrapping its ``forward``
  instead, which passes every argument through; the model's own flag stays off.
* diffusers ``ChromaPipeline`` turns the prompt mask into a float 0/1 tensor, which attention adds
  as a bias instead of masking (tests/test_masking.py::test_pipeline_float_mask_does_not_mask).
  Families hand the pipeline precomputed embeddings with boolean masks instead
  (:func:`tuner.plugins.fluxlike.pipeline_text_inputs`).
* bitsandbytes 0.50 ``Linear4bit`` on a CPU with avx512bf16: the first forward in eval mode
  without gradients (validation) repacks the NF4 weights in place into a bf16 kernel format, which
  changes the frozen base and raises for ``in_features`` below the block size 64
  (tests/test_quantization.py::test_bitsandbytes_cpu_repack_bug). The NF4 plugin turns the repack
  off per layer (``support_avx512bf16_for_cpu = False``) in ``tuner.plugins.quant_nf4.quantizer``.
* optimum-quanto 0.2.7 on a CPU multiplies int8 weights by bf16 activations with torch's
  ``_weight_int8pack_mm``, which crashes the process (SIGSEGV) in some calls (Flux's pipeline under
  bf16; scales in another dtype than the activations). The int8 plugin replaces the CPU
  implementation of quanto's ``qbytes_mm`` op with quanto's own portable path
  (``tuner.plugins.quant_int8.quantizer.avoid_int8pack_on_cpu``;
  tests/test_quantization.py::test_quanto_int8_crash_on_cpu).
* diffusers 0.42's Flux-style ``load_lora_weights`` (Flux, Chroma) first compares each LoRA with
  its base weight read from ``transformer.state_dict()``; a quanto-quantized base stores it as
  ``weight._data`` and the lookup raises ``KeyError``. ``tuner sample`` on such a base runs the
  loader's other two steps itself (``lora_state_dict``, ``load_lora_into_transformer``;
  ``tuner.core.run.sampling.apply_lora``; tests/test_bf16.py renders on every precision).
* safetensors 0.8 raises its own ``SafetensorError`` (not ``OSError``) when the disk fills while a
  file is written ("I/O error: No space left on device (os error 28)") and when a truncated file is
  read, so ``except OSError`` misses both. :func:`as_os_error` turns the write failure into the
  ``OSError`` it is (``tuner.core.io.save_safetensors`` applies it to every write), and
  :data:`READ_ERRORS` is what loaders catch (tests/test_reliability.py shows both).
* peft 0.21's LoKr and LoHa layers draw ``torch.rand(1) > module_dropout`` in every training
  forward, even with no module dropout; on the fake tensors of ``tuner estimate`` that comparison
  is data-dependent and raises. :func:`no_module_dropout_draw` marks those layers (and only them)
  as not training while the estimate traces: peft then skips the draw and computes the same
  adapter path (tuner sets no rank dropout); tests/test_estimate.py estimates every type.
* torch 2.13: ``Tensor.dequantize()`` on a float ``Parameter`` returns the Parameter itself and
  leaves its ``grad_fn`` set to ``NotImplemented`` (truthy), after which a module refuses that
  weight ("Cannot assign non-leaf Tensor to parameter"). :func:`dequantized` calls ``dequantize``
  only where a tensor subclass defines its own (optimum-quanto's); DoRA reads base weights with it
  (tests/test_adapters.py shows the bug).
* torch 2.11 (cu130, H200): scaled-dot-product attention picks cuDNN's kernel for the Flux
  lineage's boolean masks, and the first training backward through it fails
  (``mha_graph.execute(...).is_good()`` under ``CUDA_LAUNCH_BLOCKING=1``; without it, an illegal
  memory access surfaces later in an unrelated GEMM or the gradient norm). Seen with the real
  Chroma widths at 512 and 1024 px, with and without checkpointing. :func:`no_cudnn_attention`
  turns that kernel off for CUDA runs; the memory-efficient kernel takes the same masks. Shown on a
  GPU only (CI has none): ``benchmarks/gpu_bisect.sh`` ran each variant in its own process; the
  real Chroma's bf16 step failed before this and ran after it (docs/benchmarks.md, GPU).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def _safetensor_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


READ_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, _safetensor_error())


def damaged_safetensors(places: list[str]) -> str | None:
    """One line naming the first ``.safetensors`` file among ``places`` (files, or folders searched
    below) whose header safetensors refuses: what a truncated or overwritten weight file looks
    like. Loaders say it instead of safetensors' words without a file ("incomplete metadata, file
    not fully covered") or diffusers' guess that no safetensors weights exist. None when all read."""
    from pathlib import Path

    from safetensors import safe_open

    files: list[Path] = []
    for place in map(Path, places):
        files += sorted(place.rglob("*.safetensors")) if place.is_dir() else [place] if place.is_file() else []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # SafetensorError, or an OSError for an unreadable file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"{file}: a damaged weight file ({reason}); is it cut short? download or copy it again"
    return None


def as_os_error(exc: Exception, path: str) -> Exception:
    """A safetensors write failure as the ``OSError`` it reports (errno from "os error N"), so disk-full
    handling sees it; any other exception unchanged."""
    import re

    if not isinstance(exc, _safetensor_error()):
        return exc
    match = re.search(r"os error (\d+)", str(exc))
    return OSError(int(match.group(1)) if match else 5, str(exc), path)  # 5: EIO


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Recompute each repeated block's activations in backward; returns how many blocks were wrapped.

    Blocks are the classes the diffusers model lists in ``_repeated_blocks`` (or ``_no_split_modules``).
    """
    block_classes = set(getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or [])
    wrapped = 0
    for module in model.modules():
        if type(module).__name__ in block_classes and not getattr(module, "tuner_checkpointed", False):
            module.tuner_forward = module.forward  # the block's own (activation offload wraps it anew)
            module.forward = functools.partial(_checkpointed_forward, module.forward)
            module.tuner_checkpointed = True  # a mark: wrapped once, however often it is called
            wrapped += 1
    return wrapped


def _checkpointed_forward(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A base weight as floats: a tensor subclass with its own ``dequantize`` (optimum-quanto's,
    torchao's) dequantized, any other returned as it is (never torch's own ``Tensor.dequantize``
    on a float Parameter: see the module's docstring)."""
    if type(weight).dequantize is not torch.Tensor.dequantize:
        return weight.dequantize()
    return weight


def no_module_dropout_draw(model: torch.nn.Module) -> int:
    """Mark peft's LoKr/LoHa layers of ``model`` as not training (their own flag only), so their
    forward skips the module-dropout draw; returns how many (see the module's docstring)."""
    found = 0
    for module in model.modules():
        if type(module).__module__.startswith(("peft.tuners.lokr", "peft.tuners.loha")) and hasattr(
            module, "module_dropout"
        ):
            module.training = False
            # and so it stays: the step's rollouts (scheduled sampling) switch the model to eval
            # and back to train, which would set the flag again (the trace then failed for them)
            module.train = functools.partial(_not_training, module)
            found += 1
    return found


def _not_training(module: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    return module


def no_cudnn_attention() -> None:
    """Keep scaled-dot-product attention off cuDNN's kernel (see the module's docstring)."""
    torch.backends.cuda.enable_cudnn_sdp(False)
