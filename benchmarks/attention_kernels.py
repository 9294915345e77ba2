r"""Does cuDNN's fused self-attention train the same model as XLA's? One train step's loss and gradients
with each kernel, against the same step in float32 with XLA's attention, on the same state and batch.

    python benchmarks/attention_kernels.py --config configs/imagen_base64.py:bench \
        --config.model.num_res_blocks=1 --config.train.batch_size=8          # NVIDIA GPU
    python benchmarks/attention_kernels.py --config configs/bench_tiny.py --kernels xla  # dry run, any host

`model.attention_impl` is a runtime choice (checkpoints do not record it), so a kernel may replace XLA's
only if it computes the same step to bf16 rounding: its relative error against the float32 step should be
about XLA's own in bf16. The base U-Net with one block per level keeps its attention shapes (1024, 256 and
64 positions, 64 channels per head) and compiles in a fraction of the time. Also times each kernel's
gradient program (median of `--iters` calls). Writes JSON (`--json`).
"""

from __future__ import annotations

import dataclasses

import common  # also puts the project root on sys.path
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags
from train_step import synthetic_batch

from imagen_jax import cli
from imagen_jax.errors import ConfigError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import build as stage_lib
from imagen_jax.training import state as state_lib
from imagen_jax.training.config_checks import validate_config
from imagen_jax.training.loop import frozen_inputs, global_batch, train_step_fn

FLAGS = flags.FLAGS


def relative_error(value, reference) -> float:
    """||value - reference|| / ||reference|| over all leaves together, in float64 on the host."""
    diff = norm = 0.0
    for v, r in zip(jax.tree.leaves(value), jax.tree.leaves(reference), strict=True):
        v, r = np.asarray(v, np.float64), np.asarray(r, np.float64)
        diff += float(np.sum((v - r) ** 2))
        norm += float(np.sum(r**2))
    return (diff / norm) ** 0.5


@jax.jit  # one program for every shape (drawn op by op, each shape would compile its own)
def perturbed(params, rng: jax.Array, scale: float = 0.02):
    """`params` plus normal noise of std `scale`: a U-Net's zero-initialised output layers would leave
    every other layer's gradient zero, and so the attention untested."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(rng, len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def compare(config, kernels: list[str], iters: int) -> dict:
    """Loss and gradients of one train step with each kernel at `config.model.dtype`, against XLA's
    attention in float32; and the seconds per call of each kernel's gradient program."""
    for kernel in kernels:  # the config's own check says where a kernel cannot run (backend, dtype)
        checked = config.copy_and_resolve_references()
        checked.model.attention_impl = kernel
        try:
            validate_config(checked)
        except ConfigError as e:
            raise SystemExit(f"--kernels {kernel}: {e}") from e
    mesh = mesh_lib.make_mesh(config.mesh, dcn=config.mesh_dcn)
    stage = stage_lib.build_stage(common.seeded_text(config), mesh)
    optimizer = state_lib.make_optimizer(config.optim, config.train.num_steps)
    state, _ = state_lib.init_train_state(stage, optimizer, jax.random.PRNGKey(config.seed))
    state = dataclasses.replace(state, params=perturbed(state.params, jax.random.PRNGKey(1)))
    batch = global_batch(synthetic_batch(config, stage, "embeddings"), mesh, config.sharding)
    frozen = frozen_inputs(config, stage, state.params)

    def gradients(attention_impl: str, dtype, precision: str = "default") -> tuple:
        unet = stage.unet.clone(attention_impl=attention_impl, dtype=dtype)
        step = train_step_fn(config, dataclasses.replace(stage, unet=unet), optimizer)
        with jax.default_matmul_precision(precision):
            program = jax.jit(step.gradients).lower(state, batch, frozen).compile()
        result = jax.block_until_ready(program(state, batch, frozen))
        seconds, _ = common.median_seconds(
            lambda: jax.block_until_ready(program(state, batch, frozen)), iters=iters, warmup=1
        )
        return result, seconds

    print("the float32 reference (XLA's attention)...", flush=True)
    # Full float32 products: GPUs would otherwise run float32 convolutions and matmuls in TF32.
    (ref_loss, ref_grads), _ = gradients("xla", jnp.float32, precision="highest")
    rows = []
    for kernel in kernels:
        print(f"{kernel} at {stage.unet.dtype}...", flush=True)
        (loss, grads), seconds = gradients(kernel, stage.unet.dtype)
        rows.append(
            {
                "kernel": kernel,
                "loss": float(loss),
                "loss_relative_error": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
                "gradients_relative_error": relative_error(grads, ref_grads),
                "gradients_seconds": seconds,
            }
        )
    return {
        "batch_size": config.train.batch_size,
        "dtype": common.run_dtype(config),
        "reference_loss": float(ref_loss),
        "rows": rows,
    }


def main(argv: list[str]) -> None:
    del argv
    result = compare(FLAGS.config, FLAGS.kernels, FLAGS.iters)
    common.print_table(
        result["rows"],
        ["kernel", "loss", "loss_relative_error", "gradients_relative_error", "gradients_seconds"],
    )
    common.save_result("attention_kernels", FLAGS["config"], result, FLAGS.json)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Stage config (file.py[:variant]).", lock_config=True)
    flags.DEFINE_list(
        "kernels", ["xla", "cudnn"], "Self-attention kernels to compare (model.attention_impl)."
    )
    flags.DEFINE_integer("iters", 5, "Timed calls of each kernel's gradient program.")
    flags.DEFINE_string(
        "json", None, "Output JSON (default benchmarks/results/attention_kernels_<config>.json)."
    )
    flags.mark_flags_as_required(["config"])
    cli.run(main, verbose=flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP))
