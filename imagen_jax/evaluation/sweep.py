"""The sampling-sweep flags the evaluation commands share: samplers x step counts, with one time grid and
one thresholding, each defaulting to the stage's `config.sample`."""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import ml_collections

from imagen_jax import cli
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion.guidance import THRESHOLD_KINDS


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
