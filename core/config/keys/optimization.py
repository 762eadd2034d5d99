"""Keys of the optimisation: batch, steps, seed, optimizer and its schedule, precision, checkpointing
and compilation; and the readers that turn them into an optimizer's arguments."""

from __future__ import annotations

from typing import Any

from tuner.core.host.records import ConfigKey, in_group

# torch seeds generators with 64-bit integers; validation adds the prompt's index to the seed
SEED_MAX = 2**63 - 1

KEYS = in_group(
    "optimisation",
    (
        ConfigKey("train_batch_size", "int", 1, "Images per step per process.", minimum=1, memory=True, maximum=4096),
        ConfigKey(
            "gradient_accumulation_steps", "int", 1, "Micro-batches per optimizer step.", minimum=1, maximum=4096
        ),
        ConfigKey("max_train_steps", "int", 1000, "Optimizer steps.", minimum=1, maximum=10_000_000),
        ConfigKey("seed", "int", 42, "Seed for data order, noise, sigmas and LoRA init.", minimum=0, maximum=SEED_MAX),
        ConfigKey(
            "learning_rate", "float", 1e-4, "Learning rate (Prodigy: a factor on its own estimate; use 1.0).", minimum=0
        ),
        ConfigKey(
            "optimizer",
            "str",
            "adamw",
            "Optimizer by its registered name: adamw (torch), adamw8bit (bitsandbytes), adafactor (transformers), "
            "prodigy (prodigyopt), or one an installed plugin offers (tuner plugins lists them).",
            resume_critical=True,
            central=True,
            memory=True,
        ),
        ConfigKey(
            "optimizer_config",
            "str",
            None,
            "Extra optimizer arguments, SimpleTuner's form: 'd_coef=2,safeguard_warmup=false' (values read as YAML).",
        ),
        ConfigKey(
            "lr_scheduler",
            "str",
            "constant",
            "Learning-rate schedule (diffusers' get_scheduler): constant, constant_with_warmup, linear, cosine, "
            "cosine_with_restarts (lr_num_cycles), polynomial (lr_power); all warm up over lr_warmup_steps.",
            choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
        ),
        ConfigKey("lr_num_cycles", "int", 1, "Hard restarts of cosine_with_restarts.", minimum=1),
        ConfigKey("lr_power", "float", 1.0, "Power of the polynomial decay (1.0: linear).", minimum=0),
        ConfigKey("lr_warmup_steps", "int", 0, "Linear warm-up steps.", minimum=0, maximum=10_000_000),
        ConfigKey("max_grad_norm", "float", 1.0, "Gradient clipping norm (0 disables).", minimum=0),
        ConfigKey(
            "adam_beta1",
            "float",
            0.9,
            "beta1 of adamw, adamw8bit and prodigy.",
            minimum=0,
            maximum=1,
            maximum_exclusive=True,
        ),
        ConfigKey(
            "adam_beta2",
            "float",
            0.999,
            "beta2 of adamw, adamw8bit and prodigy.",
            minimum=0,
            maximum=1,
            maximum_exclusive=True,
        ),
        ConfigKey(
            "adam_weight_decay", "float", 1e-2, "Decoupled weight decay of adamw, adamw8bit and prodigy.", minimum=0
        ),
        ConfigKey("adam_epsilon", "float", 1e-8, "Epsilon of adamw, adamw8bit and prodigy.", minimum=0),
        ConfigKey(
            "mixed_precision",
            "str",
            "bf16",
            "accelerate precision.",
            choices=("no", "fp16", "bf16"),
            recipe=True,
            group="model",
            memory=True,
        ),
        ConfigKey("gradient_checkpointing", "bool", True, "Recompute block activations in backward.", memory=True),
        ConfigKey(
            "fsdp_enable",
            "bool",
            False,
            "Shard the denoiser's weights, gradients and optimizer state across the run's processes with PyTorch "
            "FSDP2 (launch several processes as for DDP); checkpoints are then sharded too (DCP, safetensors) and "
            "resume in another number of processes with the same global batch.",
            memory=True,
        ),
        ConfigKey(
            "fsdp_reshard_after_forward",
            "bool",
            True,
            "fsdp_enable: free each block's gathered weights after its forward and gather them again in backward "
            "(false: keep them until backward, less communication, more memory).",
            memory=True,
        ),
        ConfigKey(
            "fsdp_cpu_ram_efficient_loading",
            "bool",
            True,
            "fsdp_enable: the processes of a machine load the denoiser in turns, each sharding it before the next "
            "loads (one whole copy in system RAM at a time); false: all at once (a faster start with RAM to spare).",
        ),
        ConfigKey(
            "process_group_timeout",
            "int",
            1800,
            "Seconds a process of a multi-process run waits for the others (a gather, a barrier) before the run "
            "fails instead of hanging.",
            minimum=10,
        ),
        ConfigKey(
            "compile",
            "bool",
            False,
            "Regional compilation: torch.compile each repeated transformer block once (the first step pays the "
            "compile time, printed); same losses, faster steps on a GPU.",
        ),
        ConfigKey(
            "compile_backend",
            "str",
            "inductor",
            "torch.compile backend for compile: true (aot_eager: graph capture and autograd without code generation).",
        ),
        ConfigKey(
            "offload_during_startup",
            "bool",
            False,
            "Out of memory at start: while caches are built, keep the VAE's and text encoders' weights in system "
            "RAM and move them to the accelerator one layer at a time (accelerate's sequential offload); the "
            "denoiser is loaded only after caching.",
            group="model",
            memory=True,
        ),
        ConfigKey(
            "memory_estimate",
            "bool",
            True,
            "Print the memory estimate (tuner estimate) at start; warn when it exceeds the free memory.",
            group="model",
        ),
    ),
)


def adam_settings(config: Any) -> dict[str, Any]:
    """The adam_* keys as the keyword arguments of AdamW-like optimizers."""
    return {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }


def optimizer_options(config: Any) -> dict[str, Any]:
    """``optimizer_config`` (``'d_coef=2,safeguard_warmup=false'``, SimpleTuner's form) as keyword
    arguments; each value is read as YAML (numbers, booleans, strings)."""
    import yaml

    options: dict[str, Any] = {}
    for part in (config.optimizer_config or "").split(","):
        if not part.strip():
            continue
        name, equals, value = part.partition("=")
        if not equals or not name.strip().isidentifier():
            raise config.error("optimizer_config", f"{part.strip()!r} is not name=value; e.g. 'd_coef=2,eps=1e-8'")
        try:
            options[name.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            raise config.error("optimizer_config", f"{part.strip()!r}: cannot read the value") from None
    return options
