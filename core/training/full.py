"""Full fine-tuning (``model_type: full``): every weight of the denoiser trains, except the modules
the family keeps frozen (``FamilyInfo.frozen_in_full``, e.g. Chroma's distilled guidance layer) or
``full_frozen_modules`` names; and bf16 weights updated with stochastic rounding.

Stochastic rounding (``bf16_stochastic_rounding``): round-to-nearest drops every update smaller than
half a bf16 unit in the last place, so small learning rates stop training a bf16 model; rounding
up with probability equal to the remainder keeps the update in expectation. The optimizer steps on
an fp32 copy of each parameter in turn (its grad in fp32 too: the optimizer's state and arithmetic
are fp32, as on fp32 master weights), and the result is rounded back stochastically, seeded from
(seed, the number of steps taken), so a resumed run rounds exactly as an uninterrupted one. An
optimizer that writes its parameters itself (bitsandbytes' 8-bit, transformers' Adafactor) writes
the fp32 copy, so it goes through the same rounding. Cost: one optimizer call per parameter (the
multi-tensor kernels are not used); memory: one parameter's fp32 copy at a time."""

from __future__ import annotations

import types
from typing import Any

import torch

from tuner.core.data.sampler import step_seed
from tuner.core.training.sharding import is_dtensor

ROUNDING_STEP = "stochastic_rounding_step"  # kept in the first param group: saved and restored with it
ROUNDING = 0x5702


def frozen_modules(config: Any, family: Any) -> list[str]:
    """Module prefixes that stay frozen: ``full_frozen_modules`` when set, else the family's."""
    chosen = config.get("full_frozen_modules")
    return list(chosen) if chosen is not None else list(family.frozen_in_full)


def make_trainable(transformer: torch.nn.Module, frozen: list[str]) -> list[str]:
    """Every parameter trains except those under ``frozen``; returns the trained modules' names
    (the direct owners of trained parameters), sorted."""
    trained = set()
    for name, param in transformer.named_parameters():
        owner = name.rpartition(".")[0]
        keep = any(owner == f or owner.startswith(f + ".") for f in frozen)
        param.requires_grad_(not keep)
        if not keep:
            trained.add(owner)
    return sorted(trained)


def stochastic_round(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction: random bits added
    below bf16's last place of the fp32 pattern, then truncated (exact in bf16). Unbiased.

    A sharded tensor (FSDP2's DTensor) is rounded where it lies, with its slice of the noise the
    whole tensor would get: the same bits as one process rounding the whole tensor."""
    noise = torch.randint(0, 1 << 16, tuple(value.shape), generator=generator, dtype=torch.int32)
    if not is_dtensor(value):
        return _rounded(value, noise.to(value.device))
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh, placements = value.device_mesh, value.placements
    mine = distribute_tensor(noise, mesh, placements, src_data_rank=None).to_local()  # cut locally, no traffic
    local = _rounded(value.to_local(), mine)
    return DTensor.from_local(local, mesh, placements, shape=value.shape, stride=value.stride())


def _rounded(value: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    bits = value.float().contiguous().view(torch.int32)
    rounded = (bits + noise) & -65536  # clear the low 16 bits: what bf16 keeps of an fp32 pattern
    finite = torch.isfinite(value)  # inf and nan keep their pattern (the guard sees them)
    return torch.where(finite, rounded.view(torch.float32), value.float()).to(torch.bfloat16)


def enable_stochastic_rounding(optimizer: torch.optim.Optimizer, seed: int) -> None:
    """Step ``optimizer``'s bf16 parameters one at a time on an fp32 copy (its grad in fp32 too) and
    round each result back stochastically: one parameter's fp32 copy exists at a time. Its other
    parameters step together, as usual. Optimizers that combine parameters in one step (Prodigy's
    shared step size) are refused by the config check."""
    bf16 = [p for group in optimizer.param_groups for p in group["params"] if p.dtype == torch.bfloat16]
    optimizer.param_groups[0].setdefault(ROUNDING_STEP, 0)
    step_all = optimizer.step  # the class's step, with the optimizer's hooks

    def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        grads = {p: p.grad for p in bf16}
        others = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None and p not in grads
        ]
        for param in bf16:
            param.grad = None
        loss = step_all(closure) if others else None  # the fp32 parameters (if any) as usual
        group = optimizer.param_groups[0]
        generator = torch.Generator().manual_seed(step_seed(seed, group[ROUNDING_STEP], ROUNDING))
        kept = {p: p.grad for p in others}
        for param in others:
            param.grad = None
        for param in bf16:
            if grads[param] is None:
                continue
            if is_dtensor(param):  # a shard (FSDP2): its metadata would not follow a .data swap
                _step_twin(optimizer, param, grads[param], step_all, generator)
                continue
            param.data, param.grad = param.data.float(), grads[param].float()
            step_all()
            param.data, param.grad = stochastic_round(param.data, generator), None
        for param, grad in kept.items():
            param.grad = grad
        group[ROUNDING_STEP] += 1
        return loss

    # load_state_dict casts the state to its parameter's dtype: fp32 state would lose bits to bf16
    # params, so they are fp32 (the same values) while it loads; a shard's fp32 state is put back
    # after the load instead
    stashed: dict[int, dict[str, torch.Tensor]] = {}

    def loading(opt: torch.optim.Optimizer, state_dict: Any) -> None:
        stashed.clear()
        for param in bf16:
            if not is_dtensor(param):
                param.data = param.data.float()
        for index, entries in state_dict["state"].items():
            stashed[int(index)] = {k: v for k, v in entries.items() if torch.is_tensor(v) and v.is_floating_point()}

    def loaded(opt: torch.optim.Optimizer) -> None:
        for param in bf16:
            if not is_dtensor(param):
                param.data = param.data.to(torch.bfloat16)  # exact: the values were bf16
        in_order = [p for group in opt.param_groups for p in group["params"]]
        for index, entries in stashed.items():
            if is_dtensor(in_order[index]) and in_order[index].dtype == torch.bfloat16:
                opt.state[in_order[index]].update({k: v for k, v in entries.items() if k != "step"})
        stashed.clear()

    optimizer.step = types.MethodType(step, optimizer)  # bound, as accelerate's wrapper expects
    optimizer.register_load_state_dict_pre_hook(loading)
    optimizer.register_load_state_dict_post_hook(loaded)


def _step_twin(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, grad: torch.Tensor, step: Any, generator: torch.Generator
) -> None:
    """Step a bf16 shard on an fp32 twin that holds its optimizer state for the step, then round
    the result into the shard's own storage."""
    twin = torch.nn.Parameter(param.detach().float())
    twin.grad = grad.float()
    places = [(g, i) for g in optimizer.param_groups for i, p in enumerate(g["params"]) if p is param]
    if param in optimizer.state:
        optimizer.state[twin] = optimizer.state.pop(param)
    for group, index in places:
        group["params"][index] = twin
    try:
        step()
    finally:
        for group, index in places:
            group["params"][index] = param
        if twin in optimizer.state:
            optimizer.state[param] = optimizer.state.pop(twin)
    with torch.no_grad():
        param.to_local().copy_(stochastic_round(twin.detach(), generator).to_local())
