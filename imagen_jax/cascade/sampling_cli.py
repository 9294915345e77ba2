"""What `sample.py` does, as a library function: prompts in, PNG grids (one per cascade stage) and their
prompt lists out."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import jax

from imagen_jax.cascade.pipeline import Cascade
from imagen_jax.data.prompts import read_prompt_file
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion.guidance import THRESHOLD_KINDS
from imagen_jax.errors import UsageError
from imagen_jax.stage.images import image_format_of, save_grid, side_by_side


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file (`data.prompts.read_prompt_file`: .txt one per line,
    blank lines skipped; .csv with a `prompt` column, e.g. DrawBench; .json list)."""
    out = list(prompts)
    if prompts_file:
        out += read_prompt_file(prompts_file, keep_blank=False)
    if not out:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE.")
    return out


def check_sample_options(options: Mapping[str, object]) -> None:
    """Refuses unknown sampler/threshold names, step counts < 1 and eta or augmentation levels outside
    [0, 1] before the checkpoint is loaded."""
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
    for key, flag in (("eta", "--eta"), ("aug_level", "--sr_aug_level")):
        value = options.get(key)
        if value is not None and not 0.0 <= float(value) <= 1.0:
            raise UsageError(f"{flag} must be in [0, 1], got {value}.")


_PROMPTS_PER_ROW = 8  # with --num 1


def _beside(out: str, suffix: str) -> str:
    stem, ext = os.path.splitext(out)
    return f"{stem}.{suffix}{ext or '.png'}"


def sample_to_grid(
    workdir: str,
    *,
    prompts: Sequence[str],
    prompts_file: str | None,
    num: int,
    out: str,
    seed: int = 0,
    step: int | None = None,
    sr_workdirs: Sequence[str] = (),
    sr_options: Sequence[Mapping[str, object]] = (),
    share_text: bool = True,
    **sample_options: object,
) -> tuple[str, str]:
    """Samples `num` images per prompt from the stage in `workdir`, then through the super-resolution
    stages in `sr_workdirs` (each with its `sr_options`); one grid row per prompt (eight prompts a row
    when `num` is 1). With SR stages, each stage's grid is also written (`<out>.stage<k>_<res>px.png`)
    and a side-by-side comparison."""
    if num < 1:
        raise UsageError(f"--num must be >= 1, got {num}.")
    image_format_of(out)  # an --out PIL cannot write fails now, not after sampling
    check_sample_options(sample_options)
    for options in sr_options:
        check_sample_options(options)
    if len(sr_options) not in (0, len(sr_workdirs)):
        raise UsageError(f"{len(sr_options)} sets of SR sampling options for {len(sr_workdirs)} SR stages.")
    prompt_list = read_prompts(prompts, prompts_file)
    cascade = Cascade.load(
        [workdir, *sr_workdirs], steps=[step] + [None] * len(sr_workdirs), share_text=share_text
    )
    repeated = [p for p in prompt_list for _ in range(num)]
    t0 = time.perf_counter()
    outputs = cascade.sample(
        repeated,
        rng=jax.random.PRNGKey(seed),
        options=[sample_options, *(sr_options or [{}] * len(sr_workdirs))],
    )
    seconds = time.perf_counter() - t0
    print(
        f"sampled {len(repeated)} images through {len(outputs)} stage(s) in {seconds:.1f} s "
        f"({len(repeated) / seconds:.2f} images/s, including compilation)"
    )
    final = outputs[-1]
    upscale = max(1, 64 // final.shape[1])  # small demo images are hard to see at 1:1
    # A row per prompt; one image per prompt (a DrawBench sheet) would make a one-column strip instead.
    columns = num if num > 1 else min(len(prompt_list), _PROMPTS_PER_ROW)
    if len(outputs) > 1:
        for index, images in enumerate(outputs):
            path = _beside(out, f"stage{index + 1}_{images.shape[1]}px")
            zoom = max(1, final.shape[1] // images.shape[1])
            save_grid(images, repeated, path, columns=columns, upscale=zoom)
            print(f"wrote {path}")
        path = _beside(out, "stages")
        labels = [f"stage {k + 1}: {p}" for p in repeated for k in range(len(outputs))]
        pairs = len(outputs) * min(columns, 4)
        save_grid(side_by_side(outputs), labels, path, columns=pairs, upscale=upscale)
        print(f"wrote {path}")
    return save_grid(final, repeated, out, columns=columns, upscale=upscale)
