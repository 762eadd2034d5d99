"""tuner's training step against a bare PyTorch + peft loop on the same mid-size Chroma.

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py [--steps 30] [--warmup 5]

Both loops train the same LoRA (same targets, rank, optimizer) on the same cached latents and
text, fp32 on the CPU, in one process, alternating bare / tuner / bare so drift in machine speed
shows up. Prints seconds per step and the ratio tuner / bare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

MID_SIZE = dict(
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=64,
    num_attention_heads=8,
    axes_dims_rope=(8, 28, 28),
    approximator_hidden_dim=256,
    approximator_layers=2,
)


def build(tmp: Path) -> tuple[Path, Path]:
    from tuner.plugins.chroma.tiny import build_tiny_chroma
    from tuner.testing import shapes_dataset

    data = shapes_dataset(tmp / "data")
    return build_tiny_chroma(tmp / "model", seed=0, **MID_SIZE), data


def tuner_seconds_per_step(settings: dict, steps: int, warmup: int) -> tuple[float, object]:
    from tuner.core.config.build import build_config
    from tuner.core.host.manager import PluginHost
    from tuner.core.run.trainer import Trainer

    host = PluginHost("chroma")
    config = build_config(host, {**settings, "max_train_steps": warmup + steps}, "benchmark", warn=lambda m: None)
    trainer = Trainer(host, config, warn=lambda m: None)
    trainer.train()
    rows = [json.loads(line) for line in (Path(settings["output_dir"]) / "train_log.jsonl").read_text().splitlines()]
    return (rows[-1]["elapsed_s"] - rows[warmup - 1]["elapsed_s"]) / steps, trainer


def bare_seconds_per_step(model_dir: Path, trainer, settings: dict, steps: int, warmup: int) -> float:
    """What a hand-written loop does: diffusers model + peft adapter + AdamW, data already in memory."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel
    from peft import LoraConfig

    from tuner.core.data.cache import CachedDataset, collate

    torch.manual_seed(0)
    model = ChromaTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=settings["network_rank"], lora_alpha=settings["network_rank"], target_modules=trainer.targets)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    data = CachedDataset(trainer.prepare_data())
    batch = collate([data[i] for i in range(settings["train_batch_size"])])
    latents, embeds = batch["latents"], batch["text"]["prompt_embeds"]
    mask = batch["text"]["attention_mask"]
    b, c, h, w = latents.shape
    img_ids = ChromaPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)  # noqa: SLF001 - diffusers has no public helper for the ids
    txt_ids = torch.zeros(embeds.shape[1], 3)
    joint = torch.cat([mask, torch.ones(b, (h // 2) * (w // 2), dtype=torch.bool)], 1)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        sigmas = torch.sigmoid(torch.randn(b, generator=generator))
        noise = torch.randn(latents.shape, generator=generator)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        out = model(
            hidden_states=packed,
            encoder_hidden_states=embeds,
            timestep=sigmas,
            img_ids=img_ids,
            txt_ids=txt_ids,
            attention_mask=joint,
            return_dict=False,
        )[0]
        pred = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        loss = (pred.float() - (noise - latents)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[warmup:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tuner-bench-"))
    model_dir, data = build(tmp)
    settings = {
        "pretrained_model_name_or_path": str(model_dir),
        "data_dir": str(data),
        "cache_dir": str(tmp / "cache"),
        "resolution": args.resolution,
        "tokenizer_max_length": 32,
        "network_rank": 16,
        "train_batch_size": 2,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "learning_rate": 1e-4,
        "seed": 0,
        "max_grad_norm": 1.0,
        "lr_scheduler": "constant",
    }
    bare, tuned = [], []
    trainer = None
    for round_ in range(2):
        settings["output_dir"] = str(tmp / f"out{round_}")
        seconds, trainer = tuner_seconds_per_step(settings, args.steps, args.warmup)
        tuned.append(seconds)
        bare.append(bare_seconds_per_step(model_dir, trainer, settings, args.steps, args.warmup))
    size = sum(p.numel() for p in trainer.model.parameters())
    bare_s, tuner_s = statistics.mean(bare), statistics.mean(tuned)
    print(
        f"model: Chroma {size / 1e6:.1f}M parameters, {len(trainer.targets)} LoRA modules, rank 16, "
        f"batch 2 at {args.resolution}px, fp32 CPU, torch threads {torch.get_num_threads()}"
    )
    print(f"bare PyTorch + peft: {bare_s * 1000:.1f} ms/step  (rounds: {', '.join(f'{b * 1000:.1f}' for b in bare)})")
    print(f"tuner:               {tuner_s * 1000:.1f} ms/step  (rounds: {', '.join(f'{t * 1000:.1f}' for t in tuned)})")
    print(f"ratio tuner / bare:  {tuner_s / bare_s:.3f}")


if __name__ == "__main__":
    main()
