"""Runs that survive: exact resume, damaged checkpoints, retention, Ctrl-C, a full disk, divergence."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuner.core import hookimpl
from tuner.core.errors import ConfigError, Diverged, Interrupted, TunerError
from tuner.core.host.events import StepEnd
from tuner.core.outputs import checkpoint
from tuner.core.run.trainer import Trainer

from .conftest import REPO, base_settings, make_config, make_host, train


def settings_for(tiny_chroma, shapes_dir, tmp_path, **extra):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(
        max_train_steps=10,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        lora_dropout=0.1,
        lr_scheduler="cosine",
        lr_warmup_steps=3,
        learning_rate=5e-3,
        checkpointing_steps=3,
    )
    settings.update(extra)
    return settings


class StopAt:
    """Plays the user's Ctrl-C at a given step, through the training_event hook."""

    def __init__(self, step):
        self.step, self.trainer = step, None

    @hookimpl
    def training_event(self, event):
        if isinstance(event, StepEnd) and event.step == self.step:
            self.trainer.request_stop()


def run_trainer(settings, *plugins, warnings=None):
    host = make_host(*plugins)
    trainer = Trainer(host, make_config(host, settings), warn=(warnings.append if warnings is not None else print))
    for _, plugin in plugins:
        if isinstance(plugin, StopAt):
            plugin.trainer = trainer
    return trainer, trainer.train()


def assert_resume_is_exact(straight, stop_at, files=("pytorch_lora_weights.safetensors",), **changes):
    """Train ``straight`` through; train it again into a sibling folder (with ``changes``), stopped
    by a Ctrl-C after step ``stop_at`` and resumed; ``files`` of both output folders are equal,
    bit for bit."""
    run_trainer(straight)
    first = Path(straight["output_dir"])
    again = {**straight, "output_dir": str(first.parent.parent / "resumed" / "out"), **changes}
    with pytest.raises(Interrupted):
        run_trainer(again, ("stop", StopAt(stop_at)))
    run_trainer({**again, "resume_from_checkpoint": "latest"})
    for name in files:
        ours, resumed = load_file(first / name), load_file(Path(again["output_dir"]) / name)
        assert ours.keys() == resumed.keys() and ours, name
        assert all(torch.equal(ours[k], resumed[k]) for k in ours), f"{name} differs after a resume"


def log_rows(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_chroma, shapes_dir, tmp_path):
    straight, _, _ = train(settings_for(tiny_chroma, shapes_dir, tmp_path / "a"))

    settings = settings_for(tiny_chroma, shapes_dir, tmp_path / "b")
    with pytest.raises(Interrupted, match=r"interrupted at step 6; saved .*checkpoint-6"):
        run_trainer(settings, ("stop", StopAt(6)))
    assert [r["step"] for r in log_rows(tmp_path / "b" / "out")] == [1, 2, 3, 4, 5, 6]
    _, resumed = run_trainer({**settings, "resume_from_checkpoint": "latest"})
    assert resumed.resumed_from.name == "checkpoint-6"
    assert resumed.losses == straight.losses[6:]  # bit-identical, steps 7-10
    rows = log_rows(tmp_path / "b" / "out")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["loss"] for r in rows] == straight.losses
    a = load_file(tmp_path / "a" / "out" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "out" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_checkpoints_are_skipped_and_leftovers_cleaned(tiny_chroma, shapes_dir, tmp_path):
    settings = settings_for(tiny_chroma, shapes_dir, tmp_path, max_train_steps=6)
    train(settings)
    out = tmp_path / "out"
    assert [step for step, _ in checkpoint.checkpoints(out)] == [3, 6]
    assert all(checkpoint.verify(path) is None for _, path in checkpoint.checkpoints(out))
    optimizer_file = out / "checkpoint-6" / "optimizer.safetensors"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])  # cut off mid-write
    (out / ".checkpoint-9.partial-4242").mkdir()  # a save killed before its rename
    warnings: list[str] = []
    _, result = run_trainer({**settings, "resume_from_checkpoint": "latest", "max_train_steps": 7}, warnings=warnings)
    assert result.resumed_from.name == "checkpoint-3"
    assert any("skipping" in w and "checkpoint-6" in w and "does not match its manifest" in w for w in warnings)
    assert not (out / ".checkpoint-9.partial-4242").exists()
    assert checkpoint.verify(out / "checkpoint-6") is None  # the resumed run saved step 6 anew
    (out / "checkpoint-7" / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(TunerError, match="checkpoint .*checkpoint-7 is damaged: adapter.safetensors does not match"):
        run_trainer({**settings, "resume_from_checkpoint": str(out / "checkpoint-7")})


def test_only_the_newest_checkpoints_are_kept(tiny_chroma, shapes_dir, tmp_path):
    train(
        settings_for(
            tiny_chroma, shapes_dir, tmp_path, max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2
        )
    )
    assert [step for step, _ in checkpoint.checkpoints(tmp_path / "out")] == [4, 5]


def test_resume_with_a_different_adapter_is_refused(tiny_chroma, shapes_dir, tmp_path):
    settings = settings_for(tiny_chroma, shapes_dir, tmp_path, max_train_steps=3)
    train(settings)
    changed = {**settings, "resume_from_checkpoint": "latest", "network_rank": 8, "flux_lora_target": "context"}
    with pytest.raises(ConfigError) as info:
        train(changed)
    message = str(info.value)
    assert (
        "checkpoint-3 was trained with different network_rank (4 -> 8), flux_lora_target ('all' -> 'context')"
        in message
    )
    assert "LoRA targets" in message and "\n" not in message


def test_resume_with_another_global_batch_says_the_samples_differ(tiny_chroma, shapes_dir, tmp_path):
    """The data order continues from micro-steps x samples per micro-step: another global batch is
    allowed (a deliberate change) and said in one line (the same one says nothing: test_fsdp.py)."""
    settings = settings_for(tiny_chroma, shapes_dir, tmp_path, max_train_steps=3, gradient_accumulation_steps=1)
    train(settings)
    warned: list[str] = []
    train(
        {**settings, "resume_from_checkpoint": "latest", "max_train_steps": 4, "train_batch_size": 1}, warnings=warned
    )
    said = [w for w in warned if "samples per micro-step" in w]
    assert said == [
        "resume_from_checkpoint: checkpoint-3 drew 2 samples per micro-step (1 process); this run draws 1 "
        "(1 x train_batch_size 1): the samples from here on differ from an uninterrupted run; set train_batch_size "
        "so the two match"
    ]


def test_a_full_disk_is_a_clear_error_and_keeps_the_last_good_checkpoint(
    tiny_chroma, shapes_dir, tmp_path, monkeypatch
):
    real = checkpoint.save_safetensors
    calls = {"n": 0}

    def filling_up(path, tensors, metadata=None):
        if "checkpoint-6" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:  # fails part-way through the second checkpoint
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "save_safetensors", filling_up)
    with pytest.raises(
        checkpoint.DiskFullError, match="disk full while writing checkpoint-6 .*; checkpoint-3 is intact"
    ):
        train(settings_for(tiny_chroma, shapes_dir, tmp_path, max_train_steps=8))
    out = tmp_path / "out"
    assert [step for step, _ in checkpoint.checkpoints(out)] == [3]
    assert checkpoint.verify(out / "checkpoint-3") is None
    assert not list(out.glob(".checkpoint-*"))


class PoisonSteps:
    """Injects NaN into the prediction of chosen micro-steps, through a wrapper on predict_flow."""

    def __init__(self, poisoned):
        self.poisoned, self.calls = poisoned, 0

    @hookimpl(wrapper=True)
    def predict_flow(self):
        prediction = yield
        self.calls += 1
        return prediction * float("nan") if self.calls in self.poisoned else prediction


def test_nan_steps_are_skipped_then_rolled_back_with_a_lower_learning_rate(tiny_chroma, shapes_dir, tmp_path):
    settings = settings_for(
        tiny_chroma,
        shapes_dir,
        tmp_path,
        gradient_accumulation_steps=1,
        max_train_steps=8,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        divergence_skip_limit=2,
    )
    single_bad = PoisonSteps({5})  # one bad step: skipped, no rollback
    _, result = run_trainer(settings, ("poison", single_bad))
    assert result.steps == 8 and result.rollbacks == 0
    skips = [r for r in log_rows(tmp_path / "out") if r.get("event") == "skip"]
    assert len(skips) == 1 and skips[0]["step"] == 4

    settings["output_dir"] = str(tmp_path / "out2")
    _, result = run_trainer(settings, ("poison", PoisonSteps({8, 9})))  # two in a row after checkpoint-6
    assert result.steps == 8 and result.rollbacks == 1
    rows = log_rows(tmp_path / "out2")
    rollback = next(r for r in rows if r.get("event") == "rollback")
    assert rollback["to"] == "checkpoint-6" and rollback["lr_scale"] == 0.5
    after = [r for r in rows[rows.index(rollback) + 1 :] if "lr" in r]  # the log keeps the undone step 7 too
    assert [r["step"] for r in after] == [7, 8]
    assert all(r["lr"] == pytest.approx(settings["learning_rate"] * 0.5) for r in after)


def test_persistent_nan_stops_with_a_clear_message(tiny_chroma, shapes_dir, tmp_path):
    settings = settings_for(
        tiny_chroma,
        shapes_dir,
        tmp_path,
        gradient_accumulation_steps=1,
        max_train_steps=8,
        divergence_skip_limit=2,
        divergence_max_rollbacks=1,
    )
    with pytest.raises(Diverged, match=r"training diverged: 2 non-finite steps in a row .* after 1 rollback"):
        run_trainer(settings, ("poison", PoisonSteps(set(range(1, 100)))))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_chroma, shapes_dir, tmp_path, stop):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "tuner.core.cli",
        "run",
        "--plugin",
        "chroma",
        "--config",
        "examples/chroma-tiny.yaml",
        "--set",
        f"pretrained_model_name_or_path={tiny_chroma}",
        "--set",
        f"data_dir={shapes_dir}",
        "--set",
        f"output_dir={out}",
        "--set",
        f"cache_dir={tmp_path / 'cache'}",
        "--set",
        "max_train_steps=100000",
        "--set",
        "resolution=64",
        "--set",
        "validation_steps=0",
        "--set",
        "checkpointing_steps=0",
        "--set",
        "validation_prompts=[]",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted at step" in stderr and "resume_from_checkpoint=latest" in stderr
    saved = checkpoint.latest_valid(out, print)
    assert saved is not None and checkpoint.verify(saved) is None
    steps = json.loads((saved / "state.json").read_text())["position"]["step"]
    assert steps >= 5 and saved.name == f"checkpoint-{steps}"


@pytest.mark.parametrize("precision", ["int8-quanto", "nf4-bnb"])
def test_resume_with_a_quantized_base_continues_exactly(tiny_chroma, shapes_dir, tmp_path, precision):
    """The base is quantized again on resume; adapter, optimizer and position come from the checkpoint."""
    extra = {"base_model_precision": precision, "max_train_steps": 5, "checkpointing_steps": 2}
    straight, _, _ = train(settings_for(tiny_chroma, shapes_dir, tmp_path / "a", **extra))
    settings = settings_for(tiny_chroma, shapes_dir, tmp_path / "b", **extra)
    with pytest.raises(Interrupted):
        run_trainer(settings, ("stop", StopAt(3)))
    _, resumed = run_trainer({**settings, "resume_from_checkpoint": "latest"})
    assert resumed.resumed_from.name == "checkpoint-3"
    assert resumed.losses == straight.losses[3:]


class FailAt:
    @hookimpl
    def training_event(self, event):
        if isinstance(event, StepEnd) and event.step == 2:
            raise RuntimeError("boom\nsecond line")


def test_a_run_describes_itself_and_resumes_from_its_own_config_anywhere(
    tiny_chroma, shapes_dir, tmp_path, monkeypatch
):
    from tuner.core.config.build import build_config
    from tuner.core.config.values import read_config_file
    from tuner.core.io import process_alive
    from tuner.core.outputs.runinfo import read_run

    monkeypatch.chdir(tiny_chroma.parent)  # the model given relative, with a trailing slash
    settings = settings_for(tiny_chroma, shapes_dir, tmp_path, pretrained_model_name_or_path=f"./{tiny_chroma.name}/")
    with pytest.raises(Interrupted):
        run_trainer(settings, ("stop", StopAt(6)))
    out = tmp_path / "out"
    record = first = read_run(out)
    assert record["status"] == "stopped" and "checkpoint-6" in record["error"]
    assert record["pid"] == os.getpid() and process_alive(record["pid"], record["host"], record["pid_started"])
    assert not process_alive(os.getpid(), None, record["pid_started"] + 1)  # a later process given that pid
    assert (record["family"], record["flavour"], record["precision"], record["max_train_steps"]) == (
        "chroma",
        "base",
        "no_change",
        10,
    )
    assert record["model"] == str(tiny_chroma.resolve())

    first["started"] = first["launched"] = "2026-01-01T00:00:00+0000"
    first["updated"] = "2026-01-01T00:01:40+0000"
    (out / "run.json").write_text(json.dumps(first))  # as if the first launch ran 100 s long ago
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # config.yaml holds absolute paths: it resumes from any folder
    raw = {**read_config_file(out / "config.yaml"), "resume_from_checkpoint": "latest", "max_train_steps": 12}
    host = make_host()
    result = Trainer(host, build_config(host, raw, str(out / "config.yaml"))).train()
    assert result.resumed_from.name == "checkpoint-6" and result.steps == 12
    record = read_run(out)
    assert (record["status"], record["resumed_step"], record["step"], record["error"]) == ("finished", 6, 12, None)
    assert record["started"] == "2026-01-01T00:00:00+0000" and record["earlier_s"] == 100.0  # one run, resumed
    assert record["lora_files"] == [str(out / "pytorch_lora_weights.safetensors")]

    monkeypatch.chdir(tiny_chroma.parent)
    with pytest.raises(RuntimeError):
        run_trainer({**settings, "output_dir": str(tmp_path / "failed")}, ("fail", FailAt()))
    record = read_run(tmp_path / "failed")
    assert (record["status"], record["error"]) == ("failed", "RuntimeError: boom")
    assert not process_alive(2**22 + 12345) and not process_alive(None)


def test_each_checkpoint_save_is_announced_in_one_line(tiny_chroma, shapes_dir, tmp_path, capsys):
    train({**base_settings(tiny_chroma, shapes_dir, tmp_path), "checkpointing_steps": 2, "max_train_steps": 4})
    out = capsys.readouterr().out
    assert f"step 2: checkpoint saved to {tmp_path / 'out' / 'checkpoint-2'}" in out
    assert f"step 4: checkpoint saved to {tmp_path / 'out' / 'checkpoint-4'}" in out


def test_extending_a_finished_cosine_run_says_what_the_learning_rate_does(tiny_chroma, shapes_dir, tmp_path):
    """The checkpoint keeps where the schedule was, not its total: resumed with a larger
    max_train_steps, a finished cosine run's rate goes from ~0 back up; the resume says so. The same
    total says nothing."""
    from tuner.core.outputs.resume import schedule_change
    from tuner.core.training.runtime import build_lr_scheduler

    host = make_host()

    def scheduler(total):
        config = make_config(host, settings_for(tiny_chroma, shapes_dir, tmp_path, max_train_steps=total))
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
        return config, build_lr_scheduler(config, optimizer)

    _, finished = scheduler(10)
    for _ in range(10):
        finished.optimizer.step()
        finished.step()
    saved = finished.state_dict()
    config, same = scheduler(10)
    same.load_state_dict(saved)
    assert schedule_change(same, 10, config) is None
    config, longer = scheduler(20)
    longer.load_state_dict(saved)
    said = schedule_change(longer, 10, config)
    # warmup 3: 5e-3 * (1 + cos(pi * 7 / 17)) / 2 = 0.00318
    assert said == (
        "max_train_steps 20: the cosine schedule is recomputed over the new total, so the learning rate goes from "
        "0 (where the checkpoint left it) to 0.00318 at step 10, then follows cosine to step 20"
    )
