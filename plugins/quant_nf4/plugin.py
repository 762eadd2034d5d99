"""Registers ``nf4-bnb``. Import-cheap: bitsandbytes is imported when quantizing."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.types import PrecisionInfo


@hookimpl
def register_precisions(register):
    register(
        PrecisionInfo(
            "nf4-bnb",
            "NF4 weights with double quantization (bitsandbytes)",
            ("bitsandbytes",),
            "install it with: pip install bitsandbytes  (or: pip install 'tuner[bnb]')",
        )
    )


@hookimpl
def quantize_model(model, unit, precision, exclude):
    if precision != "nf4-bnb":
        return None
    from tuner.plugins.quant_nf4 import quantizer

    return quantizer.quantize(model, unit, exclude)
