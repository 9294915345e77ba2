r"""Sample a PNG grid from a trained stage.

  python sample.py --workdir runs/shapes --prompt "a large red circle" --num 8 --guidance 3 \
      --sampler dpmpp2m --steps 25 --out grid.png
  python sample.py --workdir runs/shapes --prompts_file prompts.txt --out grid.png

Each prompt is drawn --num times (one grid row per prompt); the prompts are written beside the PNG.
Mistakes end with one `error:` line (exit 1; 2 for the command line itself); --verbose shows the traceback.
"""

import logging

from absl import app, flags

from imagen_jax import cli
from imagen_jax.cascade.sampling_cli import sample_to_grid
from imagen_jax.diffusion.guidance import THRESHOLD_KINDS
from imagen_jax.diffusion.samplers import SAMPLERS

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ (its config is used).")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable). An empty string is unconditional.")
flags.DEFINE_string("prompts_file", None, "UTF-8 text file with one prompt per line.")
flags.DEFINE_integer("num", 8, "Images per prompt.")
flags.DEFINE_float("guidance", None, "Classifier-free guidance weight (default: config.sample.guidance).")
flags.DEFINE_enum("sampler", None, SAMPLERS, "Sampler (default: config.sample.sampler).")
flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sample.num_steps).")
flags.DEFINE_float("eta", None, "DDIM eta (default: config.sample.eta).")
flags.DEFINE_enum("threshold", None, THRESHOLD_KINDS, "Thresholding (default: config.sample.threshold).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that verifies).")
flags.DEFINE_string("out", "grid.png", "Output PNG path.")
_VERBOSE = flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    png, txt = sample_to_grid(
        FLAGS.workdir,
        prompts=FLAGS.prompt,
        prompts_file=FLAGS.prompts_file,
        num=FLAGS.num,
        out=FLAGS.out,
        seed=FLAGS.seed,
        step=FLAGS.step,
        guidance=FLAGS.guidance,
        sampler=FLAGS.sampler,
        num_steps=FLAGS.steps,
        eta=FLAGS.eta,
        threshold=FLAGS.threshold,
    )
    print(f"wrote {png} and {txt}")


if __name__ == "__main__":
    cli.run(main, verbose=_VERBOSE)
