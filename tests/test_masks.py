"""Masked loss: <name>.mask.png beside an image weighs its latent pixels (white trains, black is
ignored), through the same turn, scale and crop as the image, cached with its latents."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tuner.core.data.images import caption_rule, scan_dataset
from tuner.core.model import flow

from .conftest import base_settings, make_config, make_host, train


def half_mask(path, size=(128, 128), left=0, right=255):
    image = Image.new("L", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    image.save(path)


def dataset(folder, shapes_dir, count=4):
    folder.mkdir()
    names = sorted(p.stem for p in shapes_dir.glob("*.png"))[:count]
    for name in names:
        for suffix in (".png", ".txt"):
            (folder / f"{name}{suffix}").write_bytes((shapes_dir / f"{name}{suffix}").read_bytes())
    return folder, names


def scanned(folder):
    warnings: list[str] = []
    config = make_config(make_host(), {"data_dir": str(folder)})
    return scan_dataset(folder, warnings.append, caption_rule(config)), warnings


def test_masks_pair_by_name_are_counted_and_never_trained_on(shapes_dir, tmp_path):
    folder, names = dataset(tmp_path / "d", shapes_dir)
    half_mask(folder / f"{names[0]}.mask.png")
    Image.new("L", (128, 128), 255).save(folder / f"{names[1]}.mask.png")  # all white: no change
    Image.new("L", (128, 128), 0).save(folder / f"{names[2]}.mask.png")  # all black: nothing to train
    (folder / f"{names[3]}.mask.png").write_bytes(b"not a png")
    items, warnings = scanned(folder)
    assert [i.image.stem for i in items] == names[:2]  # no .mask file is an image; black and unreadable left out
    assert items[0].mask.name == f"{names[0]}.mask.png" and items[1].mask is None
    said = " | ".join(warnings)
    assert "1 of 4 image(s)" in said and "1 all-white mask(s) change nothing" in said
    assert f"black everywhere (nothing to train): {names[2]}.png" in said
    assert f"cannot be read: {names[3]}.mask.png" in said


def test_the_mask_follows_its_images_turn_scale_and_crop_onto_the_latent_grid(shapes_dir, tmp_path):
    """An EXIF-rotated image with its upright mask, and a mask of the wrong size (resized, said):
    the cached weights are the share of white in each latent pixel of the cropped bucket."""
    folder = tmp_path / "d"
    folder.mkdir()
    source = Image.open(shapes_dir / "00_red_circle.png").convert("RGB").resize((64, 128))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x128, shown rotated: 128 wide, 64 high
    source.save(folder / "turned.png", exif=exif)
    (folder / "turned.txt").write_text("a red circle")
    half_mask(folder / "turned.mask.png", size=(128, 64))  # painted on the upright image
    Image.open(shapes_dir / "01_green_circle.png").save(folder / "small.png")
    half_mask(folder / "small.mask.png", size=(32, 32))  # another size than its 128 px image
    config = make_config(make_host(), {"data_dir": str(folder), "resolution": 64})
    from tuner.core.data.cache import Bucket, latent_key
    from tuner.core.data.images import load_mask

    notes: list[str] = []
    bucket = Bucket(width=96, height=48)
    turned = load_mask(folder / "turned.mask.png", folder / "turned.png", bucket, "center", 0.5, notes)
    assert turned.shape == (1, 48, 96) and turned[0, :, :40].max() == 0 and turned[0, :, 56:].min() == 1
    small = load_mask(
        folder / "small.mask.png", folder / "small.png", Bucket(width=64, height=64), "center", 0.5, notes
    )
    assert small[0, :, :28].max() == 0 and small[0, :, 36:].min() == 1
    assert notes == ["small.mask.png (32x32, image 128x128)"]
    assert latent_key(config, folder / "small.png", bucket) != latent_key(
        config, folder / "small.png", bucket, 0, folder / "small.mask.png"
    )


def test_masked_loss_weighs_pixels_and_a_black_region_gets_no_gradient():
    g = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 16, 4, 4, generator=g, requires_grad=True)
    target = torch.randn(2, 16, 4, 4, generator=g)
    weights = torch.ones(2, 1, 4, 4)
    weights[:, :, :, :2] = 0  # left half ignored
    loss = flow.masked_flow_loss(prediction, target, weights)
    loss.backward()
    assert prediction.grad[..., :2].abs().max() == 0 and prediction.grad[..., 2:].abs().min() > 0
    per_pixel = (prediction - target).pow(2).mean(1)
    torch.testing.assert_close(loss, per_pixel[..., 2:].mean())
    floored = flow.masked_flow_loss(prediction, target, weights, floor=0.5)
    expected = ((per_pixel[..., :2] * 0.5).sum((1, 2)) + per_pixel[..., 2:].sum((1, 2))) / (0.5 * 8 + 8)
    torch.testing.assert_close(floored, expected.mean())
    ones = flow.masked_flow_loss(prediction, target, torch.ones(2, 1, 4, 4))
    torch.testing.assert_close(ones, flow.flow_loss(prediction, target))


def test_an_all_white_mask_trains_bit_identically_to_none_and_a_real_one_changes_training(
    tiny_chroma, shapes_dir, tmp_path
):
    plain, names = dataset(tmp_path / "plain", shapes_dir)
    white, _ = dataset(tmp_path / "white", shapes_dir)
    half, _ = dataset(tmp_path / "half", shapes_dir)
    for name in names:
        Image.new("L", (128, 128), 255).save(white / f"{name}.mask.png")
        half_mask(half / f"{name}.mask.png")
    runs = {}
    for label, folder in (("plain", plain), ("white", white), ("half", half)):
        settings = {**base_settings(tiny_chroma, folder, tmp_path / label), "max_train_steps": 3, "train_batch_size": 2}
        result, _, _ = train(settings)
        runs[label] = (result.losses, load_file(tmp_path / label / "out" / "pytorch_lora_weights.safetensors"))
    assert runs["white"][0] == runs["plain"][0]
    assert all(torch.equal(runs["white"][1][k], runs["plain"][1][k]) for k in runs["plain"][1])
    assert runs["half"][0] != runs["plain"][0]  # the masks reached the loss
    cached = [load_file(p) for p in (tmp_path / "half" / "cache").rglob("*.safetensors") if "latents" in str(p)]
    masked = [c["mask"] for c in cached if "mask" in c]
    # 128 px masks scaled to 64 px (one blurred column at the edge), then averaged over 8x8 latent pixels
    assert len(masked) == 4 and all(
        m.shape == (1, 8, 8) and m[0, :, :3].max() == 0 and m[0, :, 5:].min() == 1 for m in masked
    )


@pytest.mark.parametrize("floor", [0.0, 0.25])
def test_masked_loss_floor_is_a_checked_key(tiny_chroma, shapes_dir, tmp_path, floor):
    config = make_config(make_host(), {**base_settings(tiny_chroma, shapes_dir, tmp_path), "masked_loss_floor": floor})
    assert config.masked_loss_floor == floor


def test_masks_from_a_folder_paired_by_name_and_from_simpletuners_mask_datasets(tiny_chroma, shapes_dir, tmp_path):
    import json

    from tuner.core.config import simpletuner
    from tuner.core.host.manager import PluginHost

    folder, names = dataset(tmp_path / "d", shapes_dir)
    masks = tmp_path / "masks"
    masks.mkdir()
    half_mask(masks / f"{names[0]}.png")  # named like its image, as SimpleTuner's mask datasets are
    half_mask(masks / f"{names[1]}.mask.png")
    config = make_config(make_host(), {"data_dir": str(folder), "mask_dir": str(masks)})
    items = scan_dataset(folder, lambda m: None, caption_rule(config), config.mask_dir)
    assert [i.mask.name if i.mask else None for i in items] == [f"{names[0]}.png", f"{names[1]}.mask.png", None, None]
    backends = [
        {"id": "photos", "type": "local", "instance_data_dir": str(folder), "caption_strategy": "textfile",
         "conditioning_data": "photo-masks"},
        {"id": "photo-masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": str(masks)},
    ]  # fmt: skip
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    (tmp_path / "config.json").write_text(
        json.dumps({"model_family": "chroma", "pretrained_model_name_or_path": str(tiny_chroma),
                    "data_backend_config": str(tmp_path / "multidatabackend.json"), "output_dir": str(tmp_path / "o")})
    )  # fmt: skip
    settings, _ = simpletuner.load(tmp_path / "config.json", PluginHost("chroma"))
    assert settings["mask_dir"] == str(masks) and settings["data_dir"] == str(folder)
