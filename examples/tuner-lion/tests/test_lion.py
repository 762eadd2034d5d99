"""tuner-lion against tuner's optimizer contract, plus what a user sees once it is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from tuner_lion.lion import Lion

from tuner.testing.optimizer_contract import OptimizerContract


class TestLionContract(OptimizerContract):
    optimizer, plugin_module, class_name = "lion", "tuner_lion.plugin", "Lion"
    learning_rate = 3e-3


def test_one_step_follows_the_papers_update():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    momentum = torch.tensor([0.2, 0.1, -0.4])
    optimizer = Lion([param], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    optimizer.state[param]["exp_avg"] = momentum.clone()
    param.grad = torch.tensor([-1.0, 0.3, 0.2])
    optimizer.step()
    update = torch.sign(0.9 * momentum + 0.1 * param.grad)
    assert torch.allclose(param.detach(), torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.1 * 0.5) - 0.1 * update)
    assert torch.allclose(optimizer.state[param]["exp_avg"], 0.99 * momentum + 0.01 * param.grad)


def test_tuner_plugins_lists_the_installed_package():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    row = next(r for r in json.loads(out.stdout) if r["name"] == "lion")
    assert (row["distribution"], row["optimizers"], row["hooks"]) == ("tuner-lion", ["lion"], ["register_optimizers"])
