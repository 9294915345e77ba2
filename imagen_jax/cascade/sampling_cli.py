"""What `sample.py` does, as a library function: prompts in, a PNG grid and its prompt list out."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import jax

from imagen_jax.cascade import stage as stage_lib
from imagen_jax.cascade.images import save_grid


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file (one per line; blank lines are skipped)."""
    out = list(prompts)
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"--prompts_file {prompts_file!r} does not exist.")
        with open(prompts_file, encoding="utf-8") as f:
            out += [line.rstrip("\n") for line in f if line.strip()]
    if not out:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE.")
    return out


def sample_to_grid(
    workdir: str,
    *,
    prompts: Sequence[str],
    prompts_file: str | None,
    num: int,
    out: str,
    seed: int = 0,
    step: int | None = None,
    **sample_options: object,
) -> tuple[str, str]:
    """Samples `num` images per prompt from the stage in `workdir`; one grid row per prompt."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}.")
    prompt_list = read_prompts(prompts, prompts_file)
    stage = stage_lib.load_stage(workdir, step=step)
    repeated = [p for p in prompt_list for _ in range(num)]
    t0 = time.perf_counter()
    images = stage_lib.generate(stage, repeated, rng=jax.random.PRNGKey(seed), **sample_options)
    seconds = time.perf_counter() - t0
    print(
        f"sampled {len(images)} images in {seconds:.1f} s ({len(images) / seconds:.2f} images/s, "
        "including compilation)"
    )
    return save_grid(images, repeated, out, columns=num, upscale=2)
