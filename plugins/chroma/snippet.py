"""The diffusers code that reproduces Chroma validation images outside tuner.

It encodes with the pipeline and passes the masks as booleans: called with prompt strings,
ChromaPipeline builds a float mask that attention adds as a bias, which is not what tuner trained
or previewed with.
"""

from __future__ import annotations

TEMPLATE = """import torch
from diffusers import {pipeline}{imports}

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
pipe = {pipeline}.from_pretrained({base!r}, torch_dtype=dtype).to(device)
pipe.load_lora_weights({lora!r})
pipe.scheduler = pipe.scheduler.from_config({scheduler!r})

def encode(text):
    embeds, _, mask, _, _, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False,
                                                  max_sequence_length={tokens})
    mask = mask.bool()  # boolean: ChromaPipeline's own float mask does not mask padding{zero}
    return embeds, mask

negative, negative_mask = encode({negative!r})
for seed, prompt in zip({seeds!r}, {prompts!r}):
    embeds, mask = encode(prompt)
    image = pipe(
        prompt_embeds=embeds, prompt_attention_mask=mask,
        negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask,
        guidance_scale={guidance!r}, num_inference_steps={steps}, height={height}, width={width},{start}
        generator=torch.Generator("cpu").manual_seed(seed),
        joint_attention_kwargs={{"scale": {scale!r}}},
    ).images[0]
    image.save(f"sample_{{seed}}.png")
"""


def render(recipe: dict) -> str:
    zero = (
        "\n    embeds = embeds * mask[..., None]  # flux_t5_padding: zero"
        if recipe["settings"].get("flux_t5_padding") == "zero"
        else ""
    )
    init = recipe["settings"].get("validation_init_image")
    start = (
        f'\n        image=load_image({init!r}).convert("RGB"), '
        f"strength={recipe['settings']['validation_init_strength']!r},"
        if init
        else ""
    )
    return TEMPLATE.format(
        pipeline="ChromaImg2ImgPipeline" if init else "ChromaPipeline",
        imports="\nfrom diffusers.utils import load_image" if init else "",
        start=start,
        base=recipe["base_model"],
        lora=recipe["lora_file"],
        scheduler=recipe["scheduler"],
        tokens=recipe["settings"]["tokenizer_max_length"],
        zero=zero,
        negative=recipe["negative_prompt"],
        seeds=recipe["seeds"],
        prompts=recipe["prompts"],
        guidance=recipe["guidance"],
        steps=recipe["steps"],
        height=recipe["height"],
        width=recipe["width"],
        scale=recipe["lora_scale"],
    )
