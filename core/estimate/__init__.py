"""Peak memory of a run, estimated before any weight is loaded (``tuner estimate``; ``tuner run``
prints it first).

Not a formula: the family's models are built from their config files on the meta device and run
through what a run runs (the family's hooks, peft's LoRA, tuner's checkpointing, the optimizer,
the same loss function as training) on fake tensors (torch's ``FakeTensorMode``: shapes and
dtypes, no storage), while :class:`LiveBytes` counts the bytes of every tensor alive at each
moment. A quantized base is counted at its precision plugin's stored size
(``PrecisionInfo.weight_bytes``), plus one layer dequantized for its matmul.

What the count cannot see is added as stated allowances (``ALLOWANCES``: the caching allocator's
fragmentation and the CUDA context; assumptions, not measurements) or measured: system RAM starts
from the resident size of the process that estimates, which is the one that trains under
``tuner run``.

* :mod:`.models`: config files, models on meta, fake tensors;
* :mod:`.live`: counting live bytes;
* :mod:`.trace`: the phases run on fake tensors, assembled per base precision;
* :mod:`.report`: phases, the estimate's table and summary, shortfall warnings.
"""

from tuner.core.estimate.live import LiveBytes
from tuner.core.estimate.report import (
    ALLOWANCES,
    Estimate,
    GiB,
    MiB,
    Phase,
    available_ram,
    free_memory,
    process_rss,
    shortfalls,
    size,
)
from tuner.core.estimate.trace import estimate, estimate_precisions

__all__ = [
    "ALLOWANCES",
    "Estimate",
    "GiB",
    "LiveBytes",
    "MiB",
    "Phase",
    "available_ram",
    "estimate",
    "estimate_precisions",
    "free_memory",
    "process_rss",
    "shortfalls",
    "size",
]
