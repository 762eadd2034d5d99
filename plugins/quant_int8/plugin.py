"""Registers ``int8-quanto`` and ``int4-quanto``. Import-cheap: quanto is imported when quantizing."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.types import PrecisionInfo

HINT = "install it with: pip install optimum-quanto  (or: pip install 'tuner[quanto]')"
PRECISIONS = {"int8-quanto": "qint8", "int4-quanto": "qint4"}


@hookimpl
def register_precisions(register):
    register(
        PrecisionInfo("int8-quanto", "int8 weights, per-channel scales (optimum-quanto)", ("optimum.quanto",), HINT)
    )
    register(
        PrecisionInfo("int4-quanto", "int4 weights, group-wise scales (optimum-quanto)", ("optimum.quanto",), HINT)
    )


@hookimpl
def quantize_model(model, unit, precision, exclude):
    if precision not in PRECISIONS:
        return None
    from tuner.plugins.quant_int8 import quantizer

    return quantizer.quantize(model, unit, PRECISIONS[precision], exclude)
