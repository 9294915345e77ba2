"""Multi-process runs (TPU pods, GPU clusters): joining the run, and the few values hosts must share.

JAX's own runtime is the engine: `jax.distributed.initialize` connects the processes, after which every
process sees all devices (`jax.devices()`) and addresses its own (`jax.local_devices()`); jitted programs
over a mesh spanning hosts run collectively. What the training loop still needs from here: each host's
input-iterator position gathered into the checkpoint, and a stop (preemption, time budget) that every
process agrees on at the same step. On one process everything here is a no-op or local.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax.errors import ConfigError

log = logging.getLogger("imagen_jax")


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins this process to a multi-process run. With no arguments JAX reads them from the environment
    (Cloud TPU VMs, SLURM `srun`, Open MPI, Kubernetes); otherwise every process passes the same
    coordinator address (host:port of process 0) and process count, and its own id."""
    # CPU collectives across processes (tests, CPU clusters); accelerators use their own (ICI, NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num_processes={num_processes}: a run has at least 1 process.")
    if process_id is not None and (process_id < 0 or (num_processes and process_id >= num_processes)):
        limit = f" and < --num_processes={num_processes}" if num_processes else ""
        raise ConfigError(f"--process_id={process_id} must be >= 0{limit}: processes are numbered from 0.")
    try:
        jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    except (RuntimeError, ValueError) as err:
        explicit = ", ".join(f"{k}={v}" for k, v in given.items() if v is not None) or "none"
        reason = str(err).splitlines()[0].rstrip(".")
        raise ConfigError(
            f"could not join the multi-process run (given: {explicit}): {reason}. On a "
            "Cloud TPU VM or under SLURM srun no values are needed; elsewhere give every process the same "
            "--coordinator_address=host:port and --num_processes, and each its own --process_id."
        ) from err
    log.info(
        "process %d of %d: %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def is_primary() -> bool:
    """Whether this process writes what exists once per run (metrics, sample grids, caches)."""
    return jax.process_index() == 0


def gather_strings(value: str) -> list[str]:
    """Every process's `value`, in process order, on every process (a collective: all must call)."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(value.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(len(data)))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: len(data)] = data
    rows = multihost_utils.process_allgather(padded)
    return [bytes(row[:n]).decode() for row, n in zip(rows, lengths, strict=True)]


def encode_iterator_states(state: bytes) -> bytes:
    """One record of every process's input-iterator position (`state` is this process's), so that a
    resumed multi-host run continues each host's stream exactly. A collective: all processes call it."""
    return json.dumps({"processes": gather_strings(state.decode())}).encode()


def this_process_iterator_state(record: bytes) -> bytes:
    """This process's position from `encode_iterator_states`' record; the process count must match."""
    states = json.loads(record.decode())["processes"]
    if len(states) != jax.process_count():
        raise ConfigError(
            f"the checkpoint holds the input positions of {len(states)} processes but this run has "
            f"{jax.process_count()}: each process reads its own share of the data, so the example stream "
            f"continues exactly only with {len(states)} processes. Resume with that many, or train on in a "
            "new --workdir (e.g. initialised from this checkpoint's weights)."
        )
    return states[jax.process_index()].encode()


class StopVote:
    """A stop that all processes take at the same step: after the same steps each process votes (a signal,
    its own time budget) and all learn whether any voted to stop, so all stop at the same step and save
    the same checkpoint. The vote waits for the step before it to finish (one collective program in
    flight at a time: XLA:CPU deadlocks on several), hence `every` steps rather than every step."""

    def __init__(self, mesh: Mesh, every: int):
        self.every = every
        self._votes = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._local = len(mesh.local_devices)

    def any_stops(self, step: int, stop: bool, step_outputs: Any) -> bool:
        """Whether any process votes to stop after `step` (only on every `every`-th step; else False);
        `step_outputs` are that step's results, waited for first."""
        if step % self.every:
            return False
        jax.block_until_ready(step_outputs)
        local = np.full((self._local,), int(stop), np.int32)
        return bool(self._any(jax.make_array_from_process_local_data(self._votes, local)))
