"""Registers ``nf4-bnb``. Quantizing is not implemented yet and says so."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.errors import PluginError
from tuner.core.types import PrecisionInfo


@hookimpl
def register_precisions(register):
    register(
        PrecisionInfo(
            "nf4-bnb",
            "NF4 weights with double quantization (bitsandbytes)",
            ("bitsandbytes",),
            "pip install bitsandbytes",
        )
    )


@hookimpl
def quantize_model(precision):
    if precision == "nf4-bnb":
        raise PluginError("base_model_precision nf4-bnb is registered but not implemented yet; use no_change")
    return None
