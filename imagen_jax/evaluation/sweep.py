"""What the evaluation commands share: the sampling sweep's flags (samplers x step counts, with one time grid
and one thresholding, each defaulting to the stage's `config.sample`), the compile before the first
timing, and the check that a workdir holds the kind of stage a command scores."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from imagen_jax import cli
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion.guidance import THRESHOLD_KINDS
from imagen_jax.errors import ConfigError
from imagen_jax.stage.build import Stage
from imagen_jax.stage.sampling import generate


def check_stage_kind(stage: Stage, flag: str, *, super_resolution: bool, fix: str) -> None:
    """Refuses the stage given by `flag` (e.g. "--workdir runs/x") when it is not the kind the command
    scores; `fix` says what to run instead."""
    if bool(stage.lowres_resolution) != super_resolution:
        wanted = "a super-resolution stage" if super_resolution else "a base stage"
        raise ConfigError(f"{flag} holds {stage.kind}; this command needs {wanted} there. {fix}")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """--sampler and --steps (comma lists, swept as their product), --time_grid and --threshold."""
    parser.add_argument(
        "--sampler",
        type=cli.comma_separated(str, choices=samplers.SAMPLERS),
        help="comma-separated samplers (default: config.sample)",
    )
    parser.add_argument(
        "--steps",
        type=cli.comma_separated(int, minimum=1),
        help="comma-separated step counts (default: config.sample)",
    )
    parser.add_argument("--time_grid", choices=samplers.TIME_GRIDS, help="default: config.sample")
    parser.add_argument("--threshold", choices=THRESHOLD_KINDS, help="default: config.sample")


def sweep_settings(args: argparse.Namespace, sample: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The sampling options of each (sampler, steps) pair in the order given, as `generate()` keywords;
    what the flags leave unset comes from `sample` (the stage's `config.sample`)."""
    return [
        {
            "sampler": sampler,
            "num_steps": num_steps,
            "time_grid": args.time_grid or sample.time_grid,
            "threshold": args.threshold or sample.threshold,
        }
        for sampler, num_steps in itertools.product(
            args.sampler or [sample.sampler], args.steps or [int(sample.num_steps)]
        )
    ]


def compile_sampler(
    stage: Stage, prompts: Sequence[str], lowres: np.ndarray | None, batch_size: int, **sample_options: Any
) -> None:
    """Compiles (or loads) the stage's sampling program for batches of `batch_size` with a 1-step call on
    the first batch, so the timings that follow are sampling alone. `generate` pads every batch to
    `batch_size`, and so does this call. The program takes the sampler, the step count, the time grid,
    thresholding and guidance as inputs: one compile serves a whole sweep."""
    options = {k: v for k, v in sample_options.items() if k != "num_steps"}
    generate(
        stage,
        list(prompts[:batch_size]),
        rng=jax.random.PRNGKey(0),
        lowres=None if lowres is None else lowres[:batch_size],
        batch_size=batch_size,
        num_steps=1,
        **options,
    )
