"""Step sizes of the blocked scorers (X-Pool, T-MASS, DRL) per device.

On CPU a step's temporaries should stay near cache size (the measured choices are the scorers' `*_BYTES`
constants; docs/results/perf.md). On an accelerator the opposite holds: every step is a handful of kernel
launches, so the fewest, largest steps the memory budget allows are fastest.
"""

from __future__ import annotations

import torch


def step_bytes(device: torch.device, cpu_step: int, max_bytes: int, requested: int | None = None) -> int:
    """Bytes of one scorer step: `requested` when the caller set one, else `cpu_step` (capped by `max_bytes`) on
    CPU and the whole `max_bytes` elsewhere."""
    if requested is not None:
        return requested
    return min(cpu_step, max_bytes) if device.type == "cpu" else max_bytes
