r"""Sample a PNG grid from a trained base stage, optionally through super-resolution stages (the cascade).

  python sample.py --workdir runs/shapes --prompt "a large red circle" --num 8 --guidance 3 \
      --sampler dpmpp2m --steps 25 --out grid.png
  python sample.py --workdir runs/shapes --prompts_file prompts.txt --out grid.png    # or .csv, .json
  python sample.py --workdir runs/shapes --sr_workdir runs/shapes_sr --sr_aug_level 0.1 \
      --prompt "a small blue square" --num 4 --out cascade.png

Each prompt is drawn --num times (one grid row per prompt; eight prompts a row with --num 1); the
prompts are written beside the PNG. With --sr_workdir (repeatable, in cascade order) each stage's grid
and a side-by-side one are written too. The --sr_* flags take one value per SR stage (comma-separated)
or one for all; unset = each stage's config.
On many hosts (--distributed) every process runs the same command; the batch is split over all devices
and process 0 writes the files. Mistakes end with one `error:` line (exit 1; 2 for the command line
itself); --verbose shows the traceback.
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
flags.DEFINE_string(
    "prompts_file",
    None,
    "Prompts: .txt (one a line), .csv (a `prompt` column, as DrawBench's) or .json (a list of strings).",
)
flags.DEFINE_integer("num", 8, "Images per prompt.")
flags.DEFINE_float("guidance", None, "Classifier-free guidance weight (default: config.sample.guidance).")
flags.DEFINE_enum("sampler", None, SAMPLERS, "Sampler (default: config.sample.sampler).")
flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sample.num_steps).")
flags.DEFINE_float("eta", None, "DDIM eta (default: config.sample.eta).")
flags.DEFINE_enum("threshold", None, THRESHOLD_KINDS, "Thresholding (default: config.sample.threshold).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that verifies).")
flags.DEFINE_multi_string("sr_workdir", [], "A super-resolution stage's workdir (repeatable, cascade order).")
flags.DEFINE_list("sr_guidance", [], "Guidance weight per SR stage.")
flags.DEFINE_list("sr_sampler", [], f"Sampler per SR stage ({', '.join(SAMPLERS)}).")
flags.DEFINE_list("sr_steps", [], "Sampling steps per SR stage.")
flags.DEFINE_list("sr_threshold", [], f"Thresholding per SR stage ({', '.join(THRESHOLD_KINDS)}).")
flags.DEFINE_list("sr_aug_level", [], "Noise-augmentation level in [0, 1] of each SR stage's input.")
flags.DEFINE_bool("share_text", True, "Encode the prompts once for all stages (they must share the encoder).")
flags.DEFINE_string("out", "grid.png", "Output PNG path.")
_DISTRIBUTED = cli.define_distributed_flags()
_VERBOSE = flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(["workdir"])


def _sr_options(count: int) -> list[dict[str, object]]:
    """One dict of sampling options per SR stage from the --sr_* lists."""
    columns = {
        "guidance": (FLAGS.sr_guidance, float),
        "sampler": (FLAGS.sr_sampler, str),
        "num_steps": (FLAGS.sr_steps, int),
        "threshold": (FLAGS.sr_threshold, str),
        "aug_level": (FLAGS.sr_aug_level, float),
    }
    options: list[dict[str, object]] = [{} for _ in range(count)]
    for key, (values, kind) in columns.items():
        if not values:
            continue
        if len(values) not in (1, count):
            raise app.UsageError(f"--sr_{key}: give one value or one per SR stage ({count}), got {values}.")
        for index in range(count):
            raw = values[0] if len(values) == 1 else values[index]
            try:
                options[index][key] = kind(raw)
            except ValueError:
                raise app.UsageError(f"--sr_{key}: {raw!r} is not a valid {kind.__name__}.") from None
    return options


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    _DISTRIBUTED.join()
    png, txt = sample_to_grid(
        FLAGS.workdir,
        prompts=FLAGS.prompt,
        prompts_file=FLAGS.prompts_file,
        num=FLAGS.num,
        out=FLAGS.out,
        seed=FLAGS.seed,
        step=FLAGS.step,
        sr_workdirs=FLAGS.sr_workdir,
        sr_options=_sr_options(len(FLAGS.sr_workdir)),
        share_text=FLAGS.share_text,
        guidance=FLAGS.guidance,
        sampler=FLAGS.sampler,
        num_steps=FLAGS.steps,
        eta=FLAGS.eta,
        threshold=FLAGS.threshold,
    )
    print(f"wrote {png} and {txt}")


if __name__ == "__main__":
    cli.run(main, verbose=_VERBOSE)
