"""Reliability II: one run per output folder, reruns into a used folder, resumes with nothing left
to train, recipes that work from anywhere, trackers that are not installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tuner.core import hookimpl
from tuner.core.errors import ConfigError
from tuner.core.host.events import StepEnd
from tuner.core.outputs.runinfo import OutputLock, read_run
from tuner.core.run.trainer import run as tuner_run

from .conftest import base_settings, make_config, make_host, train


def settings_for(tiny_chroma, shapes_dir, tmp_path, **extra):
    return {**base_settings(tiny_chroma, shapes_dir, tmp_path), "checkpointing_steps": 2, **extra}


def run_like_the_cli(settings, logged=None):
    host = make_host()
    config = make_config(host, settings, warnings=[])
    return tuner_run(host, config, warn=lambda message: None)


def test_a_second_run_on_one_output_dir_is_refused_naming_the_holder(tiny_chroma, shapes_dir, tmp_path):
    settings = settings_for(tiny_chroma, shapes_dir, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(  # another run's process holding the folder's lock
        [
            sys.executable,
            "-c",
            "import fcntl, json, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX);"
            "f.write(json.dumps({'pid': os.getpid(), 'host': 'gpu-7', 'started': 'noon'})); f.flush();"
            "print('held', flush=True); time.sleep(60)",
            str(out / ".tuner.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as refused:
            train(settings)
        message = str(refused.value)
        assert message == (
            f"test.yaml: output_dir: {out} is in use by another run (pid {holder.pid} on gpu-7, since noon); wait "
            "for it, stop it (Ctrl-C or SIGTERM saves a checkpoint) or choose another output_dir"
        )
        assert not (out / "train_log.jsonl").exists() and not (out / "run.json").exists()  # nothing touched
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing anything by hand
        holder.wait()
    result, _, _ = train(settings)  # the kernel released the dead holder's lock: no stale lock
    assert result.steps == 4
    config = make_config(make_host(), settings)
    with OutputLock(config), pytest.raises(ConfigError, match="is in use by another run"):
        OutputLock(config).__enter__()  # held by this process, refused to a second holder


def test_a_rerun_into_a_used_output_dir_says_what_is_there_and_refuses_by_default(tiny_chroma, shapes_dir, tmp_path):
    settings = settings_for(tiny_chroma, shapes_dir, tmp_path)
    first = run_like_the_cli(settings)
    out = tmp_path / "out"
    before = (out / "run.json").read_text()
    with pytest.raises(ConfigError) as refused:
        run_like_the_cli(settings)
    assert str(refused.value) == (
        f"test.yaml: output_dir: {out} already holds a finished run, at step 4, checkpoints up to checkpoint-4, "
        "pytorch_lora_weights.safetensors; continue it with --set resume_from_checkpoint=latest, or set "
        "existing_output: new (a numbered folder beside it) or overwrite (start over there)"
    )
    assert (out / "run.json").read_text() == before

    # a resume of a finished run has nothing to train: said before anything is loaded or rewritten
    with pytest.raises(
        ConfigError, match="at step 4 and max_train_steps is 4: nothing to train; raise max_train_steps"
    ):
        run_like_the_cli({**settings, "resume_from_checkpoint": "latest"})
    assert (out / "run.json").read_text() == before

    second = run_like_the_cli({**settings, "existing_output": "new"})
    assert second.output_dir == tmp_path / "out-2" and second.losses == first.losses
    third = run_like_the_cli({**settings, "existing_output": "new"})
    assert third.output_dir == tmp_path / "out-3"

    (out / "notes.txt").write_text("mine")  # not the run's: overwrite keeps it
    (out / "checkpoint-9").mkdir()  # a later checkpoint of the old run would confuse `latest`
    again = run_like_the_cli({**settings, "existing_output": "overwrite", "max_train_steps": 3})
    assert again.steps == 3 and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "notes.txt").read_text() == "mine"
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert read_run(out)["max_train_steps"] == 3


def test_recipes_name_local_paths_resolved_so_sampling_works_from_anywhere(
    tiny_chroma, shapes_dir, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from tuner.core.cli import app

    monkeypatch.chdir(tiny_chroma.parent)
    settings = {
        **base_settings(tiny_chroma, shapes_dir, tmp_path),
        "pretrained_model_name_or_path": tiny_chroma.name,  # relative to this folder
        "cache_dir": os.path.relpath(tmp_path / "cache"),
        "validation_prompts": ["a red circle"],
        "validation_num_inference_steps": 2,
    }
    train(settings)
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["base_model"] == str(tiny_chroma.resolve())
    assert recipe["settings"]["cache_dir"] == str((tmp_path / "cache").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(app, ["sample", "--recipe", str(tmp_path / "out" / "recipe.json"), "--out", "s"])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "s" / "00_seed0.png").is_file()


def test_report_to_a_tracker_nothing_provides_is_a_warning_naming_it(tiny_chroma, shapes_dir, tmp_path):
    warnings: list[str] = []
    make_config(
        make_host(),
        {**base_settings(tiny_chroma, shapes_dir, tmp_path), "report_to": ["tensorboard", "wandb"]},
        warnings,
    )
    assert warnings == [
        "test.yaml: report_to: no installed plugin is named 'wandb', so nothing is reported there; install a tracker "
        "plugin registered as 'wandb' (or use tensorboard or none)"
    ]
    quiet: list[str] = []
    make_config(make_host(), {**base_settings(tiny_chroma, shapes_dir, tmp_path), "report_to": "none"}, quiet)
    assert quiet == []


def test_a_killed_run_leaves_no_lock_and_resumes(tiny_chroma, shapes_dir, tmp_path):
    """kill -9 in the middle of a run: the folder is free at once and the run continues from its checkpoint."""
    settings = settings_for(tiny_chroma, shapes_dir, tmp_path, max_train_steps=400, checkpointing_steps=5)
    config_file = tmp_path / "run.json.yaml"
    config_file.write_text(json.dumps(settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tuner.core.cli", "run", "--plugin", "chroma", "--config", str(config_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoint-*")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    process.kill()
    process.wait()
    assert read_run(out)["status"] == "training"  # what kill -9 leaves; readers check the pid
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    result, _, _ = train({**settings, "resume_from_checkpoint": "latest", "max_train_steps": newest + 3})
    assert result.resumed_from.name == f"checkpoint-{newest}" and result.steps == newest + 3


FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_a_disk_filling_up_inside_safetensors_is_the_one_line_disk_full_error(
    tiny_chroma, shapes_dir, tmp_path, monkeypatch, capsys
):
    """safetensors raises SafetensorError (not OSError) for a full disk: a checkpoint, the final
    LoRA and a cache entry each end in one line, and nothing half-written is left behind."""
    import safetensors.torch
    from safetensors import SafetensorError

    from tuner.core.errors import TunerError
    from tuner.core.outputs import checkpoint

    real = safetensors.torch.save_file

    def fills_up_on(marker):
        def save_file(tensors, filename, metadata=None):
            if marker in str(filename):
                with open(filename, "wb") as handle:
                    handle.write(b"\0" * 10)  # what a full disk leaves: a partial file
                raise SafetensorError(FULL)
            return real(tensors, filename, metadata=metadata)

        return save_file

    settings = settings_for(tiny_chroma, shapes_dir, tmp_path, checkpointing_steps=2)
    monkeypatch.setattr(safetensors.torch, "save_file", fills_up_on("checkpoint-4.partial"))
    with pytest.raises(checkpoint.DiskFullError) as full:
        train(settings)
    assert str(full.value) == (
        f"disk full while writing checkpoint-4 in {tmp_path / 'out'}; checkpoint-2 is intact; free some space and "
        "resume with resume_from_checkpoint: latest"
    )
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith((".checkpoint", "checkpoint"))] == [
        "checkpoint-2"
    ]

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up_on("final/.pytorch_lora_weights"))
    with pytest.raises(
        TunerError, match=r"cannot write the LoRA to .*No space left on device.*checkpoint-4 .* is intact"
    ):
        train({**settings, "output_dir": str(tmp_path / "final")})
    assert (
        not list((tmp_path / "final").glob(".*.tmp"))
        and not (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()
    )

    from tuner.core import cli

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up_on(str(tmp_path / "fresh-cache")))
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps({**settings, "cache_dir": str(tmp_path / "fresh-cache"), "output_dir": str(tmp_path / "o3")})
    )
    monkeypatch.setattr(sys, "argv", ["tuner", "run", "--plugin", "chroma", "--config", str(config)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: disk full while writing {tmp_path / 'fresh-cache'}") and "are kept" in last


def test_damaged_files_are_one_line_errors_or_rebuilt(tiny_chroma, shapes_dir, tmp_path):
    import shutil

    from tuner.core.errors import PluginError

    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    train(settings)
    cache = tmp_path / "cache"
    for kind in ("latents", "text"):  # one entry of each cut short, as a crash mid-write leaves it
        entry = sorted((cache / kind).glob("*/*.safetensors"))[0]
        entry.write_bytes(entry.read_bytes()[:100])
    warnings: list[str] = []
    result, _, _ = train({**settings, "output_dir": str(tmp_path / "again")}, warnings=warnings)
    assert result.steps == 4
    rebuilt = sorted(w.split(" in ")[0] for w in warnings if w.startswith("rebuilt"))
    assert rebuilt == ["rebuilt 1 damaged latents cache entry", "rebuilt 1 damaged text cache entry"]

    model = tmp_path / "model"
    shutil.copytree(tiny_chroma, model)
    encoder = next((model / "text_encoder").glob("*.safetensors"))
    encoder.write_bytes(encoder.read_bytes()[:64])
    with pytest.raises(PluginError) as damaged:
        train(
            {
                **settings,
                "pretrained_model_name_or_path": str(model),
                "cache_dir": str(tmp_path / "c2"),
                "output_dir": str(tmp_path / "o2"),
            }
        )
    message = str(damaged.value)
    assert message.startswith(f"chroma: {encoder}: a damaged weight file (") and "\n" not in message


def test_the_owner_of_an_output_dir_removes_half_written_files(tiny_chroma, shapes_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".pytorch_lora_weights.safetensors.k2j3.tmp").write_bytes(b"half")  # kill -9 during the final save
    (out / "keep.tmp").write_text("not ours")
    train(base_settings(tiny_chroma, shapes_dir, tmp_path))
    assert not list(out.glob(".*.tmp")) and (out / "keep.tmp").exists()


def test_a_model_folder_of_another_family_or_none_at_all_is_named_before_loading(
    tiny_chroma, tiny_flux, shapes_dir, tmp_path, monkeypatch
):
    chroma_on_flux = {**base_settings(tiny_flux, shapes_dir, tmp_path), "memory_estimate": True}
    with pytest.raises(ConfigError) as wrong:
        train(chroma_on_flux)
    assert str(wrong.value) == (
        f"test.yaml: pretrained_model_name_or_path: {tiny_flux} holds a FluxPipeline (model_index.json), not "
        "chroma's ChromaPipeline; use --plugin flux or a chroma model"
    )
    with pytest.raises(ConfigError, match="holds a ChromaPipeline .* not flux's FluxPipeline; use --plugin chroma"):
        train(base_settings(tiny_chroma, shapes_dir, tmp_path, family="flux"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for missing in ("./nope", str(tmp_path / "nope"), "models/tiny-chrome", "a/b/c"):
        with pytest.raises(ConfigError) as absent:
            train({**base_settings(tiny_chroma, shapes_dir, tmp_path), "pretrained_model_name_or_path": missing})
        assert str(absent.value) == (
            f"test.yaml: pretrained_model_name_or_path: {missing}: no such folder (a hub id is namespace/name)"
        )
    assert not (tmp_path / "out" / "run.json").exists()  # refused before the run began


def test_what_kill_9_or_a_full_disk_leaves_in_a_run_folder_is_skipped_or_repaired(tiny_chroma, shapes_dir, tmp_path):
    from tests.test_resume import StopAt, run_trainer
    from tuner.core.errors import Interrupted

    settings = settings_for(tiny_chroma, shapes_dir, tmp_path, max_train_steps=8, checkpointing_steps=2)
    with pytest.raises(Interrupted):
        run_trainer(settings, ("stop", StopAt(5)))
    out = tmp_path / "out"
    (out / "checkpoint-5" / "manifest.json").write_text("[1, 2]")  # valid JSON, wrong type
    with (out / "train_log.jsonl").open("a") as log:
        log.write('{"step": 6, "lo')  # torn mid-line
    warnings: list[str] = []
    result, _, _ = train({**settings, "resume_from_checkpoint": "latest"}, warnings=warnings)
    assert result.resumed_from.name == "checkpoint-4"
    assert any("skipping" in w and "checkpoint-5: damaged manifest" in w for w in warnings)
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_a_recipe_with_keys_missing_names_them(tmp_path):
    from typer.testing import CliRunner

    from tuner.core.cli import app

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"family": "chroma", "lora_file": "x.safetensors", "prompts": ["a"], "settings": {}}))
    result = CliRunner().invoke(app, ["sample", "--recipe", str(recipe)])
    assert str(result.exception) == (
        f"--recipe {recipe}: missing seeds, steps, negative_prompt, guidance_key, sizes (written by another tool, or edited?)"
    )
    recipe.write_text("[]")
    assert str(CliRunner().invoke(app, ["sample", "--recipe", str(recipe)]).exception) == (
        f"--recipe {recipe}: not a JSON object"
    )


def test_16_bit_float_and_transparent_images_keep_their_pixels(tmp_path):
    import numpy as np
    from PIL import Image

    from tuner.core.data.buckets import Bucket
    from tuner.core.data.images import load_image

    bucket = Bucket(16, 16)
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(grey16)  # mid-grey at 16 bits
    float_tiff = tmp_path / "float.tif"
    Image.fromarray(np.full((16, 16), 0.25, dtype=np.float32), mode="F").save(float_tiff)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(clear)  # fully transparent black
    half = tmp_path / "half.png"
    Image.new("RGBA", (16, 16), (0, 0, 0, 128)).save(half)
    assert Image.open(grey16).mode.startswith("I") and Image.open(float_tiff).mode == "F"

    assert load_image(grey16, bucket).mean().item() == pytest.approx(0.0, abs=0.01)  # was 1.0: clipped to white
    assert load_image(float_tiff, bucket).mean().item() == pytest.approx(-0.5, abs=0.01)
    said = []
    assert load_image(clear, bucket, on_transparency=lambda: said.append(1)).mean().item() == pytest.approx(1.0)
    assert load_image(clear, bucket, background="black").mean().item() == pytest.approx(-1.0)
    assert load_image(half, bucket).mean().item() == pytest.approx(0.0, abs=0.01)  # half black over white
    assert said == [1]


def test_transparency_is_said_once_and_a_decompression_bomb_is_skipped_and_counted(
    tiny_chroma, shapes_dir, tmp_path, monkeypatch
):
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    for name in ("logo_a", "logo_b"):
        Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(data / f"{name}.png")
    Image.new("RGB", (400, 400), "blue").save(data / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 400 // 3)  # huge.png is beyond twice the limit
    warnings: list[str] = []
    result, _, _ = train(base_settings(tiny_chroma, data, tmp_path), warnings=warnings)
    assert result.steps == 4
    assert "skipped 1 unreadable image(s): huge.png (DecompressionBombError)" in warnings
    assert "2 image(s) with transparency composited on white (image_background): logo_a.png, logo_b.png" in warnings
    with pytest.raises(ConfigError, match="image_background: 'plaid' is not a colour; use a name"):
        make_config(make_host(), {**base_settings(tiny_chroma, data, tmp_path), "image_background": "plaid"})


class CtrlC:
    """Plays a Ctrl-C (KeyboardInterrupt) where a hook runs: while caching, or a second one mid-training."""

    def __init__(self, at_step=None):
        self.at_step = at_step

    @hookimpl(wrapper=True)
    def encode_images(self):
        if self.at_step is None:
            raise KeyboardInterrupt
        return (yield)

    @hookimpl
    def training_event(self, event):
        if isinstance(event, StepEnd) and event.step == self.at_step:
            raise KeyboardInterrupt


def test_ctrl_c_outside_the_graceful_stop_says_what_was_interrupted_and_what_is_safe(tiny_chroma, shapes_dir, tmp_path):
    from tuner.core.errors import Interrupted

    settings = settings_for(tiny_chroma, shapes_dir, tmp_path, max_train_steps=8)
    with pytest.raises(Interrupted) as caching:
        train(settings, ("ctrl-c", CtrlC()))
    assert str(caching.value) == (
        "interrupted while caching latents and captions; nothing was trained yet (finished cache entries are kept)"
    )
    with pytest.raises(Interrupted) as second:
        train({**settings, "output_dir": str(tmp_path / "o2")}, ("ctrl-c", CtrlC(at_step=5)))
    assert str(second.value) == (
        "aborted at step 5 without saving; the last good checkpoint is checkpoint-4; continue with "
        "--set resume_from_checkpoint=latest"
    )
    assert read_run(tmp_path / "o2") | {"status": "interrupted", "error": str(second.value)} == read_run(
        tmp_path / "o2"
    )


def test_progress_redirected_to_a_file_is_not_redrawn_every_step(tiny_chroma, shapes_dir, tmp_path, capsys):
    capsys.readouterr()
    train({**base_settings(tiny_chroma, shapes_dir, tmp_path), "max_train_steps": 30})
    redraws = capsys.readouterr().err.count("steps:")
    assert redraws <= 4, redraws  # the start, the 5 s interval at most once here, the end (was one per step)


def test_cpu_threads_follow_the_idle_cores_unless_the_user_chose(monkeypatch):
    import torch

    from tuner.core.training import runtime

    assert runtime.threads_for(2, 2.0) == 2
    assert runtime.threads_for(2, 1.1) == 1  # one core busy with another process: one thread
    assert runtime.threads_for(8, 0.2) == 1 and runtime.threads_for(4, None) == 4
    assert 0 <= runtime.idle_cores(0.05) <= (os.cpu_count() or 1) + 0.01
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(runtime, "idle_cores", lambda interval=0.1: 0.9)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        assert (
            runtime.choose_cpu_threads()[1]
            == "CPU threads: 1 (4 usable cores, 0.9 idle now; OMP_NUM_THREADS to choose)"
        )
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(runtime, "idle_cores", lambda interval=0.1: 4.0)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine share its cores
        assert runtime.choose_cpu_threads()[1].startswith("CPU threads: 2 (2 usable cores")
        assert runtime.choose_cpu_threads(resumed=3) == (
            3,
            "CPU threads: 3 (as the run it resumes, for an exact resume)",
        )
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert runtime.choose_cpu_threads()[1] == f"CPU threads: {torch.get_num_threads()} (OMP_NUM_THREADS)"
    finally:
        torch.set_num_threads(before)


def test_a_resumed_cpu_run_keeps_the_thread_count_of_the_run_it_continues(
    tiny_chroma, shapes_dir, tmp_path, monkeypatch
):
    import torch
    from tqdm.auto import tqdm

    from tuner.core.training import runtime

    before = torch.get_num_threads()
    logged: list[str] = []
    monkeypatch.setattr(tqdm, "write", lambda message, *a, **kw: logged.append(message))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    settings = settings_for(tiny_chroma, shapes_dir, tmp_path, max_train_steps=2)
    try:
        monkeypatch.setattr(runtime, "idle_cores", lambda interval=0.1: 1.0)
        train(settings)
        assert read_run(tmp_path / "out")["cpu_threads"] == 1
        monkeypatch.setattr(runtime, "idle_cores", lambda interval=0.1: 64.0)  # the machine is quiet now
        train({**settings, "resume_from_checkpoint": "latest", "max_train_steps": 4})
    finally:
        torch.set_num_threads(before)
    assert "CPU threads: 1 (as the run it resumes, for an exact resume)" in logged
