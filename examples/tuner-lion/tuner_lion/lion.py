"""Lion: ``p -= lr * (sign(beta1 * m + (1 - beta1) * g) + weight_decay * p)``, then
``m = beta2 * m + (1 - beta2) * g`` (Chen et al., 2023, Algorithm 2)."""

from __future__ import annotations

import torch


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr < 0 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"Lion needs lr >= 0 and betas in [0, 1), got lr={lr}, betas={betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                momentum = self.state[param].setdefault("exp_avg", torch.zeros_like(param))
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(torch.sign(momentum * beta1 + param.grad * (1 - beta1)), alpha=-group["lr"])
                momentum.mul_(beta2).add_(param.grad, alpha=1 - beta2)
        return loss
