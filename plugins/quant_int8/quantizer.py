"""optimum-quanto: replace plain Linear layers with frozen QLinear (int8 or int4 weights)."""

from __future__ import annotations

import torch

from tuner.core.quantize import plain_linears, release_freed_memory


def quantize(model: torch.nn.Module, unit: str, weights: str, exclude: list[str]) -> torch.nn.Module:
    import optimum.quanto as quanto

    qtype = getattr(quanto, weights)
    for name in plain_linears(model, unit, exclude):
        # one layer at a time (its full name as the include pattern), so only one layer's
        # temporaries exist at once; freeze quantizes the weights now and drops the float copy
        quanto.quantize(model, weights=qtype, include=[name])
        model.get_submodule(name).freeze()
        release_freed_memory(collect=False)
    return model
