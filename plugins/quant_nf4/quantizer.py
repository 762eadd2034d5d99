"""bitsandbytes NF4: swap plain Linear layers for Linear4bit with double-quantized NF4 weights.

The layers are swapped by hand rather than through diffusers' BitsAndBytesConfig, which refuses
to run without a GPU although bitsandbytes quantizes and trains on the CPU too.
"""

from __future__ import annotations

import torch

from tuner.core.api import cast_input_as_autocast, plain_linears, release_freed_memory


def quantize(model: torch.nn.Module, unit: str, exclude: list[str]) -> torch.nn.Module:
    import bitsandbytes as bnb

    for name in plain_linears(model, unit, exclude):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=linear.weight.dtype,
            compress_statistics=True,  # double quantization of the scales
            quant_type="nf4",
            device="meta",  # no float copy: the weight below is quantized from the loaded one
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
        ).to(linear.weight.device)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        # bitsandbytes 0.50 repacks NF4 weights in place for a bf16 CPU kernel at the first
        # no-grad eval forward, and crashes for in_features < 64 (see tuner.core.fixes)
        layer.support_avx512bf16_for_cpu = False
        # bitsandbytes returns the dtype it is given: fp32 from the norms, the whole stream in fp32
        layer.register_forward_pre_hook(cast_input_as_autocast)
        setattr(parent, child, layer)
        del linear
        release_freed_memory(collect=False)  # one layer's float weights and temporaries at a time
    # peft puts its dedicated bnb LoRA layers on a model that says it is loaded in 4 bit
    model.is_loaded_in_4bit = True
    return model
