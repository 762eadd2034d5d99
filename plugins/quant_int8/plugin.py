"""Registers ``int8-quanto``, ``int4-quanto`` and ``fp8-quanto``. Import-cheap: quanto is imported
when quantizing."""

from __future__ import annotations

import functools

from tuner.core import hookimpl
from tuner.core.api import PrecisionInfo

HINT = "install it with: pip install optimum-quanto  (or: pip install 'tuner[quanto]')"
PRECISIONS = {"int8-quanto": "qint8", "int4-quanto": "qint4", "fp8-quanto": "qfloat8"}


def int8_bytes(out_features: int, in_features: int, float_bytes: int) -> float:
    # a scale per output channel, and the layer's input and output scales
    return out_features * in_features + float_bytes * out_features + 2 * float_bytes


def int4_bytes(out_features: int, in_features: int, float_bytes: int) -> float:
    groups = out_features * in_features // int4_group_size(in_features)  # a scale and a shift each
    return out_features * in_features / 2 + 2 * float_bytes * groups + 2 * float_bytes


def int4_group_size(in_features: int) -> int:
    """quanto's rule (QModuleMixin): 128, or the largest multiple of 32 below it that divides
    the width; per row when none does or the width is at most 128."""
    size = 128
    if in_features > size:
        while in_features % size and size > 32:
            size -= 32
        if in_features % size == 0:
            return size
    return in_features


def quantize(model, unit, exclude, weights):
    from tuner.plugins.quant_int8 import quantizer

    return quantizer.quantize(model, unit, weights, exclude)


@hookimpl
def register_precisions(register):
    register(
        PrecisionInfo(
            "int8-quanto",
            "int8 weights, per-channel scales (optimum-quanto)",
            ("optimum.quanto",),
            HINT,
            weight_bytes=int8_bytes,
            keeps_inputs=True,  # quanto's qbytes/qbits autograd functions save the input
            quantize=functools.partial(quantize, weights=PRECISIONS["int8-quanto"]),
            step_time=1.07,  # benchmarks/gpu.py --tiers, H200, real Chroma at 1024 px (docs/benchmarks.md)
        )
    )
    register(
        PrecisionInfo(
            "int4-quanto",
            "int4 weights, group-wise scales (optimum-quanto)",
            ("optimum.quanto",),
            HINT,
            weight_bytes=int4_bytes,
            keeps_inputs=True,
            quantize=functools.partial(quantize, weights=PRECISIONS["int4-quanto"]),
        )
    )
    register(
        PrecisionInfo(
            "fp8-quanto",
            "float8 (e4m3) weights, per-channel scales (optimum-quanto), computed in the run's dtype",
            ("optimum.quanto",),
            HINT,
            weight_bytes=int8_bytes,  # one byte a weight and a scale per output channel, as int8
            keeps_inputs=True,
            quantize=functools.partial(quantize, weights=PRECISIONS["fp8-quanto"]),
            step_time=1.9,  # as int8's: 2.24 s against bf16's 1.13-1.20 s (Marlin's fp8 kernel, H200)
        )
    )
