"""Latent packing, position ids and text masks of the Flux lineage (the layout diffusers' pipelines use)."""

from __future__ import annotations

import torch

from tuner.core.api import flow

pack = flow.pack_patches  # [B, C, h, w] -> [B, (h/2)(w/2), 4C]: the core's 2x2 packing
unpack = flow.unpack_patches


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[(h/2)(w/2), 3] rows of (0, row, col) for the packed image tokens."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


def text_ids(tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(tokens, 3, device=device, dtype=dtype)


def keep_first_pad(tokenizer_mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the real tokens plus the first padding token (what Chroma attends to)."""
    lengths = tokenizer_mask.long().sum(dim=1, keepdim=True)
    positions = torch.arange(tokenizer_mask.shape[1], device=tokenizer_mask.device)[None, :]
    return positions <= lengths


def joint_mask(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """[text mask | all-true image tokens], boolean, in the order of ``cat(txt_ids, img_ids)``."""
    ones = torch.ones(text_mask.shape[0], image_tokens, dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask.bool(), ones], dim=1)


def conditioning(text: dict[str, torch.Tensor], t5_padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached T5 embeddings and their boolean mask; ``t5_padding == "zero"`` zeroes masked tokens."""
    embeds, mask = text["prompt_embeds"], text["attention_mask"].bool()
    if t5_padding == "zero":
        embeds = embeds * mask[..., None].to(embeds.dtype)
    return embeds, mask


def pipeline_text_inputs(text: dict[str, torch.Tensor], t5_padding: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Precomputed ``prompt_embeds`` + boolean ``prompt_attention_mask`` for a diffusers pipeline.

    Passing a boolean mask keeps the pipeline from building its float 0/1 mask, which attention
    would add as a bias instead of masking (see tuner.core.fixes).
    """
    embeds, mask = conditioning(text, t5_padding)
    return {f"{prefix}prompt_embeds": embeds, f"{prefix}prompt_attention_mask": mask}
