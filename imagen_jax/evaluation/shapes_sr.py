r"""Score a shapes super-resolution stage, alone and in the cascade behind its base stage.

  python -m imagen_jax.evaluation.shapes_sr --workdir runs/shapes_sr --base_workdir runs/shapes [--num 128]

On held-out (test split) scenes:
- **Super-resolution from the truth:** the stage upsamples the exact low-res render of each scene (at
  `--aug_level`, default 0); PSNR against the exact high-res render, beside bicubic upsampling of the same
  low-res image. Colour shift: the sample box-filtered back to the low-res size (a mean-preserving
  filter) against its input, per channel, in 8-bit levels.
- **The cascade from text** (with --base_workdir): the base stage samples the captions, the SR stage
  upsamples those samples; the shapes scorer judges the base images and the final ones, column by column.
Writes `<workdir>/eval/shapes_sr_eval.json` and PNG grids (input | bicubic | sample | truth; cascade
stages side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from imagen_jax import cli
from imagen_jax.data.resample import downsample
from imagen_jax.data.shapes import eval_set, render
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion.guidance import THRESHOLD_KINDS
from imagen_jax.evaluation.shapes_scorer import format_table, score_batch
from imagen_jax.stage.build import Stage, load_stage
from imagen_jax.stage.images import save_grid, side_by_side
from imagen_jax.stage.sampling import generate


def psnr(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images against uint8 references (peak 255)."""
    err = (images.astype(np.float64) - references.astype(np.float64)) ** 2
    mse = np.maximum(err.mean(axis=(1, 2, 3)), 1e-10)
    return 10.0 * np.log10(255.0**2 / mse)


def upsample_bicubic(images: np.ndarray, size: int) -> np.ndarray:
    """The classical baseline: PIL's bicubic upsampling of uint8 images to size x size."""
    return np.stack(
        [np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.BICUBIC)) for x in images]
    )


def colour_shift(samples: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """Per-image, per-channel mean of the sample box-filtered to the input's size minus the input's, in
    8-bit levels [N, 3]: what a stage adds to or removes from each colour overall."""
    size = inputs.shape[1]
    back = np.stack([downsample(x, size, "box") for x in samples]).astype(np.float64)
    return back.mean(axis=(1, 2)) - inputs.astype(np.float64).mean(axis=(1, 2))


def _stats(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "stderr": float(values.std(ddof=1) / np.sqrt(len(values)))}


def evaluate_super_resolution(
    stage: Stage,
    *,
    num_scenes: int,
    batch_size: int,
    seed: int,
    aug_level: float = 0.0,
    out_dir: str | None = None,
    **sample_options: Any,
) -> dict[str, Any]:
    """The stage's samples from exact low-res renders of `num_scenes` held-out scenes against the truth."""
    pairs = eval_set(
        num_scenes, seed=stage.config.data.seed, split="test", p_two=stage.config.eval.two_object_prob
    )
    captions = [caption for caption, _ in pairs]
    low = np.stack([render(scene, stage.lowres_resolution) for _, scene in pairs])
    truth = np.stack([render(scene, stage.resolution) for _, scene in pairs])
    t0 = time.perf_counter()
    samples = generate(
        stage,
        captions,
        rng=jax.random.PRNGKey(seed),
        lowres=low,
        aug_level=aug_level,
        batch_size=batch_size,
        **sample_options,
    )
    seconds = time.perf_counter() - t0
    bicubic = upsample_bicubic(low, stage.resolution)
    gain = psnr(samples, truth) - psnr(bicubic, truth)
    shift = colour_shift(samples, low)
    result = {
        "num_scenes": num_scenes,
        "aug_level": aug_level,
        "psnr_sample_db": _stats(psnr(samples, truth)),
        "psnr_bicubic_db": _stats(psnr(bicubic, truth)),
        "psnr_gain_db": _stats(gain),
        "colour_shift_levels": {
            "mean_abs": _stats(np.abs(shift).mean(axis=1)),
            "per_channel_mean": [float(v) for v in shift.mean(axis=0)],
            "max_abs": float(np.abs(shift).max()),
        },
        "sampling_seconds": seconds,
    }
    if out_dir:
        count = min(8, num_scenes)
        columns = [low[:count], bicubic[:count], samples[:count], truth[:count]]
        labels = [
            f"{kind}: {c}" for c in captions[:count] for kind in ("input", "bicubic", "sample", "truth")
        ]
        save_grid(side_by_side(columns), labels, os.path.join(out_dir, "sr_from_truth.png"), columns=8)
    return result


def evaluate_cascade(
    base: Stage,
    sr: Stage,
    *,
    num_captions: int,
    batch_size: int,
    seed: int,
    aug_level: float | None = None,
    out_dir: str | None = None,
    **sr_options: Any,
) -> dict[str, Any]:
    """Shapes scores of the base stage's samples and of the SR stage's upsampling of them (same captions)."""
    p_two = base.config.eval.two_object_prob
    pairs = eval_set(num_captions, seed=base.config.data.seed, split="test", p_two=p_two)
    captions = [caption for caption, _ in pairs]
    scenes = [scene for _, scene in pairs]
    rng = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    low = generate(base, captions, rng=rng, batch_size=batch_size)
    final = generate(
        sr,
        captions,
        rng=jax.random.fold_in(rng, 1),
        lowres=low,
        aug_level=aug_level,
        batch_size=batch_size,
        **sr_options,
    )
    seconds = time.perf_counter() - t0
    tables = {"base": score_batch(low, scenes), "cascade": score_batch(final, scenes)}
    if out_dir:
        count = min(16, num_captions)
        labels = [f"stage {k + 1}: {c}" for c in captions[:count] for k in range(2)]
        save_grid(
            side_by_side([low[:count], final[:count]]),
            labels,
            os.path.join(out_dir, "cascade.png"),
            columns=8,
        )
    return {**tables, "num_captions": num_captions, "sampling_seconds": seconds}


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="the SR stage's training workdir")
    parser.add_argument(
        "--base_workdir", default=None, help="the base stage's workdir: also score the cascade"
    )
    parser.add_argument(
        "--num", type=cli.number(int, minimum=1), help="held-out scenes (default: config.eval)"
    )
    parser.add_argument(
        "--aug_level",
        type=cli.number(float, minimum=0.0, maximum=1.0),
        default=0.0,
        help="SR input augmentation level in [0, 1] (from truth)",
    )
    parser.add_argument(
        "--sampler", choices=samplers.SAMPLERS, help="SR sampler (default: the stage's config)"
    )
    parser.add_argument(
        "--steps", type=cli.number(int, minimum=1), help="SR sampling steps (default: config)"
    )
    parser.add_argument("--threshold", choices=THRESHOLD_KINDS, help="SR thresholding (default: config)")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    options = {"sampler": args.sampler, "num_steps": args.steps, "threshold": args.threshold}
    sr = load_stage(args.workdir)
    ev = sr.config.eval
    num = args.num or ev.num_captions
    out_dir = os.path.join(args.workdir, "eval")
    results: dict[str, Any] = {
        "from_truth": evaluate_super_resolution(
            sr,
            num_scenes=num,
            batch_size=ev.batch_size,
            seed=ev.seed,
            aug_level=args.aug_level,
            out_dir=out_dir,
            **options,
        )
    }
    t = results["from_truth"]
    print(
        f"\n== SR from the true {sr.lowres_resolution}px renders ({num} scenes, "
        f"aug level {args.aug_level:g}) ==\n"
        f"PSNR sample {t['psnr_sample_db']['mean']:.2f} dB, bicubic {t['psnr_bicubic_db']['mean']:.2f} dB, "
        f"gain {t['psnr_gain_db']['mean']:+.2f} +- {t['psnr_gain_db']['stderr']:.2f} dB\n"
        f"colour shift (8-bit levels): mean |shift| {t['colour_shift_levels']['mean_abs']['mean']:.2f}, "
        f"per channel {[round(v, 2) for v in t['colour_shift_levels']['per_channel_mean']]}, "
        f"max {t['colour_shift_levels']['max_abs']:.2f}"
    )
    if args.base_workdir:
        base = load_stage(args.base_workdir)
        results["cascade"] = evaluate_cascade(
            base, sr, num_captions=num, batch_size=ev.batch_size, seed=ev.seed, out_dir=out_dir, **options
        )
        for name in ("base", "cascade"):
            print(f"\n== {name} ({num} captions) ==\n{format_table(results['cascade'][name])}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "shapes_sr_eval.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    cli.run_argparse(main)
