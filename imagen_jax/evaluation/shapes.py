r"""Score a shapes-trained stage: sample held-out captions, check them with the classical scorer.

  python -m imagen_jax.evaluation.shapes --workdir runs/shapes [--guidance 0,3] [--num 512]
  python -m imagen_jax.evaluation.shapes --workdir runs/shapes --guidance 1.5 \
      --sampler ddpm,dpmpp2m_sde --steps 10,15,25,50,100          # sampler x steps sweep
  python -m imagen_jax.evaluation.shapes --workdir runs/shapes --wordings heldout

The same held-out scenes are captioned in each wording of `config.eval.wordings` (default: the training
grammar, "standard", and framings training never uses, "heldout"; `imagen_jax.data.shapes`), so the two
tables differ only in how the prompt is phrased. Prints one table per (wording, guidance weight) and
writes `<workdir>/eval/shapes_eval.json` plus a PNG grid of the first samples of each. Ends with one
summary row per (sampler, steps, wording, guidance): one-object colour/size/shape, then the two-object
binding columns (every attribute of both objects right; the relation where both are found), each with
its standard error, and images/s, so quality and speed are read side by side.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence

import jax
import ml_collections

from imagen_jax import cli
from imagen_jax.data.shapes import WORDINGS, eval_set
from imagen_jax.evaluation.shapes_scorer import format_table, score_batch
from imagen_jax.evaluation.sweep import add_sweep_arguments, check_stage_kind, compile_sampler, sweep_settings
from imagen_jax.stage.build import Stage, load_stage
from imagen_jax.stage.images import save_grid
from imagen_jax.stage.sampling import generate


def evaluate_shapes(
    stage: Stage,
    *,
    guidance_weights: Sequence[float],
    num_captions: int,
    batch_size: int,
    seed: int,
    out_dir: str | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
    time_grid: str | None = None,
    threshold: str | None = None,
    wording: str = "standard",
    compile_first: bool = False,
) -> dict[str, dict]:
    """Scores `num_captions` held-out (test split) scenes, captioned in `wording`, at each guidance weight
    (sampling settings default to `config.sample`). `compile_first`: compile the sampling program before
    the timed sampling (`compile_sampler`), so images/s is sampling alone."""
    # The test mix is the eval config's, not the training mix: reweighting training data must not move
    # the test set.
    p_two = stage.config.eval.two_object_prob
    pairs = eval_set(num_captions, seed=stage.config.data.seed, split="test", p_two=p_two, wording=wording)
    captions = [caption for caption, _ in pairs]
    scenes = [scene for _, scene in pairs]
    options = dict(sampler=sampler, time_grid=time_grid, threshold=threshold)
    if compile_first:
        compile_sampler(stage, captions, None, batch_size, guidance=float(guidance_weights[0]), **options)
    results = {}
    for weight in guidance_weights:
        t0 = time.perf_counter()
        images = generate(
            stage,
            captions,
            rng=jax.random.PRNGKey(seed),
            guidance=float(weight),
            batch_size=batch_size,
            num_steps=num_steps,
            **options,
        )
        seconds = time.perf_counter() - t0
        table = score_batch(images, scenes)
        results[f"guidance_{weight:g}"] = {
            **table,
            "sampling_seconds": seconds,
            "images_per_second": len(captions) / seconds,
        }
        print(f"\n== {wording} captions, guidance {weight:g} ({num_captions} scenes, {seconds:.0f} s) ==")
        print(format_table(table))
        if out_dir:
            save_grid(
                images[:32],
                captions[:32],
                os.path.join(out_dir, f"samples_{sampler}_{num_steps}_{wording}_guidance_{weight:g}.png"),
                columns=8,
                upscale=2,
            )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="training workdir with checkpoints/")
    parser.add_argument(
        "--guidance", type=cli.comma_separated(float), help="comma-separated weights (default: config.eval)"
    )
    parser.add_argument(
        "--num", type=cli.number(int, minimum=1), help="held-out captions (default: config.eval)"
    )
    add_sweep_arguments(parser)
    parser.add_argument(
        "--wordings",
        type=cli.comma_separated(str, choices=WORDINGS),
        help=f"comma-separated caption sets of {WORDINGS} (default: config.eval)",
    )
    parser.add_argument("--step", type=cli.number(int, minimum=0), help="checkpoint step (default: latest)")
    parser.add_argument("--out", default=None, help="JSON path (default: <workdir>/eval/shapes_eval.json)")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    stage = load_stage(args.workdir, step=args.step)
    check_stage_kind(
        stage,
        f"--workdir {args.workdir}",
        super_resolution=False,
        fix=f"Score it with python -m imagen_jax.evaluation.shapes_sr --workdir {args.workdir} "
        "--base_workdir BASE_WORKDIR.",
    )
    ev: ml_collections.ConfigDict = stage.config.eval
    weights = args.guidance or list(ev.guidance_weights)
    if not args.guidance and stage.config.sample.guidance not in weights:
        weights.append(float(stage.config.sample.guidance))
    wordings = args.wordings or list(ev.get("wordings", WORDINGS))
    out_dir = os.path.join(args.workdir, "eval")
    results = {}
    settings = sweep_settings(args, stage.config.sample)
    for options, wording in itertools.product(settings, wordings):
        sampler, num_steps = options["sampler"], options["num_steps"]
        print(f"\n##### {sampler}, {num_steps} steps, {wording} captions", flush=True)
        results[f"{sampler}_{num_steps}_{wording}"] = evaluate_shapes(
            stage,
            guidance_weights=weights,
            num_captions=args.num or ev.num_captions,
            batch_size=ev.batch_size,
            seed=ev.seed,
            out_dir=out_dir,
            wording=wording,
            compile_first=not results,  # one program serves every setting and guidance weight
            **options,
        )
    print("\n" + summary_table(results))
    out = args.out or os.path.join(out_dir, "shapes_eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "settings": {
                    "time_grid": settings[0]["time_grid"],
                    "threshold": settings[0]["threshold"],
                    "step": stage.step,
                },
                "runs": results,
            },
            f,
            indent=2,
        )
    print(f"\nwrote {out}")


# (group, column, the count it is a fraction of): one-object attributes, then binding on two-object
# scenes, the headline there (every attribute of both objects right; the relation where both are found).
SUMMARY_COLUMNS = (
    ("one_object", "colour", "count"),
    ("one_object", "size", "count"),
    ("one_object", "shape", "count"),
    ("two_objects", "all_correct", "count"),
    ("two_objects", "relation", "relation_count"),
    ("two_objects", "found", "count"),
    ("two_objects", "order_swapped", "relation_count"),
)


def summary_table(results: dict[str, dict[str, dict]]) -> str:
    """One Markdown row per (run, guidance): the headline columns in percent with their binomial standard
    errors, and images/s."""
    head = ["run", "guidance"] + [f"{g.split('_')[0]}-obj {k}" for g, k, _ in SUMMARY_COLUMNS] + ["images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, by_weight in results.items():
        for weight, table in by_weight.items():
            cells = [run, weight.removeprefix("guidance_")]
            for group, key, count in SUMMARY_COLUMNS:
                value, n = table[group][key], table[group][count]
                if value is None or not n:
                    cells.append("-")
                    continue
                se = (value * (1 - value) / n) ** 0.5
                cells.append(f"{100 * value:.1f} ± {100 * se:.1f}%")
            cells.append(f"{table['images_per_second']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run_argparse(main)
