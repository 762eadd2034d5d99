"""Registers ``int8-quanto`` and ``int4-quanto``. Quantizing is not implemented yet and says so."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.errors import PluginError
from tuner.core.types import PrecisionInfo

PRECISIONS = ("int8-quanto", "int4-quanto")


@hookimpl
def register_precisions(register):
    hint = "pip install optimum-quanto"
    register(PrecisionInfo("int8-quanto", "int8 weights (optimum-quanto)", ("optimum.quanto",), hint))
    register(PrecisionInfo("int4-quanto", "int4 weights (optimum-quanto)", ("optimum.quanto",), hint))


@hookimpl
def quantize_model(precision):
    if precision in PRECISIONS:
        raise PluginError(f"base_model_precision {precision} is registered but not implemented yet; use no_change")
    return None
