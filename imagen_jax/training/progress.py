"""Progress reporting (steps/s, images/s, ETA) and TensorBoard-readable metrics.

The clock excludes the first step after (re)start, which is mostly compilation, and anything the loop
wraps in `paused()` (checkpoints, sample grids), so throughput and ETA describe training alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping

import jax
from tensorboardX import SummaryWriter

from imagen_jax.parallel import distributed

log = logging.getLogger("imagen_jax")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class Progress:
    """Measures training throughput between `update` calls and formats a one-line report."""

    def __init__(self, *, total_steps: int, batch_size: int, first_step: int):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._mark_step = first_step
        self._mark_time: float | None = None
        self._paused = 0.0
        self.train_seconds = 0.0

    def start(self, step: int) -> None:
        """Starts the clock at `step` (call after the first, compiling, step has finished)."""
        self._mark_step, self._mark_time, self._paused = step, time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0

    def update(self, step: int) -> dict[str, float]:
        """Throughput since the last update; resets the window."""
        if self._mark_time is None:
            self.start(step)
            return {}
        now = time.perf_counter()
        elapsed = max(now - self._mark_time - self._paused, 1e-9)
        steps = step - self._mark_step
        self.train_seconds += elapsed
        self._mark_step, self._mark_time, self._paused = step, now, 0.0
        if steps <= 0:
            return {}
        steps_per_sec = steps / elapsed
        return {
            "steps_per_sec": steps_per_sec,
            "images_per_sec": steps_per_sec * self.batch_size,
            "images_per_sec_per_device": steps_per_sec * self.batch_size / jax.device_count(),
            "eta_seconds": (self.total_steps - step) / steps_per_sec,
        }

    def line(self, step: int, metrics: Mapping[str, float], rates: Mapping[str, float]) -> str:
        parts = [f"step {step}/{self.total_steps} [{100.0 * step / max(self.total_steps, 1):.0f}%]"]
        parts += [f"{k} {v:.4g}" for k, v in metrics.items()]
        if rates:
            parts += [
                f"{rates['steps_per_sec']:.2f} steps/s",
                f"{rates['images_per_sec']:.1f} img/s",
                f"ETA {_fmt_duration(rates['eta_seconds'])}",
            ]
        return ", ".join(parts)


class MetricWriter:
    """Scalars and text to TensorBoard event files; on processes other than 0 every method does nothing.

    `logdir` may be local or a `gs://` URL: tensorboardX writes `gs://` itself (its GCSRecordWriter, which
    needs the `google-cloud-storage` package and the machine's credentials). It keeps the whole event file
    in memory and uploads it again at every flush (each `scalars` call), so the cost grows with the run's
    length; `s3://` works likewise with boto3. Other schemes are not supported by tensorboardX.
    """

    def __init__(self, logdir: str | os.PathLike):
        self._writer = SummaryWriter(os.fspath(logdir)) if distributed.is_primary() else None

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            self._writer.add_scalar(key, float(value), step)
        self._writer.flush()

    def text(self, step: int, tag: str, value: str) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
