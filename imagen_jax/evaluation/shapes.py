r"""Score a shapes-trained stage: sample held-out captions, check them with the classical scorer.

  python -m imagen_jax.evaluation.shapes --workdir runs/shapes [--guidance 0,3] [--num 512]
  python -m imagen_jax.evaluation.shapes --workdir runs/shapes --guidance 1.5 \
      --sampler ddpm,dpmpp2m_sde --steps 10,15,25,50,100          # sampler x steps sweep

Prints one table per guidance weight (one-object colour/size/shape, two-object found/relation) and writes
`<workdir>/eval/shapes_eval.json` plus a PNG grid of the first samples at each weight. With several
samplers or step counts it scores every pair and ends with one summary row per (sampler, steps, guidance)
with images/s, so quality and speed are read side by side.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
import ml_collections

from imagen_jax.data.shapes import eval_set
from imagen_jax.evaluation.shapes_scorer import format_table, score_batch
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
) -> dict[str, dict]:
    """Scores `num_captions` held-out (test split) captions at each guidance weight (sampling settings
    default to `config.sample`)."""
    # The test mix is the eval config's, not the training mix: reweighting training data must not move
    # the test set.
    p_two = stage.config.eval.get("two_object_prob", 0.5)  # configs saved before the key: 0.5
    pairs = eval_set(num_captions, seed=stage.config.data.seed, split="test", p_two=p_two)
    captions = [caption for caption, _ in pairs]
    scenes = [scene for _, scene in pairs]
    results = {}
    for weight in guidance_weights:
        t0 = time.perf_counter()
        images = generate(
            stage,
            captions,
            rng=jax.random.PRNGKey(seed),
            guidance=float(weight),
            batch_size=batch_size,
            sampler=sampler,
            num_steps=num_steps,
            time_grid=time_grid,
            threshold=threshold,
        )
        seconds = time.perf_counter() - t0  # compile included: the first weight of a program pays it
        table = score_batch(images, scenes)
        results[f"guidance_{weight:g}"] = {
            **table,
            "sampling_seconds": seconds,
            "images_per_second": len(captions) / seconds,
        }
        print(f"\n== guidance {weight:g} ({num_captions} captions, {seconds:.0f} s) ==")
        print(format_table(table))
        if out_dir:
            save_grid(
                images[:32],
                captions[:32],
                os.path.join(out_dir, f"samples_{sampler}_{num_steps}_guidance_{weight:g}.png"),
                columns=8,
                upscale=2,
            )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="training workdir with checkpoints/")
    parser.add_argument("--guidance", default=None, help="comma-separated weights (default: config.eval)")
    parser.add_argument("--num", type=int, default=None, help="held-out captions (default: config.eval)")
    parser.add_argument("--sampler", default=None, help="comma-separated samplers (default: config.sample)")
    parser.add_argument("--steps", default=None, help="comma-separated step counts (default: config.sample)")
    parser.add_argument("--time_grid", default=None, help="uniform or quadratic (default: config.sample)")
    parser.add_argument("--threshold", default=None, help="none, static or dynamic (default: config.sample)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--out", default=None, help="JSON path (default: <workdir>/eval/shapes_eval.json)")
    args = parser.parse_args(argv)
    stage = load_stage(args.workdir, step=args.step)
    ev: ml_collections.ConfigDict = stage.config.eval
    weights = [float(w) for w in args.guidance.split(",")] if args.guidance else list(ev.guidance_weights)
    if not args.guidance and stage.config.sample.guidance not in weights:
        weights.append(float(stage.config.sample.guidance))
    samplers = args.sampler.split(",") if args.sampler else [stage.config.sample.sampler]
    steps = [int(n) for n in args.steps.split(",")] if args.steps else [int(stage.config.sample.num_steps)]
    out_dir = os.path.join(args.workdir, "eval")
    results = {}
    for sampler in samplers:
        for num_steps in steps:
            print(f"\n##### {sampler}, {num_steps} steps", flush=True)
            results[f"{sampler}_{num_steps}"] = evaluate_shapes(
                stage,
                guidance_weights=weights,
                num_captions=args.num or ev.num_captions,
                batch_size=ev.batch_size,
                seed=ev.seed,
                out_dir=out_dir,
                sampler=sampler,
                num_steps=num_steps,
                time_grid=args.time_grid,
                threshold=args.threshold,
            )
    print("\n" + summary_table(results))
    out = args.out or os.path.join(out_dir, "shapes_eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "settings": {
                    "time_grid": args.time_grid or stage.config.sample.time_grid,
                    "threshold": args.threshold or stage.config.sample.threshold,
                    "step": stage.step,
                },
                "runs": results,
            },
            f,
            indent=2,
        )
    print(f"\nwrote {out}")


SUMMARY_COLUMNS = (
    ("one_object", "colour"),
    ("one_object", "size"),
    ("one_object", "shape"),
    ("two_objects", "found"),
    ("two_objects", "relation"),
    ("two_objects", "all_correct"),
)


def summary_table(results: dict[str, dict[str, dict]]) -> str:
    """One Markdown row per (sampler_steps, guidance): the headline columns in percent and images/s."""
    head = ["run", "guidance"] + [f"{g.split('_')[0]}-obj {k}" for g, k in SUMMARY_COLUMNS] + ["images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, by_weight in results.items():
        for weight, table in by_weight.items():
            cells = [run, weight.removeprefix("guidance_")]
            for group, key in SUMMARY_COLUMNS:
                value = table[group][key]
                cells.append("-" if value is None else f"{100 * value:.1f}%")
            cells.append(f"{table['images_per_second']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
