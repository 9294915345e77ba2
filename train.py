r"""Train one Imagen cascade stage.

  python train.py --config configs/shapes.py --workdir runs/shapes [--config.train.num_steps=100]

Re-running the same command resumes from the latest checkpoint in --workdir. On many hosts, run the same
command on every host with --distributed (docs/scale_out.md, launch/). Mistakes end with one
`error:` line (exit 1; 2 for the command line itself); --verbose shows the traceback.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax.training.loop import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Python config file (optionally file.py:variant).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, metrics and samples.")
_DISTRIBUTED = cli.define_distributed_flags()
_VERBOSE = flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("imagen_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every checkpoint file at INFO
    _DISTRIBUTED.join()
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main, verbose=_VERBOSE)
