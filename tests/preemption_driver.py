"""A tiny training run in its own process that signals itself at an exact point (for test_preemption.py).

  python tests/preemption_driver.py WORKDIR DATA_DIR NUM_STEPS MODE COMPILATION_CACHE_DIR

MODE: "none"; "term_at_step:K" (SIGTERM while step K's batch is fetched, so step K is the last to run);
"term_in_save:K" (SIGTERM right after the step-K checkpoint starts writing in the background);
"term_twice:K" (as term_at_step, plus a second SIGTERM while the stop checkpoint is being written).
The signals are real (os.kill on this process); only the moment is pinned, so the test is deterministic.
"""

import logging
import os
import signal
import sys

from configs.shapes import get_config
from imagen_jax.stage import checkpoint
from imagen_jax.training import loop


def main(workdir: str, data_dir: str, num_steps: str, mode: str, cache_dir: str) -> None:
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("imagen_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = get_config("tiny")
    config.data.data_dir = data_dir
    config.compilation_cache_dir = cache_dir
    config.train.update(num_steps=int(num_steps), checkpoint_every=3, log_every=1)
    kind, _, at = mode.partition(":")
    at = int(at or 0)
    term = lambda: os.kill(os.getpid(), signal.SIGTERM)

    if kind in ("term_at_step", "term_twice"):
        real_batch, calls = loop.global_batch, [0]

        def batch_then_term(*args):
            calls[0] += 1  # call k fetches the batch of step k
            if calls[0] == at:
                term()
            return real_batch(*args)

        loop.global_batch = batch_then_term
    if kind in ("term_in_save", "term_twice"):
        real_save = checkpoint.CheckpointWriter.save

        def save_then_term(self, step, arrays, cfg, data_state=None):
            real_save(self, step, arrays, cfg, data_state)
            if step == at:
                term()

        checkpoint.CheckpointWriter.save = save_then_term
    loop.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    main(*sys.argv[1:])
