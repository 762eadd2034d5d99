"""Aspect-ratio buckets: sizes, assignment of known shapes, merging, crops, batches from one bucket,
exact resume and one cache entry per image and bucket."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from tuner.core import hookimpl
from tuner.core.data.buckets import Bucket, bucket_sizes, crop_box, nearest, plan
from tuner.core.data.sampler import BucketBatches
from tuner.core.errors import ConfigError
from tuner.core.host.events import StepEnd

from .conftest import base_settings, make_config, make_host, train


def test_area_buckets_keep_the_area_and_the_alignment():
    buckets = bucket_sizes(1024, "area", 64, 3.0)
    assert Bucket(1024, 1024) in buckets
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert 0.8 <= b.width * b.height / 1024**2 <= 1.25
        assert 1 / 3 <= b.aspect <= 3
        assert Bucket(b.height, b.width) in buckets  # every landscape bucket has its portrait twin
    assert min(b.aspect for b in buckets) == pytest.approx(1 / 3)
    assert [b.aspect for b in buckets] == sorted(b.aspect for b in buckets)


def test_pixel_buckets_keep_the_shorter_side():
    buckets = bucket_sizes(512, "pixel", 64, 2.0)
    assert all(min(b.width, b.height) == 512 for b in buckets)
    assert max(b.aspect for b in buckets) == 2.0 and len(buckets) == 17


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((3024, 4032), Bucket(896, 1152)),  # a phone portrait, 3:4
        ((1920, 1080), Bucket(1344, 768)),  # a 16:9 landscape
        ((800, 800), Bucket(1024, 1024)),  # square, upscaled
        ((10000, 1000), Bucket(1728, 576)),  # a 10:1 panorama: the widest bucket, cropped there
        ((1000, 10000), Bucket(576, 1728)),
    ],
)
def test_known_shapes_go_to_the_bucket_of_the_closest_aspect(size, expected):
    buckets = bucket_sizes(1024, "area", 64, 3.0)
    assert nearest(*size, buckets) == expected
    width, height = size
    best = min(abs(math.log(b.aspect) - math.log(width / height)) for b in buckets)
    assert abs(math.log(expected.aspect) - math.log(width / height)) == best


def test_an_image_is_covered_and_cropped_never_stretched():
    for width, height in [(3024, 4032), (1920, 1080), (10000, 1000), (333, 777)]:
        bucket = nearest(width, height, bucket_sizes(1024, "area", 64, 3.0))
        scaled_w, scaled_h, left, top = crop_box(width, height, bucket, "center")
        assert scaled_w >= bucket.width and scaled_h >= bucket.height  # covers
        assert scaled_w / scaled_h == pytest.approx(width / height, rel=0.01)  # same aspect: no stretch
        assert left == (scaled_w - bucket.width) // 2 and top == (scaled_h - bucket.height) // 2
        assert min(scaled_w - bucket.width, scaled_h - bucket.height) <= 1  # cropped along one axis only
    *_, left, top = crop_box(2000, 1000, Bucket(1024, 1024), "random", offset=0.0)
    assert (left, top) == (0, 0)


def test_buckets_too_small_for_a_batch_merge_into_the_nearest():
    buckets = bucket_sizes(1024, "area", 64, 3.0)
    sizes = [(1000, 1000)] * 5 + [(1600, 1000)] * 3 + [(1700, 1000)] + [(1000, 1900)]
    result = plan(sizes, buckets, global_batch=2)
    counts = result.counts()
    assert all(n >= 2 for n in counts.values()) and sum(counts.values()) == len(sizes)  # none dropped
    assert result.buckets[8] == result.buckets[5]  # 1.7:1 joined the 1.6:1 images
    assert counts[Bucket(1024, 1024)] == 6  # the lone portrait went to the nearest: square
    table = result.table()
    assert "2 bucket(s) for 10 image(s):" in table and "with the images of" in table
    assert plan(sizes, buckets, global_batch=1).counts() == {
        Bucket(1024, 1024): 5,
        Bucket(1280, 832): 3,
        Bucket(1344, 768): 1,
        Bucket(768, 1408): 1,  # 1000x1900 is 0.526; 768x1408 is 0.545, 768x1344 0.571
    }


def test_every_global_batch_comes_from_one_bucket_and_every_image_every_epoch():
    buckets = [Bucket(64, 64)] * 7 + [Bucket(96, 48)] * 5 + [Bucket(48, 96)] * 3
    sampler = BucketBatches(buckets, local_batch=2, processes=1, rank=0, seed=3, start=0)
    assert sampler.per_epoch == 4 + 3 + 2
    for epoch in range(3):
        seen = []
        for k in range(epoch * sampler.per_epoch, (epoch + 1) * sampler.per_epoch):
            batch = sampler.indices(k)
            assert len(batch) == 2 and len({buckets[i] for i in batch}) == 1
            seen += batch
        assert set(seen) == set(range(len(buckets)))
    # a sampler that starts at k yields what an uninterrupted one yields from k on
    later = BucketBatches(buckets, 2, 1, 0, seed=3, start=13)
    assert [next(iter(later)) for _ in range(1)] == [sampler.indices(13)]
    it = iter(BucketBatches(buckets, 2, 1, 0, seed=3, start=0))
    assert [next(it) for _ in range(20)] == [sampler.indices(k) for k in range(20)]
    # N processes: the ranks' slices make up the one process's global batch
    one = BucketBatches(buckets, 4, 1, 0, seed=3, start=0)
    two = [BucketBatches(buckets, 2, 2, rank, seed=3, start=0) for rank in (0, 1)]
    for k in range(10):
        assert two[0].indices(k) + two[1].indices(k) == one.indices(k)


def mixed_settings(tiny_chroma, mixed_dir, tmp_path, **extra):
    settings = base_settings(tiny_chroma, mixed_dir, tmp_path)
    settings.update(aspect_bucket_alignment=16, train_batch_size=2, max_train_steps=10, checkpointing_steps=4)
    settings.update(extra)
    return settings


class Sizes:
    def __init__(self):
        self.sizes = []

    @hookimpl
    def training_event(self, event):
        if isinstance(event, StepEnd):
            self.sizes += event.sizes


class Encodes:
    """Counts images encoded (cache misses), through a wrapper on encode_images."""

    def __init__(self):
        self.images = 0

    @hookimpl(wrapper=True)
    def encode_images(self, pixels):
        self.images += pixels.shape[0]
        return (yield)


def test_mixed_shapes_train_in_their_buckets_and_resume_exactly_with_caption_dropout(
    tiny_chroma, mixed_dir, tmp_path, capsys
):
    sizes, encodes = Sizes(), Encodes()
    # caption dropout and evaluations between steps: exact on resume too
    dropout = {"caption_dropout_probability": 0.25, "eval_steps": 3, "eval_split": 2}
    straight, _, _ = train(
        mixed_settings(tiny_chroma, mixed_dir, tmp_path / "a", **dropout), ("sizes", sizes), ("n", encodes)
    )
    assert encodes.images == 20  # every image once, at its bucket's size (18 train, 2 held out)
    assert {tuple(s) for s in sizes.sizes} == {(64, 64), (48, 96), (96, 48)}  # [height, width]
    out = capsys.readouterr().out
    assert "3 bucket(s) for 18 image(s):" in out
    rows = [json.loads(line) for line in (tmp_path / "a" / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["sizes"] for r in rows if "sizes" in r] == [[s] for s in sizes.sizes]

    # stop after step 5 (checkpoint-4), resume: bit-identical losses from step 5 on
    settings = mixed_settings(tiny_chroma, mixed_dir, tmp_path / "b", max_train_steps=5, **dropout)
    train(settings)
    resumed, _, _ = train({**settings, "max_train_steps": 10, "resume_from_checkpoint": "latest"})
    assert resumed.resumed_from.name == "checkpoint-5"
    assert resumed.losses == straight.losses[5:]


def test_bucket_settings_re_encode_only_what_changed(tiny_chroma, mixed_dir, tmp_path):
    settings = mixed_settings(tiny_chroma, mixed_dir, tmp_path, max_train_steps=1, checkpointing_steps=0)
    first = Encodes()
    train(settings, ("n", first))
    again = Encodes()  # other steps and learning rate: every latent is reused
    train({**settings, "max_train_steps": 2, "learning_rate": 5e-4}, ("n", again))
    square = Encodes()  # square buckets only: the 8 non-square images get new latents
    train({**settings, "aspect_bucket_max_ratio": 1.0}, ("n", square))
    assert (first.images, again.images, square.images) == (20, 0, 8)


def test_small_images_are_skipped_with_a_count_and_bad_alignment_is_refused(tiny_chroma, mixed_dir, tmp_path):
    warnings: list[str] = []
    result, _, _ = train(
        mixed_settings(tiny_chroma, mixed_dir, tmp_path, max_train_steps=1, minimum_image_size=70), warnings=warnings
    )
    (line,) = [w for w in warnings if "minimum_image_size" in w]
    assert line.startswith("skipped 12 image(s) whose sqrt(width x height) is below minimum_image_size 70: ")
    host = make_host()
    with pytest.raises(
        ConfigError, match=r"aspect_bucket_alignment: 24 is not a multiple of chroma's latent alignment 16"
    ):
        make_config(host, {"aspect_bucket_alignment": 24})


def test_exif_rotated_images_train_upright(tmp_path):
    from PIL import Image

    from tuner.core.data.images import image_size, load_image

    upright = Image.new("RGB", (40, 80), (0, 0, 0))
    upright.paste((255, 0, 0), (0, 0, 40, 20))  # red at the top
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways, 80x40 ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the tag that says: rotate 90 degrees clockwise to show
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    assert image_size(tmp_path / "phone.jpg") == (40, 80)
    pixels = load_image(tmp_path / "phone.jpg", Bucket(32, 64))
    assert pixels.shape == (3, 64, 32)
    assert pixels[0, :8].mean() > 0.8 and pixels[0, -8:].mean() < -0.8  # red on top


def test_tuner_buckets_prints_the_table_without_training(tiny_chroma, mixed_dir, tmp_path):
    from typer.testing import CliRunner

    from tuner.core.cli import app

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(mixed_settings(tiny_chroma, mixed_dir, tmp_path)))
    result = CliRunner().invoke(app, ["buckets", "--plugin", "chroma", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "3 bucket(s) for 20 image(s):" in result.output
    assert "48x96       4 image(s)" in result.output and "64x64      12 image(s)" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_buckets_fill_batches_from_one_shape(tiny_chroma, mixed_dir, tmp_path):
    seen = []

    class Shapes:
        @hookimpl(wrapper=True)
        def predict_flow(self, noisy_latents):
            seen.append(tuple(noisy_latents.shape))
            return (yield)

    # one epoch: 12 squares, 4 wide and 4 tall images in global batches of 2 -> 6 + 2 + 2 batches
    train(mixed_settings(tiny_chroma, mixed_dir, tmp_path, max_train_steps=10, checkpointing_steps=0), ("s", Shapes()))
    assert len(seen) == 10 and all(shape[0] == 2 for shape in seen)
    per_shape = Counter(shape[2:] for shape in seen)  # every image once: each bucket's batch count
    assert sorted(per_shape.values()) == [2, 2, 6]
    assert len({shape[2:] for shape in seen[:6]}) > 1  # the buckets' batches interleave, not bucket by bucket


class Captions:
    """Records, per sample, whether predict_flow saw the empty caption's embedding."""

    def __init__(self):
        self.empty, self.dropped = None, []

    @hookimpl(wrapper=True)
    def predict_flow(self, text):
        rows = text["prompt_embeds"]
        self.dropped += [bool(torch.equal(row, self.empty)) for row in rows]
        return (yield)


def test_caption_dropout_trains_the_empty_caption_at_the_rate_asked_and_reproducibly(tiny_chroma, mixed_dir, tmp_path):
    from tuner.core.data.cache import TensorCache, cache_key, text_key

    settings = mixed_settings(
        tiny_chroma,
        mixed_dir,
        tmp_path / "a",
        caption_dropout_probability=0.3,
        max_train_steps=40,
        checkpointing_steps=0,
    )
    runs = []
    for name in ("a", "b"):
        spy = Captions()
        host = make_host(("captions", spy))
        config = make_config(host, {**settings, "output_dir": str(tmp_path / name / "out")})
        from tuner.core.run.trainer import Trainer

        trainer = Trainer(host, config, warn=lambda m: None)
        trainer.prepare_data()
        text = TensorCache(tmp_path / "a" / "cache", "text", cache_key(host, config, "text", "text_encoder"))
        spy.empty = text.load(text_key(""))["prompt_embeds"]
        trainer.train()
        runs.append(spy.dropped)
    assert runs[0] == runs[1]  # the same samples dropped in both runs
    rate = sum(runs[0]) / len(runs[0])
    assert len(runs[0]) == 80 and 0.18 < rate < 0.42, rate  # 80 samples at p = 0.3


def test_flux_trains_in_buckets_too(tiny_flux, mixed_dir, tmp_path):
    sizes = Sizes()
    settings = mixed_settings(tiny_flux, mixed_dir, tmp_path, max_train_steps=6, checkpointing_steps=0)
    settings.update(model_family="flux", flux_lora_target="all")
    result, _, _ = train(settings, ("sizes", sizes))
    assert result.steps == 6 and len({tuple(s) for s in sizes.sizes}) >= 2


def test_random_crops_are_drawn_per_image_and_epoch_and_resume_exactly(tiny_chroma, mixed_dir, tmp_path):
    from tuner.core.data.cache import CachedDataset
    from tuner.core.run.trainer import Trainer

    # square buckets only, so the 2:1 and 1:2 images have a remainder to crop at random
    extra = {"aspect_bucket_max_ratio": 1.0, "crop_style": "random", "train_batch_size": 4, "checkpointing_steps": 6}
    encodes = Encodes()
    straight, _, _ = train(
        mixed_settings(tiny_chroma, mixed_dir, tmp_path / "a", max_train_steps=12, **extra), ("n", encodes)
    )
    assert encodes.images == 20 * 3  # 12 batches of 4 over 20 images reach 3 epochs: a crop for each

    from tuner.core.data.buckets import crop_box
    from tuner.core.data.cache import crop_offset
    from tuner.core.data.images import image_size

    host = make_host()
    config = make_config(host, mixed_settings(tiny_chroma, mixed_dir, tmp_path / "a", max_train_steps=12, **extra))
    prepared = Trainer(host, config).prepare_data()
    data = CachedDataset(prepared)
    changed = [not torch.equal(data[i]["latents"], data[i + len(data)]["latents"]) for i in range(len(data))]
    # epoch 2's crop differs exactly where its drawn offset puts the crop box elsewhere: never for the
    # squares (no remainder), for a 2:1 image unless two draws land on the same of its 64 positions
    expected, square = [], []
    for entry in prepared.entries:
        size = image_size(entry.image)
        boxes = [crop_box(*size, entry.bucket, "random", crop_offset(config, entry.image, epoch)) for epoch in (0, 1)]
        expected.append(boxes[0] != boxes[1])
        square.append(size[0] == size[1])
    assert changed == expected and 0 < sum(changed) <= 8
    assert not any(c for c, sq in zip(changed, square, strict=True) if sq)

    settings = mixed_settings(tiny_chroma, mixed_dir, tmp_path / "b", max_train_steps=6, **extra)
    train(settings)
    resumed, _, _ = train({**settings, "max_train_steps": 12, "resume_from_checkpoint": "latest"})
    assert resumed.losses == straight.losses[6:]


def test_an_image_that_fails_to_decode_is_skipped_and_the_buckets_planned_again(tiny_chroma, mixed_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(mixed_dir, data)
    whole = (data / "wide_00_green_circle.png").read_bytes()
    (data / "wide_00_green_circle.png").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    warnings: list[str] = []
    settings = mixed_settings(tiny_chroma, data, tmp_path, max_train_steps=2, checkpointing_steps=0)
    result, _, _ = train(settings, warnings=warnings)
    assert result.steps == 2
    assert any(w.startswith("skipped 1 unreadable image(s): wide_00_green_circle.png") for w in warnings)
