"""What `sample.py` does, as a library function: prompts in, a PNG grid and its prompt list out."""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Mapping, Sequence

import jax

from imagen_jax.cascade import stage as stage_lib
from imagen_jax.cascade.images import save_grid
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion.guidance import THRESHOLD_KINDS
from imagen_jax.errors import DataError, InputFileNotFoundError, UsageError


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file (one per line, UTF-8; blank lines are skipped)."""
    out = list(prompts)
    if prompts_file:
        if not os.path.isfile(prompts_file):
            what = "is not a file" if os.path.exists(prompts_file) else "does not exist"
            raise InputFileNotFoundError(f"--prompts_file {prompts_file!r} {what}.")
        with open(prompts_file, "rb") as f:
            raw = f.read().removeprefix(codecs.BOM_UTF8)  # editors on Windows write one
        # Decoded line by line so that a bad byte is reported with its line, not as a bare offset.
        for number, line in enumerate(raw.splitlines(), 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"--prompts_file {prompts_file!r} line {number} is not UTF-8 (byte 0x{line[e.start]:02x} "
                    f"at column {e.start + 1}); save the file as UTF-8."
                ) from None
            if text.strip():
                out.append(text)
    if not out:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE.")
    return out


def check_sample_options(options: Mapping[str, object]) -> None:
    """Refuses unknown sampler/threshold names and step counts < 1 before the checkpoint is loaded."""
    for key, flag, allowed in (
        ("sampler", "--sampler", samplers.SAMPLERS),
        ("threshold", "--threshold", THRESHOLD_KINDS),
    ):
        value = options.get(key)
        if value is not None and value not in allowed:
            raise UsageError(f"{flag}={value!r} is not one of {list(allowed)}.")
    steps = options.get("num_steps")
    if isinstance(steps, int) and steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}.")


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
        raise UsageError(f"--num must be >= 1, got {num}.")
    check_sample_options(sample_options)
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
