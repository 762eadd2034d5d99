"""The core's config keys, one module per concern (model, data, adapter, optimization, methods,
validation, saving), each with the constants and small readers of its keys. Pure data: no torch.

Families and other plugins add their own keys through ``register_config_keys``; the core's own
plugin (:mod:`tuner.core.builtin.defaults`) registers these.
"""

from __future__ import annotations

from tuner.core.config.keys import adapter, data, methods, model, optimization, saving, validation

# in the order `tuner keys` lists them: what is trained, from what data, the adapter, how, with which
# methods, what the run shows, what it writes
CORE_KEYS = (
    *model.KEYS,
    *data.KEYS,
    *adapter.KEYS,
    *optimization.KEYS,
    *methods.KEYS,
    *validation.KEYS,
    *saving.KEYS,
)

# the central settings `tuner configure` asks for, in its order (families mark theirs with ask=True)
ASKED = (
    "model_flavour",
    "data_dir",
    "output_dir",
    "resolution",
    "network_rank",
    "learning_rate",
    "train_batch_size",
    "max_train_steps",
    "mixed_precision",
    "base_model_precision",
    "validation_prompts",
)
