"""optimum-quanto: replace plain Linear layers with frozen QLinear (int8 or int4 weights)."""

from __future__ import annotations

import torch

from tuner.core.quantize import plain_linears


def quantize(model: torch.nn.Module, unit: str, weights: str, exclude: list[str]) -> torch.nn.Module:
    import optimum.quanto as quanto

    qtype = getattr(quanto, weights)
    for name in plain_linears(model, unit, exclude):
        # one layer at a time, so only one layer's temporaries exist at once; quanto.quantize is
        # called on the layer's parent (it fnmatches every module name below the module it is
        # given: on the whole model that is ~500k calls for Chroma); freeze quantizes the
        # weights now and drops the float copy
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quanto.quantize(parent, weights=qtype, include=[child])
        getattr(parent, child).freeze()
    return model
