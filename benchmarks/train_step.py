r"""Training throughput of one cascade stage: compile time, steady-state images/s, FLOPs, MFU, memory.

    python benchmarks/train_step.py --config configs/bench_tiny.py
    python benchmarks/train_step.py --config configs/bench_small.py --config.model.dtype=float32  # GPU: bf16
    python benchmarks/train_step.py --config configs/shapes.py --text ids     # demo: T5 trained jointly
    python benchmarks/train_step.py --config configs/imagen_base64.py:bench --config.train.batch_size=32
    python benchmarks/train_step.py --config configs/imagen_base64.py:bench --compile_only  # any host

Runs the exact step `train.py` runs (`training.loop.compile_train_step`: jit with explicit shardings,
donated state, AOT compile) on synthetic inputs, so the input pipeline is out of the measurement
(`benchmarks/input_pipeline.py` measures it separately). Text comes in as random T5-width embeddings, as
from the embedding cache (`--text embeddings`, the default for frozen encoders), or as token ids that the
step encodes (`--text ids`, needed when the encoder trains jointly). Images/s is the median over
`--iters` timed steps after `--warmup` steps. FLOPs per image come from XLA's cost analysis of the
lowered step (forward + backward + optimizer): XLA's GPU backend turns convolutions and matrix products
into cuDNN/cuBLAS calls that its count of the compiled program leaves out (0.3% of the model's FLOPs on
the H200). MFU = achieved FLOP/s / the device's peak (accelerators only; CPUs report FLOP/s). With
`model.remat` the step also recomputes activations: MFU then counts the model's FLOPs (the same step
without remat, lowered only) and HFU the FLOPs the hardware executed (the step as run). With
`model.scan_blocks` XLA counts each loop body once, so the model's FLOPs come from the unrolled step and
the hardware FLOPs are a lower bound.
`matmul_conv_flops_per_image` counts only the model's matrix products and convolutions, as PyTorch's
FLOP counter does: the count to compare across frameworks (`benchmarks/vs_imagen_pytorch.py`).
"""

from __future__ import annotations

import dataclasses
import time

import common  # also puts the project root on sys.path
import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax.parallel import memory
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import build as stage_lib
from imagen_jax.training import state as state_lib
from imagen_jax.training.config_checks import validate_config
from imagen_jax.training.loop import (
    CompiledTrainStep,
    compile_train_step,
    frozen_inputs,
    global_batch,
    train_step_fn,
)
from imagen_jax.training.state import make_optimizer

FLAGS = flags.FLAGS


def synthetic_batch(config, stage: stage_lib.Stage, text: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch shaped like the input pipeline's: images in [-1, 1] (at the training crop size, with
    the matching low-res input for a super-resolution stage) and text of random lengths."""
    rng = np.random.default_rng(seed)
    b, length = config.train.batch_size, stage.text.max_length
    res = config.data.get("crop_resolution", 0) or stage.resolution
    lengths = rng.integers(length // 2, length + 1, size=b)
    mask = np.arange(length)[None, :] < lengths[:, None]
    batch = {"image": rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32), "text_mask": mask}
    if stage.lowres_resolution:
        low = res * stage.lowres_resolution // stage.resolution
        batch["lowres"] = rng.uniform(-1, 1, (b, low, low, 3)).astype(np.float32)
    if text == "ids":
        batch["text_ids"] = np.where(mask, rng.integers(3, 259, (b, length)), 0).astype(np.int32)
    else:
        emb = rng.standard_normal((b, length, stage.text.embed_dim), dtype=np.float32)
        batch["text_emb"] = emb * mask[..., None]
    return batch


def counted_stage(stage: stage_lib.Stage, **unet_fields) -> stage_lib.Stage:
    """The stage to count FLOPs in: attention through XLA's own ops, whose work XLA counts and which
    lower for the host's CPU (cuDNN's fused kernel is one opaque call), and `unet_fields` changed. The
    same products either way; cuDNN's backward pass also recomputes the attention weights, which the
    hardware count (HFU) then leaves out."""
    return dataclasses.replace(stage, unet=stage.unet.clone(attention_impl="xla", **unet_fields))


def plain_step(config, stage: stage_lib.Stage, optimizer, state, frozen):
    """(step, state, frozen): the step of the model as defined, with `remat` off (no recomputation) and
    the blocks unrolled (XLA counts a loop's body once, not per iteration), and its inputs."""
    plain = counted_stage(stage, remat=False, scan_blocks=False)
    if stage.unet.scan_blocks:  # the unrolled parameters (and optimizer state) have their own layout
        state, _ = state_lib.abstract_train_state(plain, optimizer)
        frozen = frozen_inputs(config, plain, state.params)  # and their own stacks to read
    return train_step_fn(config, plain, optimizer), state, frozen


def lowered_flops(step, state, batch, frozen) -> float | None:
    """XLA's count of one call of `step`, lowered (unoptimised) and not compiled: the whole program, before
    it is split over devices. Recomputation (remat) counts; a loop's body counts once. Lowered for the
    host's CPU from shapes alone, whatever the devices: JAX counts a lowered program only on backends built
    into jaxlib, not on plugins such as CUDA's (there it returns None)."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch, frozen))
    with jax.default_device(jax.devices("cpu")[0]):
        return common.cost_flops(jax.jit(step).lower(*shapes))


def model_flops(config, stage: stage_lib.Stage, optimizer, state, batch, frozen) -> float | None:
    """FLOPs of one step of the model as defined: the plain step's lowered count."""
    step, state, frozen = plain_step(config, stage, optimizer, state, frozen)
    return lowered_flops(step, state, batch, frozen)


def matmul_conv_flops(config, stage: stage_lib.Stage, optimizer, state, batch, frozen) -> float:
    """FLOPs of the plain step's matrix products and convolutions, counted as PyTorch counts them."""
    step, state, frozen = plain_step(config, stage, optimizer, state, frozen)
    return common.matmul_conv_flops(step, state, batch, frozen)


def compiled_memory(compiled: CompiledTrainStep) -> dict[str, int | None]:
    """XLA's static memory plan of the compiled step, per device (donated buffers counted once; of its
    larger program when the update is separate), and the allocator's limit where the device reports one."""
    plan = compiled.memory_plan()
    return {
        "planned_bytes": plan.total if plan else None,
        "planned_temp_bytes": plan.temporaries if plan else None,
        "device_memory_limit_bytes": memory.device_memory_limit(),
    }


def compile_fitting_batch(
    config, stage, optimizer, shardings, state, text: str, mesh, frozen, fit_batch: bool, check_memory: bool
):
    """Compiles the step at `config.train.batch_size`; with `fit_batch`, halves the batch (on a copy of
    the config) while XLA's plan exceeds the device's memory. Returns the config, batch, program, seconds."""
    while True:
        batch = global_batch(synthetic_batch(config, stage, text), mesh, config.sharding)
        try:
            compiled, seconds = compile_train_step(
                config, stage, optimizer, shardings, state, batch, frozen, check_memory=check_memory
            )
            return config, batch, compiled, seconds
        except memory.DeviceMemoryError as e:
            half = config.train.batch_size // 2
            shards = mesh_lib.batch_shards(mesh, config.sharding)
            if not fit_batch or half < shards or half % shards:
                raise
            print(f"{e}\n--fit_batch: compiling again at batch {half}.", flush=True)
            config = config.copy_and_resolve_references()
            config.train.batch_size = half


def benchmark(
    config,
    text: str,
    iters: int,
    warmup: int,
    profile_dir: str | None = None,
    compile_only: bool = False,
    fit_batch: bool = False,
) -> dict:
    """Compiles the train step and times it; `compile_only` compiles against the state's shapes alone
    (nothing allocated: sizes batches and models too large for this host) and reports XLA's plan without
    refusing it; `fit_batch` halves a batch whose plan does not fit the device."""
    validate_config(config)
    mesh = mesh_lib.make_mesh(config.mesh, dcn=config.mesh_dcn)
    mesh_lib.check_batch_divisible(config.train.batch_size, mesh, config.sharding)
    stage = stage_lib.build_stage(common.seeded_text(config), mesh)
    optimizer = make_optimizer(config.optim, config.train.num_steps)
    # Progress lines, so a run stopped at a time limit still says how far it got.
    t0 = time.perf_counter()
    if compile_only:
        state, shardings = state_lib.abstract_train_state(stage, optimizer)
    else:
        state, shardings = state_lib.init_train_state(stage, optimizer, jax.random.PRNGKey(config.seed))
    print(
        f"train state ready in {time.perf_counter() - t0:.1f} s; compiling the step at batch "
        f"{config.train.batch_size}...",
        flush=True,
    )
    if text == "auto":
        text = "ids" if config.text.train_jointly else "embeddings"
    frozen = frozen_inputs(config, stage, state.params)
    requested_batch = config.train.batch_size
    config, batch, compiled, compile_s = compile_fitting_batch(
        config,
        stage,
        optimizer,
        shardings,
        state,
        text,
        mesh,
        frozen,
        fit_batch,
        check_memory=not compile_only,
    )
    flops = hardware_flops = model_flops(config, stage, optimizer, state, batch, frozen)
    if stage.unet.remat or stage.unet.scan_blocks:
        hardware_flops = lowered_flops(
            train_step_fn(config, counted_stage(stage), optimizer), state, batch, frozen
        )

    b = config.train.batch_size
    device = jax.devices()[0]
    result = {
        "text_input": text,
        "batch_size": b,
        "requested_batch_size": requested_batch,
        "resolution": config.data.resolution,
        "dtype": common.run_dtype(config),
        "remat": bool(config.model.get("remat")),
        "unet_params": int(sum(x.size for x in jax.tree.leaves(state.params["unet"]))),
        "jointly_trained_text_params": int(
            sum(x.size for x in jax.tree.leaves(state.params.get("text", {})))
        ),
        "compile_seconds": compile_s.total,
        "lower_seconds": compile_s.lower,
        "xla_compile_seconds": compile_s.xla,
        "flops_per_image": flops / b if flops else None,
        "matmul_conv_flops_per_image": matmul_conv_flops(config, stage, optimizer, state, batch, frozen) / b,
        "hardware_flops_per_image": hardware_flops / b if hardware_flops else None,
        **compiled_memory(compiled),
        **common.kernel_counts(compiled),
    }
    print(
        f"compiled in {compile_s.total:.1f} s (tracing + lowering {compile_s.lower:.1f} s, XLA "
        f"{compile_s.xla:.1f} s; {result['kernels']} kernels, {result['kernels_outside_modules']} outside "
        f"the models, {result['distinct_kernels']} distinct); planned {result['planned_bytes']} bytes "
        "per device",
        flush=True,
    )
    if compile_only:
        return result

    print(f"timing {warmup} + {iters} steps at batch {b}...", flush=True)
    holder = {"state": state}

    def one_step() -> None:
        holder["state"], metrics = compiled(holder["state"], batch, frozen)
        jax.block_until_ready(metrics["loss"])

    step_s, times = common.median_seconds(one_step, iters=iters, warmup=warmup)
    if profile_dir:  # a few more steps under the profiler: TensorBoard's profile tab, or ui.perfetto.dev
        try:
            with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
                for _ in range(3):
                    one_step()
        except Exception as e:  # a profiler that fails (no CUPTI, say) must not cost the timing
            print(f"the profile failed, the timing stands: {type(e).__name__}: {e}", flush=True)
    achieved = flops / step_s if flops else None
    executed = hardware_flops / step_s if hardware_flops else None
    return {
        **result,
        "step_seconds_median": step_s,
        "step_seconds_min": min(times),
        "images_per_second": b / step_s,
        "flops_per_second": achieved,
        "mfu": common.utilisation(achieved, device, jax.device_count()),
        "hfu": common.utilisation(executed, device, jax.device_count()),
        **common.peak_memory(device),
    }


def main(argv: list[str]) -> None:
    del argv
    common.compile_from_scratch()
    config = FLAGS.config
    result = benchmark(
        config, FLAGS.text, FLAGS.iters, FLAGS.warmup, FLAGS.profile_dir, FLAGS.compile_only, FLAGS.fit_batch
    )
    common.print_table(
        [result],
        [
            "batch_size",
            "dtype",
            "remat",
            "text_input",
            "unet_params",
            "compile_seconds",
            "lower_seconds",
            "xla_compile_seconds",
            "kernels",
            "distinct_kernels",
            "images_per_second",
            "flops_per_image",
            "flops_per_second",
            "mfu",
            "hfu",
            "planned_bytes",
            "peak_bytes",
        ],
    )
    common.save_result("train", FLAGS["config"], result, FLAGS.json)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Stage config (file.py[:variant]).", lock_config=True)
    flags.DEFINE_enum(
        "text", "auto", ["auto", "ids", "embeddings"], "Text input; auto: ids iff trained jointly."
    )
    flags.DEFINE_integer("iters", 20, "Timed steps.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
    flags.DEFINE_string("json", None, "Output JSON (default benchmarks/results/train_<config>_<dtype>.json).")
    flags.DEFINE_string("profile_dir", None, "Also write a jax.profiler trace of 3 steps here.")
    flags.DEFINE_bool(
        "compile_only",
        False,
        "Compile against shapes only (no state allocated) and report FLOPs and XLA's plan.",
    )
    flags.DEFINE_bool(
        "fit_batch",
        False,
        "Halve config.train.batch_size until XLA's plan of the step fits the device's memory (GPU/TPU).",
    )
    flags.mark_flags_as_required(["config"])
    cli.run(main, verbose=flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP))
