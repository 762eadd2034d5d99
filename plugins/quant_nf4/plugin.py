"""Registers ``nf4-bnb``. Import-cheap: bitsandbytes is imported when quantizing."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.api import PrecisionInfo


def nf4_bytes(out_features: int, in_features: int, float_bytes: int) -> float:
    blocks = -(-out_features * in_features // 64)  # NF4 codes in blocks of 64 weights
    # a uint8 absmax per block (double quantization), an fp32 absmax per 256 blocks, the code tables
    return out_features * in_features / 2 + blocks + 4 * -(-blocks // 256) + 1024 + 68


def quantize(model, unit, exclude):
    from tuner.plugins.quant_nf4 import quantizer

    return quantizer.quantize(model, unit, exclude)


def quant_state_tensors(weight) -> list:
    """The tensors bitsandbytes keeps beside an NF4 weight in its ``quant_state`` (absmax, code
    table, and the nested state of double quantization)."""
    state = getattr(weight, "quant_state", None)
    return _state_tensors(state) if state is not None else []


def _state_tensors(state) -> list:
    import torch  # only reached with a quantized weight, so torch is loaded already

    found = []
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif hasattr(value, "absmax"):  # nested state of double quantization
            found += _state_tensors(value)
    return found


@hookimpl
def register_precisions(register):
    register(
        PrecisionInfo(
            "nf4-bnb",
            "NF4 weights with double quantization (bitsandbytes)",
            ("bitsandbytes",),
            "install it with: pip install bitsandbytes  (or: pip install 'tuner[bnb]')",
            weight_bytes=nf4_bytes,
            quantize=quantize,
            stored_tensors=quant_state_tensors,
            step_time=1.29,  # benchmarks/gpu.py --tiers, H200, real Chroma at 1024 px (docs/benchmarks.md)
        )
    )
