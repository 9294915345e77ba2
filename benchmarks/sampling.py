r"""Sampling throughput per sampler: first-call (compile) time, denoising steps/s x batch, images/s.

    python benchmarks/sampling.py --config configs/bench_tiny.py
    python benchmarks/sampling.py --config configs/bench_small.py --steps 25 --guidance 3
    python benchmarks/sampling.py --config configs/imagen_base64.py:bench --compile_only --batch 8

Times `cascade.stage.generate`, the call `sample.py` makes (tokenize, T5, the whole sampling loop in one
compiled program, uint8 images back on the host), with freshly initialised weights. The first call
compiles; "compile_seconds" is that call minus the steady-state median. Guidance > 1 runs conditional and
unconditional passes as one doubled batch per denoising step, so a "denoising step" below always means one
step of the whole guided batch. `--compile_only` lowers and compiles the sampling program against
shapes alone (no weights, nothing run), timing tracing + lowering and XLA apart, for models too large to
sample on this host. It is one program for every sampler, step count and thresholding (they are its
inputs), so the first call of each sampler after the first compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import common  # noqa: F401  (puts the project root on sys.path)
import jax
import optax
from absl import flags
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax.diffusion import samplers
from imagen_jax.stage import build as stage_lib
from imagen_jax.stage import sampling
from imagen_jax.training import state as state_lib
from imagen_jax.training.config_checks import validate_config

FLAGS = flags.FLAGS


# Short enough for the bench configs' 16 tokens (no truncation warnings); "" is the unconditional prompt.
PROMPTS = ("a red circle", "a blue square", "")


def benchmark(config, sampler_names, steps: int, guidance: float, batch: int, iters: int) -> list[dict]:
    validate_config(config)
    stage = stage_lib.build_stage(common.seeded_text(config))
    state, _ = state_lib.init_train_state(stage, optax.identity(), jax.random.PRNGKey(config.seed))
    stage = dataclasses.replace(stage, params=state.ema_params)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    rows = []
    for name in sampler_names:
        opts = dict(guidance=guidance, sampler=name, num_steps=steps, rng=jax.random.PRNGKey(0))
        run = functools.partial(sampling.generate, stage, prompts, **opts)
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        print(f"{name}: first call (with compile) {first:.1f} s; timing {iters} calls...", flush=True)
        call_s, _ = common.median_seconds(run, iters=iters, warmup=0)
        rows.append(
            {
                "sampler": name,
                "steps": steps,
                "guidance": guidance,
                "batch": batch,
                "compile_seconds": max(first - call_s, 0.0),
                "seconds_per_call": call_s,
                "denoising_steps_per_second": steps / call_s,
                "step_images_per_second": steps * batch / call_s,
                "images_per_second": batch / call_s,
            }
        )
    return rows


def compile_only(config, batch: int) -> list[dict]:
    """Lowers and compiles the sampling program `generate` runs, from shapes alone: one program, which
    takes the sampler, the step count and the thresholding as inputs."""
    validate_config(config)
    stage = stage_lib.build_stage(common.seeded_text(config))
    params = stage_lib.params_structs(stage)["unet"]
    f32 = jax.ShapeDtypeStruct((), jax.numpy.float32)
    text = jax.ShapeDtypeStruct((batch, stage.text.max_length, stage.text.embed_dim), jax.numpy.float32)
    mask = jax.ShapeDtypeStruct((batch, stage.text.max_length), jax.numpy.bool_)
    lowres = None
    if stage.lowres_resolution:
        side = stage.lowres_resolution
        lowres = jax.ShapeDtypeStruct((batch, side, side, 3), jax.numpy.float32)
    program = sampling.sample_program(config.xla_options)
    s = config.sample
    options = sampling.sample_options(
        sampler=s.sampler, num_steps=s.num_steps, time_grid=s.time_grid, threshold=s.threshold,
        percentile=s.percentile,
    )  # inputs, as guidance and eta are: their values do not enter the program
    t0 = time.perf_counter()
    lowered = program.lower(
        params,
        text,
        mask,
        lowres,
        f32,
        jax.random.PRNGKey(0),
        f32,
        f32,
        *options,
        unet=stage.unet,
        schedule=stage.schedule,
        objective=config.diffusion.objective,
        shape=(batch, stage.resolution, stage.resolution, 3),
    )
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print(f"lowered in {t1 - t0:.1f} s, XLA compiled in {t2 - t1:.1f} s", flush=True)
    return [
        {
            "sampler": "any",
            "steps": "any",
            "batch": batch,
            "compile_seconds": t2 - t0,
            "lower_seconds": t1 - t0,
            "xla_compile_seconds": t2 - t1,
        }
    ]


def main(argv: list[str]) -> None:
    del argv
    common.compile_from_scratch()
    config = FLAGS.config
    batch = FLAGS.batch or config.train.batch_size
    if FLAGS.compile_only:
        rows = compile_only(config, batch)
        columns = ["sampler", "steps", "batch", "compile_seconds", "lower_seconds", "xla_compile_seconds"]
    else:
        rows = benchmark(config, FLAGS.samplers, FLAGS.steps, FLAGS.guidance, batch, FLAGS.iters)
        columns = [
            "sampler",
            "steps",
            "guidance",
            "batch",
            "compile_seconds",
            "denoising_steps_per_second",
            "step_images_per_second",
            "images_per_second",
        ]
    common.print_table(rows, columns)
    common.save_result(
        "sampling", FLAGS["config"], {**common.peak_memory(jax.devices()[0]), "results": rows}, FLAGS.json
    )


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Stage config (file.py[:variant]).", lock_config=True)
    flags.DEFINE_list("samplers", list(samplers.SAMPLERS), "Samplers to time.")
    flags.DEFINE_integer("steps", 25, "Denoising steps per image.")
    flags.DEFINE_float("guidance", 3.0, "Classifier-free guidance weight (1 = off).")
    flags.DEFINE_integer("batch", 0, "Images per call (0 = config.train.batch_size).")
    flags.DEFINE_integer("iters", 3, "Timed calls per sampler.")
    flags.DEFINE_string("json", None, "Output JSON (default benchmarks/results/sampling_<config>.json).")
    flags.DEFINE_bool("compile_only", False, "Lower and compile the sampling program; run nothing.")
    flags.mark_flags_as_required(["config"])
    cli.run(main, verbose=flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP))
