r"""Input-pipeline throughput against the training step's consumption rate.

    python benchmarks/input_pipeline.py --config configs/shapes.py --workdir runs/shapes

Builds the loader `train.py` builds (the config's dataset, grain shuffling/batching/prefetch, captions
tokenized in the pipeline, or looked up in the T5 embedding cache when the config uses one) and
measures the images/s it delivers with no training step consuming them. The training rate to compare
with comes from --train_images_per_second, or else from the matching
`benchmarks/results/train_<config>_<dtype>.json` written by `benchmarks/train_step.py`. The pipeline
must stay well ahead (target: >= 5x) so the step never waits on data.
"""

from __future__ import annotations

import json

import common
from absl import flags
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax.data.pipeline import make_loader, measure_throughput
from imagen_jax.data.sources import build_source
from imagen_jax.parallel import xla_options
from imagen_jax.stage import build as stage_lib
from imagen_jax.training.loop import text_inputs
from imagen_jax.training.text_pretraining import prepare_run_text

FLAGS = flags.FLAGS


def benchmark(config, workdir: str, num_batches: int) -> dict:
    source = build_source(config.data, workdir, "train")
    # The vocabulary and T5 a run makes, as train.py does.
    prepare_run_text(config.text, workdir, source, xla_options.compiler_options(config.get("xla_options")))
    stage = stage_lib.build_stage(config, workdir=workdir)
    loader = make_loader(
        source,
        batch_size=config.train.batch_size,
        seed=config.data.seed,
        tokenize_fn=text_inputs(config, workdir, source, stage),
        worker_count=config.data.worker_count,
        prefetch=config.data.prefetch * config.train.batch_size,
    )
    rate = measure_throughput(loader, num_batches, warmup=2)
    return {
        "batch_size": config.train.batch_size,
        "resolution": config.data.resolution,
        "worker_count": config.data.worker_count,
        "num_batches": num_batches,
        "pipeline_images_per_second": rate,
    }


def main(argv: list[str]) -> None:
    del argv
    config = FLAGS.config
    name = common.config_name(FLAGS["config"])
    result = benchmark(config, FLAGS.workdir, FLAGS.num_batches)
    train_rate = FLAGS.train_images_per_second
    source = "--train_images_per_second"
    if not train_rate:
        path = common.RESULTS / f"train_{name}_{common.run_dtype(config)}.json"
        if path.exists():
            train_rate = json.loads(path.read_text())["images_per_second"]
            source = str(path.relative_to(common.ROOT))
    result["train_images_per_second"] = train_rate or None
    result["train_rate_from"] = source if train_rate else None
    result["headroom"] = result["pipeline_images_per_second"] / train_rate if train_rate else None
    common.print_table(
        [result], ["batch_size", "pipeline_images_per_second", "train_images_per_second", "headroom"]
    )
    common.save_result("input_pipeline", FLAGS["config"], result, FLAGS.json)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Stage config (file.py[:variant]).", lock_config=True)
    flags.DEFINE_string("workdir", "runs/bench_data", "Where the dataset is (or gets) prepared.")
    flags.DEFINE_integer("num_batches", 50, "Timed batches.")
    flags.DEFINE_float("train_images_per_second", 0.0, "Training consumption rate to compare with.")
    flags.DEFINE_string("json", None, "Output JSON path.")
    flags.mark_flags_as_required(["config"])
    cli.run(main, verbose=flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP))
