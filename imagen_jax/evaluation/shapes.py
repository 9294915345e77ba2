r"""Score a shapes-trained stage: sample held-out captions, check them with the classical scorer.

  python -m imagen_jax.evaluation.shapes --workdir runs/shapes [--guidance 0,3] [--num 512]

Prints one table per guidance weight (one-object colour/size/shape, two-object found/relation) and writes
`<workdir>/eval/shapes_eval.json` plus a PNG grid of the first samples at each weight.
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
) -> dict[str, dict]:
    """Scores `num_captions` held-out (test split) captions at each guidance weight."""
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
        )
        table = score_batch(images, scenes)
        seconds = time.perf_counter() - t0
        results[f"guidance_{weight:g}"] = {**table, "sampling_seconds": seconds}
        print(f"\n== guidance {weight:g} ({num_captions} captions, {seconds:.0f} s) ==")
        print(format_table(table))
        if out_dir:
            save_grid(
                images[:32],
                captions[:32],
                os.path.join(out_dir, f"samples_guidance_{weight:g}.png"),
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
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    stage = load_stage(args.workdir, step=args.step)
    ev: ml_collections.ConfigDict = stage.config.eval
    weights = [float(w) for w in args.guidance.split(",")] if args.guidance else list(ev.guidance_weights)
    if stage.config.sample.guidance not in weights:
        weights.append(float(stage.config.sample.guidance))
    out_dir = os.path.join(args.workdir, "eval")
    results = evaluate_shapes(
        stage,
        guidance_weights=weights,
        num_captions=args.num or ev.num_captions,
        batch_size=ev.batch_size,
        seed=ev.seed,
        out_dir=out_dir,
        sampler=args.sampler,
        num_steps=args.steps,
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "shapes_eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {os.path.join(out_dir, 'shapes_eval.json')}")


if __name__ == "__main__":
    main()
