"""The real Chroma's shapes on a GPU: load time, step time, peak memory per phase against `tuner
estimate`, tuner's step against a bare diffusers + peft step, and model FLOPs utilisation.

    python benchmarks/gpu.py [--precisions no_change int8-quanto nf4-bnb] [--steps 5] [--resolution 1024]
    python benchmarks/gpu.py --small     # the same code on the CPU with a narrow model (CI runs it)
    python benchmarks/gpu.py --tiers     # the memory tiers: block swap, activation offload, fp8, NF4 + swap

The denoiser is built from the real config (``examples/models/chroma1-configs``, 8.9B parameters)
with random weights directly on the GPU in bf16 and saved once to ``--folder``; the text encoder is
a T5 of the real width (4096) with two layers; the VAE has the real config; the data is a few
images at ``--resolution``. Each precision runs tuner's own Trainer (rank 16, gradient
checkpointing, bf16) phase by phase: caching, model load, steps. Prints one JSON object per
precision and a Markdown table.

``--tiers`` runs the same Trainer once per memory tier (bf16; swapping a quarter, half, three
quarters of the blocks; activation offload; fp8; int8; NF4; NF4 with half the blocks swapped) and
prints each tier's step time against bf16's, its peak and the estimate's. ``--group-offload-check``
first runs diffusers' group offloading under a training backward on a small model (the question
of ``tuner.core.model.swap``'s docstring, answered on a GPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "examples" / "models" / "chroma1-configs"
# dense bf16 peak of the GPUs this is likely to meet, FLOP/s
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
_ATTENTION = None  # --attention: the kernel restriction, held for the whole process
SMALL = dict(attention_head_dim=16, num_attention_heads=2, num_layers=1, num_single_layers=2, joint_attention_dim=64)


def build(
    folder: Path, device: str, small: bool, resolution: int, depth: tuple[int, int] | None = None
) -> tuple[Path, Path]:
    """The model folder (once) and a few images."""
    from diffusers import AutoencoderKL, ChromaTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from tuner.plugins.chroma.tiny import build_tiny_chroma
    from tuner.testing import shapes_dataset

    model, data = folder / "model", folder / f"data-{resolution}"
    if not (model / "transformer" / "config.json").exists():
        build_tiny_chroma(model, seed=0)  # tokenizer, scheduler and the folder layout
        config = {
            k: v for k, v in json.loads((REAL / "transformer" / "config.json").read_text()).items() if k[0] != "_"
        }
        t5 = json.loads((REAL / "text_encoder" / "config.json").read_text())
        t5 = {k: v for k, v in t5.items() if k[0] != "_"}
        if depth:  # the real widths with fewer blocks: a quick check of the real shapes
            config.update(num_layers=depth[0], num_single_layers=depth[1])
        if small:
            config.update(SMALL, axes_dims_rope=[4, 6, 6], approximator_hidden_dim=64)
            t5.update(d_model=64, d_ff=128, num_heads=2, d_kv=32)
        t5.update(num_layers=2, num_decoder_layers=2)
        t5["vocab_size"] = T5EncoderModel.from_pretrained(model / "text_encoder").config.vocab_size
        torch.manual_seed(0)
        for part in (
            ("transformer", "text_encoder") if small else ("transformer", "text_encoder", "vae")
        ):  # rebuilt below
            for stale in (model / part).glob("*.safetensors"):
                stale.unlink()
        with torch.device(device):
            ChromaTransformer2DModel.from_config(config).to(torch.bfloat16).save_pretrained(model / "transformer")
            T5EncoderModel(T5Config(**t5)).to(torch.bfloat16).save_pretrained(model / "text_encoder")
            if not small:
                vae = json.loads((REAL / "vae" / "config.json").read_text())
                AutoencoderKL.from_config({k: v for k, v in vae.items() if k[0] != "_"}).save_pretrained(model / "vae")
    if not data.exists():
        shapes_dataset(data, size=resolution)
    return model, data


def measure(
    model: Path,
    data: Path,
    folder: Path,
    precision: str,
    device: str,
    steps: int,
    resolution: int,
    checkpointing: bool = True,
    bare_first: bool = False,
    extra: dict | None = None,
    predicted: object = None,
    bare: bool = True,
) -> dict:
    from tuner.core.config.build import build_config
    from tuner.core.data.cache import CachedDataset
    from tuner.core.estimate import estimate
    from tuner.core.host.manager import PluginHost
    from tuner.core.run.trainer import Trainer

    cuda = device == "cuda"

    def peak_reset() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak() -> int | None:
        return torch.cuda.max_memory_allocated() if cuda else None

    host = PluginHost("chroma")
    settings = {
        "pretrained_model_name_or_path": str(model),
        "data_dir": str(data),
        "cache_dir": str(folder / "cache"),
        "output_dir": str(folder / f"out-{precision}"),
        "existing_output": "overwrite",
        "resolution": resolution,
        "tokenizer_max_length": 512 if cuda else 16,
        "network_rank": 16,
        "mixed_precision": "bf16",
        "base_model_precision": precision,
        "gradient_checkpointing": checkpointing,
        "memory_estimate": False,
        "max_train_steps": steps + 1,
        **(extra or {}),
    }
    config = build_config(host, settings, "benchmark", warn=lambda m: None)
    row: dict = {"precision": precision, "device": torch.cuda.get_device_name() if cuda else "cpu", **(extra or {})}
    predicted = predicted or estimate(host, config, device)
    row["estimate_bytes"] = {p.name: p.device if cuda else p.ram for p in predicted.phases}
    trainer = Trainer(host, config, warn=lambda m: None)
    peak_reset()
    prepared = trainer.prepare_data()
    row["peak_bytes"] = {"caching": peak()}
    peak_reset()
    began = time.perf_counter()
    state = trainer.setup()
    row["load_s"] = round(time.perf_counter() - began, 2)
    row["peak_bytes"]["load"] = peak()
    if trainer.swap is not None:
        row["pinned"] = trainer.swap.pinned
    if cuda:
        torch.cuda.synchronize()
        row["resident_bytes"] = torch.cuda.memory_allocated()  # the model as it waits for its first step
    if bare_first:  # the same step by hand first: is a fault tuner's or the stack's?
        print(json.dumps({"bare_step_s": bare_step(model, trainer, state, prepared, device, 1)}), flush=True)
    batches = trainer.batches(CachedDataset(prepared), state.position)
    trainer.optimizer_step(state, batches)  # warm-up (kernels, allocator)
    peak_reset()
    forward_peaks: list[int] = []  # the peak as each forward ends: forward against backward
    if cuda:
        state.model.register_forward_hook(lambda *_: forward_peaks.append(torch.cuda.max_memory_allocated()))
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        trainer.optimizer_step(state, batches)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    row["step_s"] = round(sorted(times)[len(times) // 2], 4)
    row["peak_bytes"]["train"] = peak()
    row["peak_bytes"]["forward"] = max(forward_peaks, default=None)
    row["params"] = sum(p.numel() for p in state.model.parameters())
    flops = forward_flops(trainer, state, prepared)
    row["train_flop_per_step"] = 3 * flops  # forward + backward (2x); recomputation not counted
    peak_flops = next((v for k, v in PEAKS.items() if k in row["device"]), None)
    row["mfu"] = round(3 * flops / row["step_s"] / peak_flops, 4) if peak_flops else None
    if precision == "no_change" and bare:
        row["bare_step_s"] = bare_step(model, trainer, state, prepared, device, steps)
        row["tuner_over_bare"] = round(row["step_s"] / row["bare_step_s"], 3)
    del trainer, state
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def tiers(
    model: Path, data: Path, folder: Path, device: str, steps: int, resolution: int, only: list[str] | None = None
) -> list[dict]:
    """One row per memory tier; every estimate from one trace per distinct step (estimate_precisions)."""
    from tuner.core.config.build import build_config
    from tuner.core.estimate.trace import estimate, estimate_precisions
    from tuner.core.host.manager import PluginHost
    from tuner.core.model.swap import repeated_blocks

    host = PluginHost("chroma")
    with torch.device("meta"):
        from diffusers import ChromaTransformer2DModel

        blocks = len(repeated_blocks(ChromaTransformer2DModel.from_config(
            ChromaTransformer2DModel.load_config(model / "transformer"))))  # fmt: skip
    quarter, half, three = blocks // 4, blocks // 2, 3 * blocks // 4
    rows_wanted = [  # the most telling first: a run stopped by its time limit has printed those
        ("no_change", {}),
        ("no_change", {"blocks_to_swap": half}),
        ("nf4-bnb", {"blocks_to_swap": half}),
        ("no_change", {"activation_offload": True}),
        ("no_change", {"blocks_to_swap": quarter}),
        ("no_change", {"blocks_to_swap": three}),
        ("fp8-quanto", {}),
        ("int8-quanto", {}),
        ("nf4-bnb", {}),
    ]
    if only:  # PRECISION[:BLOCKS_TO_SWAP] each
        rows_wanted = [
            (p, {"blocks_to_swap": int(n)} if n else {}) for p, _, n in (item.partition(":") for item in only)
        ]
    settings = {
        "pretrained_model_name_or_path": str(model),
        "data_dir": str(data),
        "cache_dir": str(folder / "cache"),
        "output_dir": str(folder / "out-estimate"),
        "resolution": resolution,
        "tokenizer_max_length": 512 if device == "cuda" else 16,
        "network_rank": 16,
        "mixed_precision": "bf16",
    }
    config = build_config(host, settings, "benchmark", warn=lambda m: None)
    began = time.perf_counter()
    precisions = sorted({p for p, _ in rows_wanted})
    counts = sorted({0, quarter, half, three, *(extra.get("blocks_to_swap", 0) for _, extra in rows_wanted)})
    found = estimate_precisions(host, config, precisions, device, swap_counts=counts)
    offloaded = (
        estimate(host, config.derive({"activation_offload": True}), device)
        if any(extra.get("activation_offload") for _, extra in rows_wanted)
        else None
    )
    print(json.dumps({"estimates_s": round(time.perf_counter() - began, 1)}), flush=True)

    def predicted(precision: str, extra: dict):
        if extra.get("activation_offload"):
            return offloaded
        count = extra.get("blocks_to_swap", 0)
        return next(e for e in found if e.precision == precision and e.settings["blocks_to_swap"] == count)

    rows = []
    for precision, extra in rows_wanted:
        try:
            row = measure(
                model, data, folder, precision, device, steps, resolution,
                extra=extra, predicted=predicted(precision, extra), bare=False,
            )  # fmt: skip
        except Exception as exc:  # a tier that fails says so; the others still run
            row = {"precision": precision, **extra, "error": f"{type(exc).__name__}: {exc}"[:400]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = next((r["step_s"] for r in rows if "step_s" in r and r["precision"] == "no_change"), None)
    print(
        "\n| tier | step | vs bf16 | peak train (GiB) | estimate train (GiB) | peak forward | resident before "
        "the step | peak load (GiB) | pinned |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tier = r["precision"] + "".join(
            f", {k} {v}" for k, v in r.items() if k in ("blocks_to_swap", "activation_offload")
        )
        if "error" in r:
            print(f"| {tier} | failed: {r['error'][:120]} | | | | | | | |")
            continue
        ratio = f"{r['step_s'] / base:.2f}" if base else "-"
        print(
            f"| {tier} | {r['step_s']} s | {ratio} | "
            f"{gib(r['peak_bytes']['train'])} | {gib(r['estimate_bytes'].get('train'))} | "
            f"{gib(r['peak_bytes']['forward'])} | {gib(r.get('resident_bytes'))} | {gib(r['peak_bytes']['load'])} | "
            f"{r.get('pinned', '-')} |"
        )
    return rows


def group_offload_check(device: str) -> dict:
    """diffusers' group offloading (block level, one block per group) on a small Chroma under a
    training backward, with and without checkpointing: do the LoRA gradients match the plain model's?"""
    from diffusers import ChromaTransformer2DModel
    from peft import LoraConfig

    config = {
        **SMALL,
        "axes_dims_rope": [4, 6, 6],
        "approximator_hidden_dim": 64,
        "num_layers": 2,
        "num_single_layers": 2,
    }
    result = {}
    for checkpointing in (False, True):
        grads = []
        for offloaded in (False, True):
            torch.manual_seed(0)
            model = ChromaTransformer2DModel.from_config(config).requires_grad_(False)
            model.add_adapter(LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"]))
            if checkpointing:
                model.enable_gradient_checkpointing()
            if offloaded:
                model.enable_group_offload(torch.device(device), offload_type="block_level", num_blocks_per_group=1)
            else:
                model.to(device)
            torch.manual_seed(1)
            latents = torch.randn(1, 16, 64, device=device)
            text = torch.randn(1, 8, SMALL["joint_attention_dim"], device=device)
            img_ids = torch.zeros(16, 3, device=device)
            txt_ids = torch.zeros(8, 3, device=device)
            try:
                out = model(
                    hidden_states=latents, encoder_hidden_states=text, timestep=torch.full((1,), 0.5, device=device),
                    img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
                )[0]  # fmt: skip
                out.square().mean().backward()
                grads.append([p.grad.detach().cpu() for p in model.parameters() if p.requires_grad])
            except Exception as exc:
                grads.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        plain, offloaded = grads
        if isinstance(offloaded, str) or isinstance(plain, str):
            result[f"checkpointing={checkpointing}"] = {"plain": str(plain)[:200], "offloaded": offloaded}
        else:
            diff = max((a - b).abs().max().item() for a, b in zip(plain, offloaded, strict=True))
            result[f"checkpointing={checkpointing}"] = {"max_grad_difference": diff}
    return result


def _batch(trainer, prepared, device) -> tuple:
    from tuner.core.data.cache import CachedDataset, collate

    batch = collate([CachedDataset(prepared)[0]])
    return batch["latents"].to(device), {k: v.to(device) for k, v in batch["text"].items()}


def forward_flops(trainer, state, prepared) -> int:
    """FLOPs of one forward of the denoiser on one batch, counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    latents, text = _batch(trainer, prepared, trainer.ctx.device)
    sigmas = torch.full((latents.shape[0],), 0.5, device=latents.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter, trainer.ctx.autocast():
        trainer.ctx.host.provide(
            "predict_flow",
            transformer=state.model,
            noisy_latents=latents,
            sigmas=sigmas,
            text=text,
            config=trainer.config,
            generator=torch.Generator().manual_seed(0),
        )
    return counter.get_total_flops()


def bare_step(model_dir: Path, trainer, state, prepared, device: str, steps: int) -> float:
    """The same step by hand: diffusers model + peft adapter + AdamW, bf16, the family's prediction."""
    from diffusers import ChromaTransformer2DModel
    from peft import LoraConfig

    model = ChromaTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=torch.bfloat16)
    model.to(device).requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=state.targets))
    model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    latents, text = _batch(trainer, prepared, device)
    times = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        sigmas = torch.rand(latents.shape[0], device=device)
        noise = torch.randn_like(latents)
        s = sigmas.view(-1, 1, 1, 1)
        with torch.autocast(device, dtype=torch.bfloat16):
            prediction = trainer.ctx.host.provide(
                "predict_flow",
                transformer=model,
                noisy_latents=(1 - s) * latents + s * noise,
                sigmas=sigmas,
                text=text,
                config=trainer.config,
                generator=torch.Generator().manual_seed(0),
            )
        loss = (prediction.float() - (noise - latents)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return round(sorted(times[1:])[len(times[1:]) // 2], 4)


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a narrow model on the CPU (what CI runs)")
    parser.add_argument("--precisions", nargs="+", default=["no_change", "int8-quanto", "nf4-bnb"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=None, help="default: 1024 (64 with --small)")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/tuner-gpu-benchmark"))
    parser.add_argument("--depth", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), help="fewer blocks (real widths)")
    parser.add_argument("--bare-first", action="store_true", help="run the bare diffusers + peft step first")
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient_checkpointing: false")
    parser.add_argument("--tiers", action="store_true", help="the memory tiers instead of --precisions")
    parser.add_argument("--only", nargs="+", metavar="PRECISION[:SWAP]", help="with --tiers: these tiers alone")
    parser.add_argument("--group-offload-check", action="store_true", help="diffusers' group offloading in backward")
    parser.add_argument(
        "--attention", choices=("default", "math", "efficient", "flash"), default="default",
        help="restrict scaled-dot-product attention to one kernel",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.attention != "default":
        backends = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION"}
        from torch.nn.attention import SDPBackend, sdpa_kernel

        global _ATTENTION  # kept: a collected context manager restores the previous kernels
        _ATTENTION = sdpa_kernel(getattr(SDPBackend, backends[args.attention]))
        _ATTENTION.__enter__()
    device = "cpu" if args.small else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --small on a CPU")
    resolution = args.resolution or (64 if args.small else 1024)
    folder = args.folder / ("small" if args.small else "real") / ("-".join(map(str, args.depth)) if args.depth else "")
    if args.group_offload_check:
        print(json.dumps({"group_offload_check": group_offload_check(device)}), flush=True)
    model, data = build(folder, device, args.small, resolution, args.depth)
    if args.tiers:
        return tiers(model, data, folder, device, args.steps, resolution, args.only)
    rows = []
    for precision in args.precisions:
        row = measure(
            model, data, folder, precision, device, args.steps, resolution, not args.no_checkpointing, args.bare_first
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(
        "\n| precision | load | step | tuner / bare | peak load (GiB) | peak train (GiB) | estimate train (GiB) | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['precision']} | {r['load_s']} s | {r['step_s']} s | {r.get('tuner_over_bare', '-')} | "
            f"{gib(r['peak_bytes']['load'])} | {gib(r['peak_bytes']['train'])} | {gib(r['estimate_bytes'].get('train'))} | "
            f"{r['mfu'] if r['mfu'] is not None else '-'} |"
        )
    return rows


if __name__ == "__main__":
    main()
