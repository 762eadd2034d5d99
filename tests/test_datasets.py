"""Several datasets with weights, their own resolution and caption settings, a regularisation set,
and SimpleTuner's multidatabackend.json with several backends."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tuner.core import hookimpl
from tuner.core.errors import ConfigError, DataError

from .conftest import base_settings, make_config, make_host, train


def two_datasets(tiny_chroma, shapes_dir, mixed_dir, tmp_path, **extra):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    del settings["data_dir"]
    settings.update(
        datasets=[
            {"id": "shapes", "data_dir": str(shapes_dir), "weight": 3},
            {
                "id": "mixed",
                "data_dir": str(mixed_dir),
                "resolution": 48,
                "aspect_bucket_alignment": 16,
                "caption_dropout_probability": 0.5,
                "kind": "regularisation",
            },
        ],
        train_batch_size=2,
        max_train_steps=40,
        checkpointing_steps=20,
    )
    settings.update(extra)
    return settings


def log_rows(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_batches_come_from_each_dataset_by_weight_at_its_own_sizes(
    tiny_chroma, shapes_dir, mixed_dir, tmp_path, capsys
):
    train(two_datasets(tiny_chroma, shapes_dir, mixed_dir, tmp_path))
    rows = log_rows(tmp_path / "out")
    used = Counter(d for r in rows for d in r["datasets"])
    assert used["shapes"] + used["mixed"] == 40 and 22 <= used["shapes"] <= 38  # 3:1, i.e. 30 of 40 expected
    sizes = {
        d: {tuple(s) for r in rows for s, dd in zip(r["sizes"], r["datasets"], strict=True) if dd == d} for d in used
    }
    assert sizes["shapes"] == {(64, 64)}  # the run's resolution
    assert sizes["mixed"] == {(48, 48), (32, 64), (64, 32)}  # its own resolution, every one of its buckets
    out = capsys.readouterr().out
    assert "dataset 'shapes', 75% of batches: 1 bucket(s) for 12 image(s):" in out
    assert "dataset 'mixed' (regularisation), 25% of batches:" in out


def test_two_datasets_resume_exactly(tiny_chroma, shapes_dir, mixed_dir, tmp_path):
    straight, _, _ = train(
        two_datasets(tiny_chroma, shapes_dir, mixed_dir, tmp_path / "a", max_train_steps=12, checkpointing_steps=5)
    )
    settings = two_datasets(
        tiny_chroma, shapes_dir, mixed_dir, tmp_path / "b", max_train_steps=5, checkpointing_steps=5
    )
    train(settings)
    resumed, _, _ = train({**settings, "max_train_steps": 12, "resume_from_checkpoint": "latest"})
    assert resumed.losses == straight.losses[5:]
    assert [r["datasets"] for r in log_rows(tmp_path / "b" / "out")] == [
        r["datasets"] for r in log_rows(tmp_path / "a" / "out")
    ]


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        ([{"id": "a", "data_dir": "x", "weight": 0}], r"datasets\[0\] \(a\): weight: 0 is not a positive number"),
        ([{"id": "a", "data_dir": "x", "repeat": 2}], r"datasets\[0\] \(a\): unknown field\(s\) repeat; use"),
        ([{"id": "a"}], r"datasets\[0\] \(a\): data_dir is required"),
        (
            [{"data_dir": "x", "kind": "prior"}],
            r"datasets\[0\] \(#1\): kind: 'prior' is not one of training, regularisation",
        ),
        (
            [{"data_dir": "x", "resolution": 500}],
            r"datasets\[0\] \(#1\): resolution: must be a multiple of 16, got 500",
        ),
        (
            [{"data_dir": "x", "aspect_bucket_alignment": 24}],
            r"datasets\[0\] \(#1\): aspect_bucket_alignment: 24 is not a multiple",
        ),
        (
            [{"id": "a", "data_dir": "x"}, {"id": "a", "data_dir": "y"}],
            r"datasets\[1\] \(a\): id 'a' is used by another entry",
        ),
        ([], r"datasets: is an empty list"),
    ],
)
def test_bad_dataset_entries_are_one_line_naming_the_entry(datasets, message):
    with pytest.raises(ConfigError, match=message):
        make_config(make_host(), {"datasets": datasets})
    with pytest.raises(ConfigError, match=r"datasets: set either data_dir or datasets, not both"):
        make_config(make_host(), {"data_dir": "x", "datasets": [{"data_dir": "y"}]})


def test_a_missing_dataset_folder_is_named(tiny_chroma, shapes_dir, mixed_dir, tmp_path):
    settings = two_datasets(tiny_chroma, shapes_dir, mixed_dir, tmp_path)
    settings["datasets"][1]["data_dir"] = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"^dataset 'mixed' \(regularisation\): data_dir .*nowhere is not a folder$"):
        train(settings)
    settings["datasets"][1].update(data_dir=str(mixed_dir), minimum_image_size=1000)  # every image filtered out
    with pytest.raises(DataError, match=r"^dataset 'mixed' \(regularisation\): data_dir .*: none of the 20 images"):
        train(settings)


def test_simpletuner_backends_become_datasets_and_train(tiny_chroma, shapes_dir, mixed_dir, tmp_path):
    from tuner.core.config import simpletuner
    from tuner.core.host.manager import PluginHost

    backends = [
        {"id": "subject", "type": "local", "instance_data_dir": str(shapes_dir), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel", "crop": True, "crop_aspect": "square", "repeats": 1,
         "probability": 2},
        {"id": "reg", "type": "local", "instance_data_dir": str(mixed_dir), "caption_strategy": "filename",
         "resolution": 0.0025, "resolution_type": "area", "crop_style": "random", "crop_aspect": "preserve",
         "is_regularisation_data": True, "probability": 1},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "cache" / "text")},
    ]  # fmt: skip
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    config = {
        "--model_family": "chroma",
        "--pretrained_model_name_or_path": str(tiny_chroma),
        "--data_backend_config": str(tmp_path / "multidatabackend.json"),
        "--output_dir": str(tmp_path / "out"),
        "--max_train_steps": 4,
        "--train_batch_size": 2,
        "--aspect_bucket_alignment": 16,
        "--tokenizer_max_length": 16,
        "--mixed_precision": "no",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    settings, _ = simpletuner.load(tmp_path / "config.json", PluginHost("chroma"))
    subject, reg = settings["datasets"]
    assert subject == {
        "id": "subject", "data_dir": str(shapes_dir), "caption_strategy": "textfile", "repeats": 1, "resolution": 64,
        "resolution_type": "pixel", "crop_style": "center", "aspect_bucket_max_ratio": 1.0, "weight": 2,
    }  # fmt: skip
    assert reg["kind"] == "regularisation" and reg["resolution"] == 48 and reg["crop_style"] == "random"
    result, _, _ = train({**settings, "memory_estimate": False, "report_to": "none"})
    assert result.steps == 4


def test_caption_strategies_extensions_and_a_trigger_word(tmp_path, shapes_dir):
    """instanceprompt gives every image instance_prompt; .caption files are read, .txt first where
    both exist (the order of caption_extensions); caption_prefix goes before every caption; the
    settings are checked in one line."""
    from tuner.core.data.images import caption_rule, scan_dataset

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b", "c"):
        (data / f"{name}.png").write_bytes((shapes_dir / "00_red_circle.png").read_bytes())
    (data / "a.txt").write_text("from txt")
    (data / "a.caption").write_text("from caption")
    (data / "b.caption").write_text("only caption")
    host = make_host()

    def captions(**settings):
        config = make_config(host, {"data_dir": str(data), **settings})
        return {item.image.stem: item.caption for item in scan_dataset(data, lambda m: None, caption_rule(config))}

    assert captions() == {"a": "from txt", "b": "only caption", "c": ""}
    assert captions(caption_extensions=[".caption", ".txt"])["a"] == "from caption"
    assert captions(caption_prefix="sks") == {"a": "sks from txt", "b": "sks only caption", "c": "sks"}
    assert set(captions(caption_strategy="instanceprompt", instance_prompt="a photo of sks").values()) == {
        "a photo of sks"
    }
    for settings, message in (
        ({"caption_strategy": "instanceprompt"}, "instance_prompt: is required with caption_strategy instanceprompt"),
        ({"caption_extensions": ["txt"]}, "caption_extensions: 'txt' is no file extension"),
    ):
        with pytest.raises(ConfigError, match=message):
            make_config(host, {"data_dir": str(data), **settings})


def test_caption_dropout_can_keep_the_trigger_word(tiny_chroma, shapes_dir, tmp_path):
    """With caption_dropout_keeps_prefix a dropped caption trains with caption_prefix alone: the
    trigger word is on every sample, and the share dropped is the one asked."""
    from tuner.core.data.cache import TensorCache, cache_key, text_key
    from tuner.core.run.trainer import Trainer

    from .test_buckets import Captions

    settings = {
        **base_settings(tiny_chroma, shapes_dir, tmp_path),
        "caption_prefix": "sks",
        "caption_dropout_probability": 0.5,
        "caption_dropout_keeps_prefix": True,
        "train_batch_size": 2,
        "max_train_steps": 8,
    }
    spy = Captions()
    host = make_host(("captions", spy))
    config = make_config(host, settings)
    trainer = Trainer(host, config, warn=lambda m: None)
    trainer.prepare_data()
    text = TensorCache(tmp_path / "cache", "text", cache_key(host, config, "text", "text_encoder"))
    spy.empty = text.load(text_key("sks"))["prompt_embeds"]
    trainer.train()
    assert len(spy.dropped) == 16 and 3 <= sum(spy.dropped) <= 13, spy.dropped


def several_captions(folder, shapes_dir):
    """Four images; the first's caption file holds three captions, one per line."""
    folder.mkdir()
    for name in ("00_red_circle", "01_green_circle", "02_blue_circle", "03_yellow_circle"):
        (folder / f"{name}.png").write_bytes((shapes_dir / f"{name}.png").read_bytes())
        (folder / f"{name}.txt").write_text((shapes_dir / f"{name}.txt").read_text())
    (folder / "00_red_circle.txt").write_text("a red circle\n\na red ring\r\na round red shape\n")
    return folder


def test_a_caption_file_of_several_lines_is_several_captions_drawn_per_sample(tiny_chroma, shapes_dir, tmp_path):
    """Each line a caption (caption_lines: each), one drawn per sample from the seed and the sample's
    place in the run: the same draws in a second run; caption_lines: join keeps one caption."""
    from tuner.core.data.cache import TensorCache, cache_key, text_key
    from tuner.core.data.images import caption_rule, scan_dataset
    from tuner.core.run.trainer import Trainer

    data = several_captions(tmp_path / "data", shapes_dir)
    host = make_host()
    items = scan_dataset(
        data, lambda m: None, caption_rule(make_config(host, {"data_dir": str(data), "caption_prefix": "sks"}))
    )
    assert items[0].captions == ("sks a red circle", "sks a red ring", "sks a round red shape")
    joined = scan_dataset(
        data, lambda m: None, caption_rule(make_config(host, {"data_dir": str(data), "caption_lines": "join"}))
    )
    assert joined[0].captions == ("a red circle a red ring a round red shape",)

    class Seen:
        def __init__(self):
            self.rows = []

        @hookimpl(wrapper=True)
        def predict_flow(self, text):
            self.rows += list(text["prompt_embeds"])
            return (yield)

    runs = []
    for name in ("a", "b"):
        spy = Seen()
        settings = {**base_settings(tiny_chroma, data, tmp_path / name), "train_batch_size": 2, "max_train_steps": 12}
        run_host = make_host(("seen", spy))
        config = make_config(run_host, settings)
        Trainer(run_host, config, warn=lambda m: None).train()
        text = TensorCache(tmp_path / name / "cache", "text", cache_key(run_host, config, "text", "text_encoder"))
        encoded = {
            c: text.load(text_key(c))["prompt_embeds"] for c in ("a red circle", "a red ring", "a round red shape")
        }
        runs.append([next((c for c, e in encoded.items() if torch.equal(row, e)), None) for row in spy.rows])
    assert runs[0] == runs[1]  # drawn from the seed and the sample's index, not from what ran before
    assert {c for c in runs[0] if c} == {"a red circle", "a red ring", "a round red shape"}  # 6 visits, 3 captions


def test_a_run_with_several_captions_per_image_resumes_exactly(tiny_chroma, shapes_dir, tmp_path):
    from .test_resume import assert_resume_is_exact

    data = several_captions(tmp_path / "data", shapes_dir)
    straight = {
        **base_settings(tiny_chroma, data, tmp_path / "a"),
        "train_batch_size": 2,
        "max_train_steps": 6,
        "checkpointing_steps": 3,
    }
    assert_resume_is_exact(straight, 3)


def test_captions_from_a_metadata_file(shapes_dir, tmp_path):
    """caption_metadata: a JSON object or Hugging Face's metadata.jsonl; a list is several captions;
    images it does not list keep their caption files; a broken file is one line naming it."""
    from tuner.core.data.images import caption_rule, scan_dataset

    data = several_captions(tmp_path / "data", shapes_dir)
    host = make_host()

    def captions(metadata, text):
        path = tmp_path / metadata
        path.write_text(text)
        config = make_config(host, {"data_dir": str(data), "caption_metadata": str(path)})
        return {i.image.stem: i.captions for i in scan_dataset(data, lambda m: None, caption_rule(config))}

    as_json = captions(
        "captions.json", json.dumps({"00_red_circle.png": ["one", "two"], "01_green_circle.png": "x  y"})
    )
    assert as_json["00_red_circle"] == ("one", "two") and as_json["01_green_circle"] == ("x y",)
    assert as_json["02_blue_circle"] == ((data / "02_blue_circle.txt").read_text().strip(),)  # not listed
    lines = [{"file_name": "03_yellow_circle.png", "text": "from jsonl"}]
    as_jsonl = captions("metadata.jsonl", "\n".join(json.dumps(row) for row in lines))
    assert as_jsonl["03_yellow_circle"] == ("from jsonl",)
    with pytest.raises(DataError, match=r"caption_metadata .*bad.jsonl: cannot read it \(no 'file_name' field\)"):
        captions("bad.jsonl", json.dumps({"name": "00_red_circle.png"}))
