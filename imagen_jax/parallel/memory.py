"""Device memory: XLA's static plan of a compiled program against what each device's allocator allows.

A program whose plan exceeds the allocator's limit is certain to fail at its first call with XLA's
RESOURCE_EXHAUSTED deep inside the call; `check_fits` says so right after compiling instead, with the
sizes and the config knobs that fix it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from imagen_jax.errors import UserError

GIB = 1024**3


class DeviceMemoryError(UserError, ValueError):
    """A compiled program cannot fit in device memory with this config."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one compiled SPMD program, from `compiled.memory_analysis()`."""

    arguments: int  # inputs: for a train step the state and the batch
    outputs: int
    temporaries: int  # activations, gradients, workspace
    aliased: int  # outputs written into donated inputs, counted once

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased


def memory_plan(compiled: Any) -> MemoryPlan | None:
    """XLA's memory plan of a compiled program, or None where the backend gives none."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without memory analysis raise various errors
        return None
    if mem is None:
        return None
    return MemoryPlan(
        arguments=int(mem.argument_size_in_bytes),
        outputs=int(mem.output_size_in_bytes),
        temporaries=int(mem.temp_size_in_bytes),
        aliased=int(mem.alias_size_in_bytes),
    )


def memory_stats(device: jax.Device) -> dict[str, int] | None:
    """The device allocator's statistics (bytes_limit, peak_bytes_in_use, ...), or None (CPU)."""
    try:
        return device.memory_stats() or None
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None


def device_memory_limit() -> int | None:
    """The smallest allocator limit (bytes) over this host's devices, or None where they report none
    (CPU)."""
    limits = []
    for device in jax.local_devices():
        stats = memory_stats(device)
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def check_fits(compiled: Any, *, what: str, fixes: str) -> None:
    """Raises a clear error when `compiled` needs more memory per device than the allocator allows.
    `what` names the program ("the train step at batch 64") and `fixes` says what to change."""
    plan, limit = memory_plan(compiled), device_memory_limit()
    if plan is None or limit is None or plan.total <= limit:
        return
    device = jax.local_devices()[0]
    raise DeviceMemoryError(
        f"{what} needs {plan.total / GIB:.1f} GiB per device by XLA's plan (inputs "
        f"{plan.arguments / GIB:.1f}, temporaries {plan.temporaries / GIB:.1f}, outputs "
        f"{plan.outputs / GIB:.1f}, donated {plan.aliased / GIB:.1f}), more than the "
        f"{limit / GIB:.1f} GiB the allocator allows on each {device.device_kind}. {fixes} On GPU the "
        "limit is XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the card; raising it may also help."
    )
