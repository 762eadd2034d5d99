"""Hostile and careless inputs, one row per class of cause (Reliability III): each ends in one line
naming the file, key or value, or is skipped with a count and a name; never a traceback, a hang or
a lost file.

Classes here: files that are not what they seem (pipes, broken links, folders named like captions,
UTF-16 without a BOM, NaN in a cache entry or an encoding); options that destroy or block (a run
that fails before its first step, overwrite beside a live run, paths recorded as values); every
value at once and before anything heavy (five mistakes, absurd sizes, contradictions and ignored
keys, a missing data folder before the hub); a LoRA of another model in `tuner sample`. Elsewhere:
the web UI under hostile input (test_webui.py), configure and sample (test_configure.py,
test_sample.py), another family's config (test_config.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from tuner.core.data.images import image_files, scan_dataset


def dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (16, 16), "red").save(folder / f"{name}.png")
    return folder


def scanned(folder: Path) -> tuple[dict[str, str], list[str]]:
    warnings: list[str] = []
    items = scan_dataset(folder, warnings.append)
    return {item.image.name: item.caption for item in items}, warnings


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_named_like_an_image_is_skipped_never_opened(tmp_path):
    """Opening a pipe for reading waits for a writer forever: it is never listed, so never opened."""
    folder = dataset(tmp_path)
    os.mkfifo(folder / "stuck.png")
    os.symlink(folder / "gone.png", folder / "dangling.jpg")  # a broken link named like an image
    not_files: list[Path] = []
    assert [p.name for p in image_files(folder, not_files)] == ["a.png", "b.png", "c.png", "d.png"]
    assert sorted(p.name for p in not_files) == ["dangling.jpg", "stuck.png"]
    captions, warnings = scanned(folder)
    assert sorted(captions) == ["a.png", "b.png", "c.png", "d.png"]
    assert any("skipped 2 file(s)" in w and "stuck.png" in w and "dangling.jpg" in w for w in warnings), warnings


def test_captions_that_are_not_files_or_not_text_are_named_and_left_out(tmp_path):
    folder = dataset(tmp_path)
    (folder / "a.txt").mkdir()  # a folder named like a caption
    os.symlink(tmp_path / "nowhere.txt", folder / "b.txt")  # a broken link
    (folder / "c.txt").write_bytes("a cat, sitting".encode("utf-16-le"))  # UTF-16 without a BOM
    (folder / "d.txt").write_bytes(b"\x00\xff\x00\xfe\x00\x01\xd8\x00")  # NULs, no text in any encoding
    captions, warnings = scanned(folder)
    assert captions == {"a.png": "", "b.png": "", "c.png": "a cat, sitting", "d.png": ""}
    assert any(f"caption {folder / 'a.txt'} is not a regular file" in w for w in warnings), warnings
    assert any(f"caption {folder / 'b.txt'} is not a regular file" in w for w in warnings), warnings
    assert any(f"caption {folder / 'd.txt'} is not text" in w for w in warnings), warnings
    assert all("\n" not in w for w in warnings)


def test_utf16_captions_read_in_either_byte_order_and_other_encodings_are_replaced(tmp_path):
    folder = dataset(tmp_path)
    (folder / "a.txt").write_bytes("a dog".encode("utf-16-be"))
    (folder / "b.txt").write_bytes("\ufeffa bird".encode("utf-16-le"))  # with its BOM
    (folder / "c.txt").write_bytes("café".encode("latin-1"))  # no NUL: UTF-8 with replacement, named
    captions, warnings = scanned(folder)
    assert captions["a.png"] == "a dog" and captions["b.png"] == "a bird"
    assert captions["c.png"] == "caf\ufffd"
    assert any(f"caption {folder / 'c.txt'} is not UTF-8" in w for w in warnings), warnings


def test_a_run_that_fails_before_its_first_step_leaves_no_folder_and_never_blocks_a_rerun(
    tiny_chroma, shapes_dir, tmp_path
):
    from tuner.core.errors import DataError
    from tuner.core.outputs.runinfo import RunRecord

    from .conftest import base_settings, make_config, make_host, train

    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "max_train_steps": 1}
    with pytest.raises(DataError, match="is not a folder"):
        train({**settings, "data_dir": str(tmp_path / "typo")})
    assert not (tmp_path / "out").exists()  # it created the folder, and took it away again
    result, _, _ = train(settings)  # the rerun is not refused
    assert result.steps == 1
    # a folder that was there before (the web UI makes it for its log) keeps its files; the failed
    # record in it does not count as a run
    other = tmp_path / "made-by-the-ui"
    other.mkdir()
    (other / "console.log").write_text("error: ...\n")
    record = RunRecord(make_config(make_host(), {**settings, "output_dir": str(other)}))
    record.update(status="failed", error="data_dir ... is not a folder")
    result, _, _ = train({**settings, "output_dir": str(other)})
    assert result.steps == 1 and (other / "console.log").exists()


def test_every_mistake_of_a_config_is_said_at_once_before_anything_heavy(tmp_path, monkeypatch, capsys):
    """Five independent mistakes: five lines, exit 2, well under 2 s, and nothing loaded, asked of
    the hub or estimated (each patched to fail the test if reached)."""
    import sys
    import time

    import diffusers
    import yaml

    import tuner.core.estimate.trace
    import tuner.core.model.hub
    from tuner.core import cli

    def reached(*args, **kwargs):
        raise AssertionError("reached before the config was checked")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", reached)
    monkeypatch.setattr(tuner.core.model.hub, "check_hub_model", reached)
    monkeypatch.setattr(tuner.core.estimate.trace, "estimate_precisions", reached)
    config = tmp_path / "five.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path),
                "learning_rat": 1e-4,  # a typo
                "resolution": "big",  # the wrong kind
                "lora_dropout": 1.5,  # out of range
                "mixed_precision": "bf15",  # not a choice
                "max_train_steps": 0,  # below the minimum
            }
        )
    )
    monkeypatch.setattr(sys, "argv", ["tuner", "run", "--plugin", "chroma", "--config", str(config)])
    began = time.perf_counter()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    elapsed = time.perf_counter() - began
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exited.value.code == 2 and elapsed < 2.0
    assert len(lines) == 5, lines
    for needle in ("unknown key 'learning_rat'; did you mean 'learning_rate'?", "resolution: expected an integer",
                   "lora_dropout: must be below 1", "mixed_precision: 'bf15' is not one of",
                   "max_train_steps: must be at least 1"):  # fmt: skip
        assert sum(needle in line for line in lines) == 1, (needle, lines)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("resolution", 1_048_576, "resolution: must be at most 8192"),
        ("network_rank", 1_000_000, "network_rank: must be at most 4096"),
        ("max_train_steps", 10**12, "max_train_steps: must be at most 10000000"),
        ("train_batch_size", 100_000, "train_batch_size: must be at most 4096"),
        ("gradient_accumulation_steps", 100_000, "gradient_accumulation_steps: must be at most 4096"),
        ("validation_resolution", "65536x64", "validation_resolution: 65536x64: each side must be at most 8192"),
        ("validation_num_inference_steps", 10**6, "validation_num_inference_steps: must be at most 1000"),
    ],
)
def test_absurd_sizes_are_refused_before_anything_is_allocated(tiny_chroma, shapes_dir, tmp_path, key, value, message):
    """A size far past anything real used to grow memory without answer (a rank) or start training
    (a step count whose data order is drawn up front): refused when the config is read."""
    from tuner.core.errors import ConfigError

    from .conftest import base_settings, make_config, make_host

    with pytest.raises(ConfigError, match=message) as info:
        make_config(make_host(), {**base_settings(tiny_chroma, shapes_dir, tmp_path), key: value})
    assert "\n" not in str(info.value)


def test_a_missing_data_folder_is_said_before_the_estimate_and_the_hub(tmp_path, monkeypatch):
    """Today's order: folders, data, then the model (a hub look-up can take 25 s), then the estimate."""
    import tuner.core.estimate.cached
    import tuner.core.model.hub
    from tuner.core.errors import DataError

    from .conftest import train

    def reached(*args, **kwargs):
        raise AssertionError("reached before the data folder was checked")

    monkeypatch.setattr(tuner.core.model.hub, "check_hub_model", reached)
    monkeypatch.setattr(tuner.core.estimate.cached, "cached_estimate", reached)
    settings = {
        "pretrained_model_name_or_path": "nobody/not-a-model",  # a hub id: asked only after the data
        "data_dir": str(tmp_path / "photos"),
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "mixed_precision": "no",
    }
    with pytest.raises(DataError, match=f"data_dir {tmp_path / 'photos'} is not a folder"):
        train(settings)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX locks")
def test_overwrite_never_removes_the_files_of_a_run_that_is_alive(tiny_chroma, shapes_dir, tmp_path):
    import fcntl

    from tuner.core.errors import ConfigError
    from tuner.core.outputs.runinfo import LOCK_FILE, settle_output_dir

    from .conftest import base_settings, make_config, make_host

    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"status": "training", "step": 7}')
    (out / "checkpoint-5").mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"...")
    config = make_config(
        make_host(), {**base_settings(tiny_chroma, shapes_dir, tmp_path), "existing_output": "overwrite"}
    )
    with open(out / LOCK_FILE, "a+") as alive:  # the other run holds the folder's lock
        fcntl.flock(alive, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="is in use by another run"):
            settle_output_dir(config, print)
    assert sorted(p.name for p in out.iterdir()) == [
        LOCK_FILE,
        "checkpoint-5",
        "pytorch_lora_weights.safetensors",
        "run.json",
    ]
    settle_output_dir(config, print)  # once it is gone, overwrite does what it says
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_only_keys_that_name_files_are_resolved_when_a_run_is_recorded(tiny_chroma, shapes_dir, tmp_path, monkeypatch):
    """A folder named like a value (lora, base, adamw) beside the run used to turn those values into
    absolute paths in the checkpoint, so the run resumed nowhere else."""
    from tuner.core.outputs.checkpoint import check_resume_settings, resume_settings

    from .conftest import base_settings, make_config, make_host

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for name in ("lora", "base", "adamw"):
        (here / name).mkdir(parents=True)
    elsewhere.mkdir()
    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "model_flavour": "base"}
    monkeypatch.chdir(here)
    saved = resume_settings(make_config(make_host(), settings), ["x"])
    assert (saved["lora_type"], saved["optimizer"], saved["model_flavour"]) == ("lora", "adamw", "base")
    assert saved["pretrained_model_name_or_path"] == str(tiny_chroma.resolve())  # a local folder: resolved
    monkeypatch.chdir(elsewhere)
    check_resume_settings(saved, make_config(make_host(), settings), ["x"], tmp_path / "checkpoint-1")  # no refusal


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"datasets": "twice"}, "is listed twice; list a folder once and give it a weight"),
        ({"compile": True, "compile_backend": "inductr"}, "compile_backend: 'inductr' is not a torch.compile backend"),
    ],
)
def test_settings_that_contradict_each_other_are_refused(tiny_chroma, shapes_dir, tmp_path, extra, message):
    from tuner.core.errors import ConfigError

    from .conftest import base_settings, make_config, make_host

    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    if extra.get("datasets") == "twice":
        del settings["data_dir"]
        extra = {"datasets": [{"data_dir": str(shapes_dir)}, {"id": "again", "data_dir": str(shapes_dir) + "/"}]}
    with pytest.raises(ConfigError, match=message) as info:
        make_config(make_host(), {**settings, **extra})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"ema_decay": 0.9}, "ema_decay is ignored because use_ema is off"),
        ({"lokr_factor": 4}, "lokr_factor is ignored because lora_type is lora"),
        ({"lr_power": 2.0}, "lr_power is ignored because lr_scheduler is constant"),
        ({"compile_backend": "aot_eager"}, "compile_backend is ignored because compile is off"),
        ({"scheduled_sampling_strategy": "biased_late"}, "scheduled_sampling_strategy is ignored because"),
        ({"eval_split": 2}, "eval_split holds 2 image(s) out of training, but eval_steps is 0"),
        ({"lr_warmup_steps": 10, "max_train_steps": 4}, "the learning rate never reaches learning_rate"),
        ({"eval_data_dir": "same", "eval_steps": 2}, "is also a training folder: the eval loss measures how well"),
    ],
)
def test_settings_a_switched_off_method_ignores_are_said(tiny_chroma, shapes_dir, tmp_path, extra, said):
    from .conftest import base_settings, make_config, make_host

    if extra.get("eval_data_dir") == "same":
        extra = {**extra, "eval_data_dir": str(shapes_dir)}
    warnings: list[str] = []
    make_config(make_host(), {**base_settings(tiny_chroma, shapes_dir, tmp_path), **extra}, warnings)
    assert sum(said in w for w in warnings) == 1, warnings
    quiet: list[str] = []
    make_config(make_host(), base_settings(tiny_chroma, shapes_dir, tmp_path), quiet)
    assert quiet == []  # the same config without them says nothing


def test_cache_entries_with_nan_are_never_written_and_never_trained_on(tiny_chroma, shapes_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from tuner.core import hookimpl
    from tuner.core.errors import DataError

    from .conftest import base_settings, train

    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "max_train_steps": 1}

    class Overflowing:  # a VAE that overflows (fp16) encodes to infinity
        @hookimpl(tryfirst=True)
        def encode_images(self, vae, pixels):
            return torch.full((pixels.shape[0], 16, pixels.shape[2] // 8, pixels.shape[3] // 8), float("inf"))

    with pytest.raises(DataError, match=r"encoding image .*\.png gave NaN or infinite values \(latents\)") as info:
        train(settings, ("overflow", Overflowing()))
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache" / "latents").rglob("*.safetensors"))  # nothing cached
    train(settings)  # caches the latents
    entry = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))[0]
    tensors = load_file(str(entry))
    save_file({"latents": torch.full_like(tensors["latents"], float("nan"))}, str(entry))  # a sound header, NaN
    again = {**settings, "output_dir": str(tmp_path / "again"), "max_train_steps": 12}
    with pytest.raises(DataError, match="held NaN or infinite values") as info:
        train(again)
    assert str(entry) in str(info.value) and not entry.exists()
    result, _, _ = train({**again, "output_dir": str(tmp_path / "third")})  # encoded again, trains
    assert result.steps == 12 and all(loss == loss for loss in result.losses)


def test_a_lora_that_does_not_fit_the_model_is_one_line_in_sample(tiny_chroma, tmp_path):
    import torch
    from diffusers import ChromaTransformer2DModel
    from safetensors.torch import save_file

    from tuner.core.errors import ConfigError
    from tuner.core.run.sampling import apply_lora

    from .conftest import make_host

    transformer = ChromaTransformer2DModel.from_pretrained(tiny_chroma, subfolder="transformer")
    wrong = tmp_path / "other.safetensors"  # a rank-4 LoRA for a layer 999 wide: another model's
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 999),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
        },
        str(wrong),
    )
    with pytest.raises(
        ConfigError,
        match=r"--lora .*other.safetensors: transformer_blocks.0.attn.to_q is 32x999 in the file but 32x32 in this chroma",
    ) as info:
        apply_lora(transformer, str(wrong), make_host().family)
    assert "\n" not in str(info.value) and "tuner check-lora" in str(info.value)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX locks")
def test_a_failed_start_never_removes_the_files_of_a_run_that_took_the_folder_meanwhile(tmp_path):
    import fcntl

    from tuner.core.outputs.runinfo import LOCK_FILE, RUN_FILE, forget_untrained_run

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / RUN_FILE).write_text('{"status": "training"}')
    with open(folder / LOCK_FILE, "a+") as other:  # a run that started there after we looked
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        forget_untrained_run(folder)
        assert (folder / RUN_FILE).exists() and (folder / LOCK_FILE).exists()
    forget_untrained_run(folder)  # nobody holds it: ours to take away
    assert not folder.exists()


def test_temporaries_of_a_killed_writer_are_removed_only_when_it_is_gone_and_under_the_lock(tmp_path):
    """`kill -9` mid-write leaves atomic_write's temporary behind; the next cache open removes it
    (and says so) when its writer's pid is dead on this machine, and only while holding the folder's
    lock: a live writer's temporary, another machine's and a file merely ending in .tmp stay."""
    import fcntl
    import socket
    import subprocess
    import sys
    import threading

    from tuner.core.data.cache import TensorCache
    from tuner.core.io import TEMPORARIES_LOCK, atomic_write

    cache = TensorCache(tmp_path, "text", {"model": "m"})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    names = {
        "dead": f".abc.safetensors.{dead.stdout.strip()}@{host}.k2j4h5g6.tmp",
        "alive": f".abc.safetensors.{os.getpid()}@{host}.a1b2c3d4.tmp",
        "elsewhere": f".abc.safetensors.{dead.stdout.strip()}@another-machine.a1b2c3d4.tmp",
        "user's": "notes.tmp",
    }
    for name in names.values():
        (cache.dir / name).write_bytes(b"partial")
    lock = open(cache.dir / TEMPORARIES_LOCK, "a")  # noqa: SIM115 - held across the thread below
    fcntl.flock(lock, fcntl.LOCK_EX)
    opened: list[TensorCache] = []
    worker = threading.Thread(target=lambda: opened.append(TensorCache(tmp_path, "text", {"model": "m"})))
    worker.start()
    worker.join(timeout=0.5)
    assert worker.is_alive() and (cache.dir / names["dead"]).exists()  # waits for the lock
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()
    worker.join(timeout=10)
    assert opened[0].removed_temporaries == [names["dead"]]
    assert sorted(p.name for p in cache.dir.glob("*.tmp")) == sorted(v for k, v in names.items() if k != "dead")
    # what atomic_write names its temporaries is what the cleaner recognises
    seen = []
    atomic_write(cache.dir / "x.json", lambda tmp: seen.append(Path(tmp).name) or Path(tmp).write_text("{}"))
    assert seen[0].startswith(f".x.json.{os.getpid()}@{host}.") and seen[0].endswith(".tmp")
    from tuner.core.io import TEMPORARY

    assert TEMPORARY.match(seen[0])


def test_a_truncated_weight_file_is_named_by_every_loader(tiny_chroma, shapes_dir, tmp_path):
    """A weight file cut short (an interrupted download or copy): each component's loader, the
    streamed quantized load and a LoRA given to `tuner sample` say which file, in one line; never
    safetensors' words without a file, nor diffusers' guess that no safetensors weights exist."""
    import shutil

    import torch

    from tuner.core.errors import TunerError
    from tuner.core.model.quantize import load_quantized
    from tuner.core.run.sampling import apply_lora

    from .conftest import base_settings, make_config, make_host

    model = tmp_path / "model"
    shutil.copytree(tiny_chroma, model)
    cut = {}
    for component, folder in (("transformer", "transformer"), ("vae", "vae"), ("text_encoders", "text_encoder")):
        file = next((model / folder).glob("*.safetensors"))
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        cut[component] = file
    host = make_host()
    settings = {**base_settings(model, shapes_dir, tmp_path), "pretrained_model_name_or_path": str(model)}
    config = make_config(host, settings)
    attempts = {
        **{c: lambda c=c: host.provide("load_model", config=config, component=c, dtype=torch.float32) for c in cut},
        "int8": lambda: load_quantized(
            host, make_config(host, {**settings, "base_model_precision": "int8-quanto"}), torch.float32
        ),
    }
    for what, load in attempts.items():
        with pytest.raises(TunerError) as info:
            load()
        message = str(info.value)
        file = cut["transformer" if what == "int8" else what]
        assert f"{file}: a damaged weight file (" in message and "\n" not in message, (what, message)
    lora = tmp_path / "cut_lora.safetensors"
    lora.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a"')
    with pytest.raises(TunerError, match=f"--lora {lora}: a damaged weight file"):
        apply_lora(torch.nn.Linear(2, 2), str(lora), host.family)
