r"""Score a shapes super-resolution stage, alone and in the cascade behind its base stage.

  python -m imagen_jax.evaluation.shapes_sr --workdir runs/shapes_sr --base_workdir runs/shapes [--num 128]
  python -m imagen_jax.evaluation.shapes_sr --workdir runs/shapes_sr \
      --sampler ddpm,dpmpp2m --steps 50,25,15,10         # sampler x steps sweep; the first is the reference

On held-out (test split) scenes:
- **Super-resolution from the truth:** the stage upsamples the exact low-res render of each scene (at
  `--aug_level`, default 0); PSNR against the exact high-res render, beside bicubic upsampling of the same
  low-res image. Colour shift: the sample box-filtered back to the low-res size (a mean-preserving
  filter) against its input, per channel, in 8-bit levels.
- **The cascade from text** (with --base_workdir): the base stage samples the captions, the SR stage
  upsamples those samples; the shapes scorer judges the base images and the final ones, column by column.
Edge sharpness: the sample's luminance gradient at the truth's edges over the truth's (`edge_sharpness`;
PSNR alone would prefer a blurred image). Each (sampler, steps) setting is scored on the same scenes and
ends as one summary row: PSNR, its gain over bicubic, that gain against the first setting's scene by
scene (the scenes' spread cancels), edge sharpness, colour shift and images/s (sampling alone: the
program is compiled before the first timing, once for all settings). Writes
`<workdir>/eval/shapes_sr_eval.json` and PNG grids per setting (input | bicubic | sample | truth; cascade
stages side by side).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from imagen_jax.errors import ConfigError
from imagen_jax.evaluation.shapes_scorer import format_table, score_batch
from imagen_jax.evaluation.sweep import add_sweep_arguments, check_stage_kind, compile_sampler, sweep_settings
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


def _gradient_magnitude(images: np.ndarray) -> np.ndarray:
    """|grad| of the images' luminance (mean of RGB) by forward differences, [N, H-1, W-1]."""
    lum = images.astype(np.float64).mean(axis=-1)
    return np.hypot(lum[:, 1:, :-1] - lum[:, :-1, :-1], lum[:, :-1, 1:] - lum[:, :-1, :-1])


def edge_sharpness(images: np.ndarray, references: np.ndarray, threshold: float = 32.0) -> np.ndarray:
    """Per image: the mean gradient magnitude of `images` at the edges of `references` (pixels where the
    reference's exceeds `threshold` 8-bit levels) over the reference's own there. 1 = edges as steep as
    the truth's; blur lowers it, and so does an edge drawn in the wrong place. Flat areas do not count,
    so grain there cannot raise it. PSNR rewards blur; this does not."""
    sample, truth = _gradient_magnitude(images), _gradient_magnitude(references)
    edges = truth > threshold
    return (sample * edges).sum(axis=(1, 2)) / np.maximum((truth * edges).sum(axis=(1, 2)), 1e-9)


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
    grid_name: str = "sr_from_truth.png",
    compile_first: bool = False,
    **sample_options: Any,
) -> dict[str, Any]:
    """The stage's samples from exact low-res renders of `num_scenes` held-out scenes against the truth.
    Per-scene PSNR gains are kept, so two settings compare scene by scene (`paired_difference`).
    `compile_first`: compile the sampling program before the timed sampling (`compile_sampler`)."""
    pairs = eval_set(
        num_scenes, seed=stage.config.data.seed, split="test", p_two=stage.config.eval.two_object_prob
    )
    captions = [caption for caption, _ in pairs]
    low = np.stack([render(scene, stage.lowres_resolution) for _, scene in pairs])
    truth = np.stack([render(scene, stage.resolution) for _, scene in pairs])
    if compile_first:
        compile_sampler(stage, captions, low, batch_size, aug_level=aug_level, **sample_options)
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
    sharpness = edge_sharpness(samples, truth)
    result = {
        "num_scenes": num_scenes,
        "aug_level": aug_level,
        "psnr_sample_db": _stats(psnr(samples, truth)),
        "psnr_bicubic_db": _stats(psnr(bicubic, truth)),
        "psnr_gain_db": _stats(gain),
        "psnr_gain_db_per_scene": [round(float(v), 4) for v in gain],
        "edge_sharpness": _stats(sharpness),
        "edge_sharpness_bicubic": _stats(edge_sharpness(bicubic, truth)),
        "colour_shift_levels": {
            "mean_abs": _stats(np.abs(shift).mean(axis=1)),
            "per_channel_mean": [float(v) for v in shift.mean(axis=0)],
            "max_abs": float(np.abs(shift).max()),
        },
        "sampling_seconds": seconds,
        "images_per_second": num_scenes / seconds,
    }
    if out_dir:
        count = min(8, num_scenes)
        columns = [low[:count], bicubic[:count], samples[:count], truth[:count]]
        labels = [
            f"{kind}: {c}" for c in captions[:count] for kind in ("input", "bicubic", "sample", "truth")
        ]
        save_grid(side_by_side(columns), labels, os.path.join(out_dir, grid_name), columns=8)
    return result


def paired_difference(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Mean and standard error of `result`'s PSNR gain minus `reference`'s, scene by scene (both from
    `evaluate_super_resolution` on the same scenes): how much a setting moves PSNR, without the spread
    between scenes."""
    a, b = (np.asarray(r["psnr_gain_db_per_scene"], np.float64) for r in (result, reference))
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs the same scenes: {a.shape[0]} against {b.shape[0]}.")
    return _stats(a - b) if len(a) > 1 else {"mean": float((a - b).mean()), "stderr": float("nan")}


@dataclasses.dataclass(frozen=True)
class BaseSamples:
    """The base stage's samples of held-out captions, made once and upsampled by each SR setting."""

    captions: list[str]
    scenes: list[Any]
    images: np.ndarray
    seconds: float


def sample_base(base: Stage, *, num_captions: int, batch_size: int, seed: int) -> BaseSamples:
    """The base stage's samples (at its config's sampling settings) of `num_captions` held-out captions."""
    pairs = eval_set(
        num_captions, seed=base.config.data.seed, split="test", p_two=base.config.eval.two_object_prob
    )
    captions = [caption for caption, _ in pairs]
    t0 = time.perf_counter()
    images = generate(base, captions, rng=jax.random.PRNGKey(seed), batch_size=batch_size)
    return BaseSamples(captions, [scene for _, scene in pairs], images, time.perf_counter() - t0)


def evaluate_cascade(
    base: BaseSamples,
    sr: Stage,
    *,
    batch_size: int,
    seed: int,
    aug_level: float | None = None,
    out_dir: str | None = None,
    grid_name: str = "cascade.png",
    **sr_options: Any,
) -> dict[str, Any]:
    """Shapes scores of the base stage's samples and of the SR stage's upsampling of them (same captions)."""
    t0 = time.perf_counter()
    final = generate(
        sr,
        base.captions,
        rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1),
        lowres=base.images,
        aug_level=aug_level,
        batch_size=batch_size,
        **sr_options,
    )
    sr_seconds = time.perf_counter() - t0
    tables = {"base": score_batch(base.images, base.scenes), "cascade": score_batch(final, base.scenes)}
    if out_dir:
        count = min(16, len(base.captions))
        labels = [f"stage {k + 1}: {c}" for c in base.captions[:count] for k in range(2)]
        save_grid(
            side_by_side([base.images[:count], final[:count]]),
            labels,
            os.path.join(out_dir, grid_name),
            columns=8,
        )
    return {
        **tables,
        "num_captions": len(base.captions),
        "base_seconds": base.seconds,
        "sr_seconds": sr_seconds,
        "sr_images_per_second": len(base.captions) / sr_seconds,
    }


def summary_table(runs: dict[str, dict[str, Any]]) -> str:
    """One Markdown row per SR setting: PSNR, its gain over bicubic, that gain against the first run's
    scene by scene, edge sharpness, colour shift and images/s (and the cascade's two-object score with a
    base stage)."""
    head = ["run", "PSNR (dB)", "gain over bicubic (dB)", "gain minus the first run's (dB, paired)"]
    head += ["edge sharpness (truth 1)", "mean abs colour shift (levels)", "images/s"]
    with_cascade = all("cascade" in run for run in runs.values())
    if with_cascade:
        head += ["cascade: 2-obj all correct", "base: 2-obj all correct"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reference = next(iter(runs.values()))["from_truth"]
    for name, run in runs.items():
        t = run["from_truth"]
        diff = paired_difference(t, reference)
        cells = [
            name,
            f"{t['psnr_sample_db']['mean']:.2f}",
            f"{t['psnr_gain_db']['mean']:+.2f} ± {t['psnr_gain_db']['stderr']:.2f}",
            f"{diff['mean']:+.2f} ± {diff['stderr']:.2f}",
            f"{t['edge_sharpness']['mean']:.3f} (bicubic {t['edge_sharpness_bicubic']['mean']:.3f})",
            f"{t['colour_shift_levels']['mean_abs']['mean']:.2f}",
            f"{t['images_per_second']:.2f}",
        ]
        if with_cascade:
            for stage in ("cascade", "base"):
                two = run["cascade"][stage]["two_objects"]
                cells.append("-" if two["all_correct"] is None else f"{100 * two['all_correct']:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        help="noise-augmentation level of the true low-res inputs (the cascade uses config.sample's)",
    )
    add_sweep_arguments(parser)  # of the SR stage's sampling
    parser.add_argument(
        "--step", type=cli.number(int, minimum=0), help="SR checkpoint step (default: latest)"
    )
    parser.add_argument("--out", default=None, help="JSON path (default: <workdir>/eval/shapes_sr_eval.json)")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    sr = load_stage(args.workdir, step=args.step)
    check_stage_kind(
        sr,
        f"--workdir {args.workdir}",
        super_resolution=True,
        fix=f"Pass the SR stage's workdir as --workdir (this one as --base_workdir), or score this one with "
        f"python -m imagen_jax.evaluation.shapes --workdir {args.workdir}.",
    )
    base_stage = load_stage(args.base_workdir) if args.base_workdir else None
    if base_stage is not None:
        flag = f"--base_workdir {args.base_workdir}"
        check_stage_kind(base_stage, flag, super_resolution=False, fix="Pass the base stage's workdir there.")
        if base_stage.resolution != sr.lowres_resolution:
            raise ConfigError(
                f"{flag} holds {base_stage.kind}, but the SR stage upsamples {sr.lowres_resolution}x"
                f"{sr.lowres_resolution} images: pass a base stage trained at config.data.resolution="
                f"{sr.lowres_resolution}."
            )
    ev = sr.config.eval
    num = args.num or ev.num_captions
    out_dir = os.path.join(args.workdir, "eval")
    base = None
    if base_stage is not None:
        print(f"sampling {num} held-out captions with the base stage...", flush=True)
        base = sample_base(base_stage, num_captions=num, batch_size=ev.batch_size, seed=ev.seed)
    runs: dict[str, dict[str, Any]] = {}
    settings = sweep_settings(args, sr.config.sample)
    for options in settings:
        name = f"{options['sampler']}_{options['num_steps']}_{options['time_grid']}"
        print(f"\n##### SR {name}: from the true renders, {num} scenes", flush=True)
        t = evaluate_super_resolution(
            sr,
            num_scenes=num,
            batch_size=ev.batch_size,
            seed=ev.seed,
            aug_level=args.aug_level,
            out_dir=out_dir,
            grid_name=f"sr_from_truth_{name}.png",
            compile_first=not runs,  # the timings are sampling alone
            **options,
        )
        runs[name] = {"from_truth": t}
        print(
            f"== SR from the true {sr.lowres_resolution}px renders ({num} scenes, "
            f"aug level {args.aug_level:g}, {t['images_per_second']:.2f} images/s) ==\n"
            f"PSNR sample {t['psnr_sample_db']['mean']:.2f} dB, "
            f"bicubic {t['psnr_bicubic_db']['mean']:.2f} dB, "
            f"gain {t['psnr_gain_db']['mean']:+.2f} +- {t['psnr_gain_db']['stderr']:.2f} dB; "
            f"edge sharpness {t['edge_sharpness']['mean']:.3f} (truth 1, bicubic "
            f"{t['edge_sharpness_bicubic']['mean']:.3f})\n"
            f"colour shift (8-bit levels): mean |shift| {t['colour_shift_levels']['mean_abs']['mean']:.2f}, "
            f"per channel {[round(v, 2) for v in t['colour_shift_levels']['per_channel_mean']]}, "
            f"max {t['colour_shift_levels']['max_abs']:.2f}",
            flush=True,
        )
        if base is not None:
            runs[name]["cascade"] = cascade = evaluate_cascade(
                base,
                sr,
                batch_size=ev.batch_size,
                seed=ev.seed,
                out_dir=out_dir,
                grid_name=f"cascade_{name}.png",
                **options,
            )
            for stage in ("base", "cascade"):
                print(f"\n== {stage} ({num} captions) ==\n{format_table(cascade[stage])}", flush=True)
    print("\n" + summary_table(runs))
    out = args.out or os.path.join(out_dir, "shapes_sr_eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        settings_used = {
            "aug_level": args.aug_level,
            "threshold": settings[0]["threshold"],
            "step": sr.step,
        }
        json.dump({"settings": settings_used, "runs": runs}, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    cli.run_argparse(main)
