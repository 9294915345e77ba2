r"""imagen_jax side by side with imagen-pytorch: same U-Net settings, batch, image size, text and threads.

    python benchmarks/vs_imagen_pytorch.py --config configs/bench_tiny.py \
        --torch_python /path/to/venv-with-imagen-pytorch/bin/python

imagen_jax never imports torch, so imagen-pytorch runs in its own interpreter (a separate venv without
torchvision, made as docs/benchmarks.md says), through
`benchmarks/imagen_pytorch_worker.py`, one process after the other on the same machine. --torch_python
defaults to $IMAGEN_PYTORCH_PYTHON, else this interpreter if it can import imagen_pytorch; without one the
comparison is skipped with a message and only the JAX numbers are written.

Both sides get random text embeddings (no T5), the v objective, the cosine schedule, 10% caption dropout,
AdamW + gradient clipping + an EMA update per training step, and guidance at the same weight when
sampling. What still differs (listed in the JSON too) is in `DIFFERENCES`; the two U-Nets built from the
same settings differ in size, so the table also gives each step's matmul and convolution FLOPs, counted
alike, and the rate per unit of that work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import common
import sampling
import train_step
from absl import flags
from ml_collections import config_flags

from imagen_jax import cli

FLAGS = flags.FLAGS

DIFFERENCES = (
    "imagen-pytorch's Unet adds a perceiver text pooler, global-context attention in every ResNet block, "
    "a multi-kernel (3/7/15) cross-embed stem, a final ResNet block and a transformer feed-forward after "
    "each attention; imagen_jax uses attention pooling, a 3x3 stem and plain attention layers.",
    "imagen-pytorch samples with its DDPM loop (timesteps = steps), running guidance as two serial "
    "forward passes, removing the guidance direction's parallel component and dynamic thresholding at "
    "the 95th percentile; imagen_jax runs one doubled-batch pass per step (DDPM and DPM-Solver++(2M) "
    "timed) and thresholds at the 99.5th percentile.",
    "imagen-pytorch's down path runs each level's ResNet blocks (num_resnet_blocks + 1 of them) at the "
    "previous level's width and widens in the downsampling convolution; imagen_jax widens in each level's "
    "first block, as ADM and the paper's U-Net do, so at width 64 it has 16% more parameters and does more "
    "work per image (the table's matmul and convolution FLOPs).",
    "imagen-pytorch runs eagerly in fp32 with its own threads (torch.set_num_threads = CPU count); "
    "imagen_jax runs one compiled XLA program per step on all CPU cores.",
)


def _torch_python() -> str | None:
    if FLAGS.torch_python:
        return FLAGS.torch_python
    if os.environ.get("IMAGEN_PYTORCH_PYTHON"):
        return os.environ["IMAGEN_PYTORCH_PYTHON"]
    probe = subprocess.run([sys.executable, "-c", "import imagen_pytorch"], capture_output=True)
    return sys.executable if probe.returncode == 0 else None


def torch_spec(
    config,
    threads: int,
    *,
    train_iters: int,
    sample_steps: int,
    sample_batch: int,
    sample_iters: int,
    guidance: float,
) -> dict:
    """The arguments of `imagen_pytorch_worker.run` describing the same model and workload as `config`."""
    m = config.model
    widths = [m.channels * k for k in m.channel_mults]
    heads = m.num_heads or widths[-1] // m.head_dim
    return {
        "dim": m.channels,
        "dim_mults": list(m.channel_mults),
        "num_res_blocks": m.num_res_blocks,
        "self_attention": list(m.self_attention),
        "cross_attention": list(m.cross_attention),
        "heads": heads,
        "head_dim": widths[-1] // heads,
        "text_dim": config.text.t5.d_model,
        "cond_dim": m.text_dim,
        "text_len": config.text.max_length,
        "image_size": config.data.resolution,
        "batch": config.train.batch_size,
        "caption_dropout": config.diffusion.caption_dropout,
        "threads": threads,
        "train_iters": train_iters,
        "warmup": 3,
        "sample_steps": sample_steps,
        "sample_batch": sample_batch or config.train.batch_size,
        "sample_iters": sample_iters,
        "guidance": guidance,
    }


def main(argv: list[str]) -> None:
    del argv
    common.compile_from_scratch()
    config = FLAGS.config
    threads = os.cpu_count() or 1
    sample_batch = FLAGS.sample_batch or config.train.batch_size
    ours_train = train_step.benchmark(config, "embeddings", FLAGS.train_iters, 3)
    ours_sample = sampling.benchmark(
        config, ["ddpm", "dpmpp2m"], FLAGS.sample_steps, FLAGS.guidance, sample_batch, FLAGS.sample_iters
    )
    spec = torch_spec(
        config,
        threads,
        train_iters=FLAGS.train_iters,
        sample_steps=FLAGS.sample_steps,
        sample_batch=sample_batch,
        sample_iters=FLAGS.sample_iters,
        guidance=FLAGS.guidance,
    )
    theirs = None
    python = _torch_python()
    if python is None:
        print("imagen-pytorch not found (--torch_python / $IMAGEN_PYTORCH_PYTHON): JAX numbers only.")
    else:
        worker = os.path.join(os.path.dirname(__file__), "imagen_pytorch_worker.py")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([python, worker, json.dumps(spec)], capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"imagen-pytorch worker failed:\n{done.stderr[-4000:]}")
        theirs = json.loads(done.stdout.strip().splitlines()[-1])

    ddpm = next(r for r in ours_sample if r["sampler"] == "ddpm")
    rows = [
        {
            "metric": "train images/s",
            "imagen_jax": ours_train["images_per_second"],
            "imagen_pytorch": theirs and theirs["train_images_per_second"],
        },
        {
            "metric": f"sampling denoising steps/s (DDPM, batch {sample_batch}, w={FLAGS.guidance:g})",
            "imagen_jax": ddpm["denoising_steps_per_second"],
            "imagen_pytorch": theirs and theirs["denoising_steps_per_second"],
        },
        {
            "metric": "first train step / compile s",
            "imagen_jax": ours_train["compile_seconds"],
            "imagen_pytorch": theirs and theirs["train_first_step_seconds"],
        },
        {
            "metric": "train GFLOP / image, matmuls + convolutions (as PyTorch's FlopCounterMode counts)",
            "imagen_jax": ours_train["matmul_conv_flops_per_image"] / 1e9,
            "imagen_pytorch": theirs and theirs["train_flops_per_image"] / 1e9,
        },
        {
            "metric": "train GFLOP/s of those (the rate per unit of work)",
            "imagen_jax": ours_train["matmul_conv_flops_per_image"] * ours_train["images_per_second"] / 1e9,
            "imagen_pytorch": theirs
            and theirs["train_flops_per_image"] * theirs["train_images_per_second"] / 1e9,
        },
        {
            "metric": "train GFLOP / image, every operation (XLA's count)",
            "imagen_jax": ours_train["flops_per_image"] and ours_train["flops_per_image"] / 1e9,
            "imagen_pytorch": None,
        },
        {
            "metric": "U-Net parameters",
            "imagen_jax": ours_train["unet_params"],
            "imagen_pytorch": theirs and theirs["unet_params"],
        },
    ]
    for row in rows[:2] + rows[3:5]:  # speeds, work and rate; not compile seconds or one-sided counts
        row["ratio"] = row["imagen_jax"] / row["imagen_pytorch"] if theirs else None
    common.print_table(rows, ["metric", "imagen_jax", "imagen_pytorch", "ratio"])
    for line in DIFFERENCES:
        print("-", line)
    payload = {
        "threads": threads,
        "torch_spec": spec,
        "imagen_jax": {"train": ours_train, "sampling": ours_sample},
        "imagen_pytorch": theirs,
        "table": rows,
        "differences": DIFFERENCES,
    }
    common.save_result("vs_imagen_pytorch", FLAGS["config"], payload, FLAGS.json)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Stage config (file.py[:variant]).", lock_config=True)
    flags.DEFINE_string("torch_python", None, "Python of a venv with torch and imagen-pytorch.")
    flags.DEFINE_integer("train_iters", 10, "Timed training steps per framework.")
    flags.DEFINE_integer("sample_steps", 25, "Denoising steps per sample call.")
    flags.DEFINE_integer("sample_batch", 0, "Images per sample call (0 = config.train.batch_size).")
    flags.DEFINE_integer("sample_iters", 2, "Timed sample calls per framework.")
    flags.DEFINE_float("guidance", 3.0, "Guidance weight for both.")
    flags.DEFINE_string("json", None, "Output JSON path.")
    flags.mark_flags_as_required(["config"])
    cli.run(main, verbose=flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP))
