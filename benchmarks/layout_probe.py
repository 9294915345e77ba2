r"""Where the shapes demo decides which object of a two-object caption goes where.

    python benchmarks/layout_probe.py --workdir runs/shapes [--step N] [--num 128]

On held-out two-object scenes (the evaluation's test split, standard captions, the config's guidance and
dynamic thresholding):

- From pure noise: the x0 prediction at times near 1, where the sampler's first steps lay out the scene.
  Each pixel is assigned softly to the nearest palette colour; the caption's first object is on its side
  of the second when its colour's centroid is, along the relation's axis. Chance 50%.
- From a given layout (SDEdit): the true image, and the image with the two objects' places exchanged,
  noised to t_start and sampled from there (`samplers.sample(..., t_start=)`: the config's number of
  ancestral (DDPM) steps and time grid, scaled into [0, t_start]); scored by the shapes scorer. Where
  the result follows the given layout, not the caption, the model has not yet taken its decision by
  t_start.

A model that binds its words puts the first object on the right side in its predictions from pure noise,
and from an exchanged layout at high t_start moves the objects back. Seconds to a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import common  # also puts the project root on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import cli
from imagen_jax.data import shapes
from imagen_jax.diffusion import samplers, schedules
from imagen_jax.evaluation.shapes_scorer import score_batch
from imagen_jax.stage.build import Stage, load_stage
from imagen_jax.stage.images import to_uint8
from imagen_jax.stage.sampling import encode_prompts, guided_denoiser

# Palette and background in the model's range [-1, 1]; the background is the last entry.
_PALETTE = np.array([*(shapes.PALETTE[c] for c in shapes.COLOURS), shapes.BACKGROUND], np.float32) / 127.5 - 1
_TEMPERATURE = 0.3  # of the soft colour assignment, in squared model-range units: blurred means still count


def first_object_placed_first(images: np.ndarray, scenes: Sequence[shapes.Scene]) -> np.ndarray:
    """Per image (model range [-1, 1], [N, H, W, 3]): whether the caption's first object's colour lies
    on its side of the second's along the relation's axis (soft colour assignment, so blurred means
    count too)."""
    x = np.asarray(images, np.float32)
    d2 = ((x[..., None, :] - _PALETTE) ** 2).sum(-1)
    w = np.exp(-(d2 - d2.min(-1, keepdims=True)) / _TEMPERATURE)
    w /= w.sum(-1, keepdims=True)
    side = x.shape[1]
    ys, xs = np.mgrid[0:side, 0:side] / side
    out = []
    for weights, scene in zip(w, scenes, strict=True):
        a, b = scene.objects
        coord = xs if scene.relation in ("left", "right") else ys
        wa, wb = weights[..., shapes.COLOURS.index(a.colour)], weights[..., shapes.COLOURS.index(b.colour)]
        ca, cb = (wa * coord).sum() / (wa.sum() + 1e-6), (wb * coord).sum() / (wb.sum() + 1e-6)
        out.append(bool((ca < cb) == (scene.relation in ("left", "above"))))
    return np.array(out)


def exchange_places(scene: shapes.Scene) -> shapes.Scene:
    """The scene with its two objects in each other's place: the caption's relation reversed."""
    a, b = scene.objects
    return dataclasses.replace(
        scene,
        objects=(dataclasses.replace(a, cx=b.cx, cy=b.cy), dataclasses.replace(b, cx=a.cx, cy=a.cy)),
    )


def _denoiser(stage: Stage, emb: jax.Array, mask: jax.Array) -> samplers.DenoiseFn:
    s = stage.config.sample
    return guided_denoiser(
        stage.unet, stage.params["unet"], emb, mask, objective=stage.config.diffusion.objective,
        guidance=float(s.guidance), threshold=s.threshold, percentile=s.percentile,
    )


def probe(stage: Stage, num: int, times: Sequence[float], starts: Sequence[float], seeds: int) -> dict:
    """Rates of the first object placed on its side (from noise, per time) and the scorer's two-object
    columns after SDEdit from the true and the exchanged layouts (per start time)."""
    pairs = shapes.eval_set(num, seed=stage.config.data.seed, split="test", p_two=1.0)
    scenes = [scene for _, scene in pairs]
    emb, mask = encode_prompts(stage, [caption for caption, _ in pairs])
    side, schedule, steps = stage.resolution, stage.schedule, int(stage.config.sample.num_steps)

    @jax.jit
    def predict(z: jax.Array, t: jax.Array) -> jax.Array:
        return _denoiser(stage, emb, mask)(z, jnp.full((z.shape[0],), schedule.logsnr(t)))[0]

    @jax.jit
    def sdedit(x: jax.Array, t_start: jax.Array, key: jax.Array) -> jax.Array:
        k0, key = jax.random.split(key)
        logsnr = jnp.full((x.shape[0],), schedule.logsnr(t_start))
        z = schedules.diffuse(x, jax.random.normal(k0, x.shape), logsnr)
        return samplers.sample(
            _denoiser(stage, emb, mask), shape=x.shape, rng=key, schedule=schedule, sampler="ddpm",
            num_steps=steps, time_grid=stage.config.sample.time_grid, z_init=z, t_start=t_start,
        )

    result: dict = {"step": stage.step, "scenes": num, "from_noise": {}, "from_layout": {}}
    for t in times:
        rates = []
        for seed in range(seeds):
            noise = jax.random.normal(jax.random.PRNGKey(seed), (num, side, side, 3))
            rates.append(float(first_object_placed_first(np.asarray(predict(noise, t)), scenes).mean()))
        result["from_noise"][f"{t:g}"] = float(np.mean(rates))
        print(f"from noise, t={t:g}: first object on its side in {np.mean(rates):.1%} ({seeds} draws)")
    layouts = {
        "true": np.stack([shapes.render(s, side) for s in scenes]),
        "exchanged": np.stack([shapes.render(exchange_places(s), side) for s in scenes]),
    }
    for t_start in starts:
        for name, images in layouts.items():
            x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
            out = to_uint8(np.asarray(sdedit(x, t_start, jax.random.PRNGKey(7))))
            two = score_batch(list(out), scenes)["two_objects"]
            row = {k: two[k] for k in ("relation", "found", "all_correct", "order_swapped")}
            result["from_layout"][f"{t_start:g}_{name}"] = row
            shown = {k: "-" if v is None else f"{v:.1%}" for k, v in row.items()}  # None: no pair found
            print(f"from the {name} layout at t={t_start:g}: relation {shown['relation']}, found "
                  f"{shown['found']}, all correct {shown['all_correct']}")
    return result


def main() -> None:
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="a shapes run's workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--num", type=int, default=128, help="two-object test scenes")
    parser.add_argument("--times", default="0.99,0.95,0.9", help="times of the predictions from noise")
    parser.add_argument("--starts", default="0.98,0.95,0.9", help="SDEdit start times")
    parser.add_argument("--seeds", type=int, default=4, help="noise draws per time")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    stage = load_stage(args.workdir, step=args.step)
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    result = probe(stage, args.num, floats(args.times), floats(args.starts), args.seeds)
    if args.json:
        common.write_json(args.json, result)


if __name__ == "__main__":
    cli.run_argparse(main)
