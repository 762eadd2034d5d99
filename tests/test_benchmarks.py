"""benchmarks/gpu.py --small: the GPU benchmark's code runs in CI, on the CPU with a narrow model."""

from __future__ import annotations

import importlib.util

from .conftest import REPO


def test_the_gpu_benchmark_runs_small_on_the_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    rows = gpu.main(["--small", "--steps", "1", "--folder", str(tmp_path)])
    assert [r["precision"] for r in rows] == ["no_change", "int8-quanto", "nf4-bnb"]
    for row in rows:
        assert row["step_s"] > 0 and row["load_s"] >= 0 and row["train_flop_per_step"] > 0
        assert row["estimate_bytes"]["train"] > 0 and row["mfu"] is None  # no GPU peak on a CPU
    assert rows[0]["tuner_over_bare"] > 0
    assert "| no_change |" in capsys.readouterr().out


def test_the_training_methods_benchmark_runs_small(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("methods_benchmark", REPO / "benchmarks" / "methods.py")
    methods = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(methods)
    rows = {
        r["method"]: r for r in methods.main(["--small", "--steps", "1", "--warmup", "1", "--folder", str(tmp_path)])
    }
    assert len(rows) == 12 and all(r["step_s"] > 0 for r in rows.values())
    assert (
        rows["lokr (factor -1)"]["adapter_bytes"]
        < rows["adamw (plain LoRA)"]["adapter_bytes"]
        < rows["loha"]["adapter_bytes"]
    )
    plain = rows["adamw (plain LoRA)"]
    assert plain["optimizer_bytes"] >= 2 * plain["adapter_bytes"]  # AdamW: two fp32 moments per weight
    assert rows["prodigy"]["optimizer_bytes"] > plain["optimizer_bytes"]
    assert rows["adafactor"]["optimizer_bytes"] < plain["optimizer_bytes"]
    assert rows["adamw + EMA (cpu)"]["ema_bytes"] == plain["adapter_bytes"] and plain["ema_bytes"] == 0
    assert "| rollout k=4 |" in capsys.readouterr().out
