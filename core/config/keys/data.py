"""Keys of the training data: the folder (or several datasets), captions, buckets, crops and the
caches."""

from __future__ import annotations

from tuner.core.host.records import ConfigKey, in_group


def _colour_problem(value: str) -> str | None:
    from PIL import ImageColor

    try:
        ImageColor.getrgb(value)
    except ValueError:
        return f"{value!r} is not a colour; use a name (white, black, gray) or #RRGGBB"
    return None


KEYS = in_group(
    "data",
    (
        ConfigKey(
            "data_dir",
            "path",
            None,
            "Folder of images with same-stem .txt captions.",
            aliases=("instance_data_dir",),
            image_folder=True,
        ),
        ConfigKey(
            "datasets",
            "mappings",
            None,
            "Several datasets instead of data_dir: a list of entries with data_dir and any of id, weight, kind "
            "(training or regularisation), resolution, resolution_type, repeats, caption_strategy, instance_prompt, "
            "caption_extensions, caption_prefix, "
            "caption_dropout_probability, crop_style, aspect_bucket_max_ratio, aspect_bucket_alignment, "
            "minimum_image_size.",
        ),
        ConfigKey(
            "caption_strategy",
            "str",
            "textfile",
            "textfile: same-stem caption files (caption_extensions); filename: the image's name is its "
            "caption; instanceprompt: instance_prompt for every image.",
            choices=("textfile", "filename", "instanceprompt"),
        ),
        ConfigKey("instance_prompt", "str", None, "The caption of every image with caption_strategy instanceprompt."),
        ConfigKey(
            "caption_extensions",
            "str_list",
            [".txt", ".caption"],
            "Caption files beside an image, by extension; where several exist the first listed wins.",
        ),
        ConfigKey(
            "regularisation_target",
            "str",
            "noise",
            "What a regularisation dataset (kind: regularisation) trains towards: noise (noise - latents, as "
            "any image) or base_model (the base model's own prediction, the adapter off, no gradient: the LoRA "
            "learns to leave those prompts alone; one more forward per such step).",
            choices=("noise", "base_model"),
        ),
        ConfigKey(
            "mask_dir",
            "path",
            None,
            "Loss masks from this folder, paired by name with the images (same relative path and stem; "
            "SimpleTuner's conditioning_type: mask datasets), instead of <name>.mask.png beside each image.",
        ),
        ConfigKey(
            "conditioning_data_dir",
            "path",
            None,
            "Edit pairs (families that support edits): the reference image of each training image, paired by "
            "name (same relative path and stem) from this folder; the training image is the edit's target. "
            "Images without a reference are skipped, counted.",
            needs="edit",
        ),
        ConfigKey(
            "masked_loss_floor",
            "float",
            0.0,
            "With loss masks (<name>.mask.png beside an image): the least weight a latent pixel keeps, so black "
            "areas still train a little (0: not at all).",
            minimum=0,
            maximum=1,
        ),
        ConfigKey(
            "caption_metadata",
            "path",
            None,
            "Captions from one file instead of files beside the images: a JSON object of image path (relative "
            "to data_dir, or the file name) -> caption or list of captions, or a metadata.jsonl of "
            '{"file_name", "caption" or "text"} lines; images it does not list keep their caption files.',
        ),
        ConfigKey(
            "caption_lines",
            "str",
            "each",
            "A caption file of several lines: each line is a caption of its own (one is drawn per sample, "
            "from the seed) or they are joined into one.",
            choices=("each", "join"),
        ),
        ConfigKey(
            "caption_prefix",
            "str",
            None,
            "Put before every caption (a trigger word); caption dropout drops it with the caption unless "
            "caption_dropout_keeps_prefix.",
        ),
        ConfigKey(
            "caption_dropout_keeps_prefix",
            "bool",
            False,
            "A dropped caption trains with caption_prefix alone instead of the empty caption: the trigger word "
            "stays on every sample.",
        ),
        ConfigKey(
            "dataset_repeats",
            "int",
            0,
            "Extra passes over each image per epoch (SimpleTuner's repeats).",
            minimum=0,
            maximum=10_000,
        ),
        ConfigKey(
            "caption_dropout_probability",
            "float",
            0.0,
            "Train this share of samples with the empty caption (drawn per sample from the seed and the step), "
            "so the LoRA also works without its trigger words and with classifier-free guidance.",
            minimum=0,
            maximum=1,
        ),
        ConfigKey(
            "cache_dir",
            "path",
            None,
            "Latent and text caches (default: $XDG_CACHE_HOME/tuner).",
            recipe=True,
            workspace_default="cache",
        ),
        ConfigKey(
            "resolution",
            "int",
            512,
            "Training size in pixels: the side of the square bucket (resolution_type area: every bucket holds about "
            "resolution^2 pixels) or the shorter side (pixel).",
            minimum=16,
            multiple_of=16,
            recipe=True,
            memory=True,
            maximum=8192,
        ),
        ConfigKey(
            "resolution_type",
            "str",
            "area",
            "area: buckets of about resolution^2 pixels at each aspect ratio; pixel: the shorter side is resolution.",
            choices=("area", "pixel"),
        ),
        ConfigKey(
            "aspect_bucket_alignment",
            "int",
            64,
            "Bucket sides are multiples of this (SimpleTuner's default 64); a multiple of the family's latent "
            "alignment (16 for Chroma and Flux: the VAE's 8 times 2x2 patches).",
            minimum=8,
        ),
        ConfigKey(
            "aspect_bucket_max_ratio",
            "float",
            3.0,
            "Widest (and tallest) bucket, as long side / short side; wider images are cropped there, never "
            "stretched. 1.0: square only.",
            minimum=1.0,
        ),
        ConfigKey(
            "crop_style",
            "str",
            "center",
            "Where an image is cropped after it is resized to cover its bucket: center, or random (drawn per image "
            "and epoch from the seed; a crop is cached for each epoch the run reaches).",
            choices=("center", "random"),
        ),
        ConfigKey(
            "image_background",
            "str",
            "white",
            "Colour transparent images are composited on before encoding (a name or #RRGGBB), as other trainers "
            "do; the run says which images had transparency.",
            check=lambda value: _colour_problem(value),
        ),
        ConfigKey(
            "minimum_image_size",
            "int",
            0,
            "Skip images smaller than this (sqrt(width x height) with resolution_type area, the shorter side with "
            "pixel), with a warning and a count.",
            minimum=0,
            maximum=65536,
        ),
        ConfigKey("dataloader_num_workers", "int", 0, "Worker processes reading cached items.", minimum=0, maximum=256),
    ),
)
