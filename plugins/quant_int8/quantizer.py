"""optimum-quanto: replace plain Linear layers with frozen QLinear (int8, int4 or fp8 weights)."""

from __future__ import annotations

import torch

from tuner.core.api import cast_input_as_autocast, plain_linears


def quantize(model: torch.nn.Module, unit: str, weights: str, exclude: list[str]) -> torch.nn.Module:
    import optimum.quanto as quanto

    avoid_int8pack_on_cpu()
    qtype = getattr(quanto, weights)
    for name in plain_linears(model, unit, exclude):
        # one layer at a time, so only one layer's temporaries exist at once; quanto.quantize is
        # called on the layer's parent (it fnmatches every module name below the module it is
        # given: on the whole model that is ~500k calls for Chroma); freeze quantizes the
        # weights now and drops the float copy
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quanto.quantize(parent, weights=qtype, include=[child])
        layer = getattr(parent, child)
        layer.freeze()
        layer.register_forward_pre_hook(cast_input_as_autocast)  # fp8's CUDA kernel takes no fp32
    return model


_OVERRIDE: list = []  # the torch.library registration below, kept alive


def avoid_int8pack_on_cpu() -> None:
    """optimum-quanto 0.2.7 multiplies int8 weights by bf16 activations on a CPU with torch's
    ``_weight_int8pack_mm``, which crashes the process (SIGSEGV) in some calls: inside Flux's
    pipeline (validation, ``tuner sample``) and whenever the weights' scales are not in the
    activations' dtype. The CPU implementation of its ``quanto::qbytes_mm`` op is replaced, once,
    by the library's own portable path (dequantize, then matmul); CUDA and MPS keep theirs
    (tests/test_quantization.py::test_quanto_int8_crash_on_cpu shows the crash and the fix)."""
    if not _OVERRIDE:
        _OVERRIDE.append(register_portable_cpu_kernel())


def register_portable_cpu_kernel() -> torch.library.Library:
    """Register quanto's portable ``qbytes_mm`` as the op's CPU kernel; returns the registration
    (keep it alive: the kernel lives as long as it does)."""
    import optimum.quanto.library.qbytes_mm as kernels

    def portable(activations: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        if type(activations) is not torch.Tensor:  # quantized activations, as quanto's CPU path does
            activations = activations.dequantize()
        return kernels.qbytes_mm(activations, weights, scales)

    import warnings

    library = torch.library.Library("quanto", "IMPL")
    with warnings.catch_warnings():  # torch warns that a kernel is overridden: that is the point
        warnings.simplefilter("ignore")
        # quanto registers its CPU kernel from Python too; torch 2.11 refuses to override such a
        # kernel unless asked (``allow_override`` defaults to False there, True from 2.13): seen
        # on the GPU machine, where every int8 and fp8 run stopped here
        library.impl("qbytes_mm", portable, "CPU", allow_override=True)
    return library
