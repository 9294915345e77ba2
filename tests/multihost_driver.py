"""One process of a multi-host training run on localhost (for test_multihost.py), or the one-process run
it is compared with.

  python tests/multihost_driver.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DATA_DIR NUM_STEPS MODE OUT_JSON

With NUM_PROCESSES > 1 the process joins the run through `jax.distributed.initialize` (a coordinator on
127.0.0.1:PORT, gloo CPU collectives); XLA_FLAGS in the environment gives its device count. It trains the
tiny model with FSDP (data=2 x fsdp=4 over all devices) and writes OUT_JSON: the scenes of every host batch
it read (by step), the losses it logged, the digests of the parameters it restored and of each checkpoint
it saved, and the step it stopped at.
MODE: "run"; "kill_at_step:K" (after checkpoint 3 is written, while step K's batch is fetched: write OUT_JSON
and OUT_JSON.ready, then wait for the test to SIGKILL every process at once); "term_at_step:K" (SIGTERM to
the last process only, while step K's batch is fetched).
"""

import json
import logging
import os
import signal
import sys


def main(
    process_id: str,
    num_processes: str,
    port: str,
    workdir: str,
    data_dir: str,
    num_steps: str,
    mode: str,
    out: str,
) -> None:
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("imagen_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from imagen_jax.parallel import distributed

    if int(num_processes) > 1:
        distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=int(num_processes),
            process_id=int(process_id),
        )
    from configs.shapes import get_config
    from imagen_jax.stage import checkpoint, integrity
    from imagen_jax.training import loop, progress

    config = get_config("tiny")
    config.data.data_dir = data_dir
    # One cache beside the runs' workdirs: a restart loads the programs the first run compiled.
    root = os.path.dirname(os.path.abspath(workdir))
    config.compilation_cache_dir = os.path.join(root, "compilation_cache")
    config.mesh = (("data", 2), ("fsdp", 4), ("tensor", 1))
    config.sharding.preset = "fsdp"
    config.sharding.min_shard_size = 512
    config.train.update(num_steps=int(num_steps), checkpoint_every=3, log_every=1, sample_every=0)
    record = {"scenes": {}, "losses": {}, "restored": None, "saved": {}, "stopped_at": None}
    kind, _, at = mode.partition(":")
    at = int(at or 0)

    real_batch, calls = loop.global_batch, [0]

    def recording_batch(local, *args):
        calls[0] += 1  # call k fetches the batch of step start + k
        step = record["first_step"] + calls[0]
        record["scenes"][step] = [str(s) for s in local["scene"]]
        last = int(process_id) == int(num_processes) - 1
        if calls[0] > 1 and step == at and kind == "term_at_step" and last:
            os.kill(os.getpid(), signal.SIGTERM)
        if calls[0] > 1 and step == at and kind == "kill_at_step":
            _dump(record, out)
            # Park here for the test to kill every process together: a process killing itself can take
            # down the coordinator while the other is still between steps, and that one then aborts
            # (SIGABRT from the distributed client) instead of being killed where the test says.
            open(out + ".ready", "w").close()
            signal.pause()
        return real_batch(local, *args)

    loop.global_batch = recording_batch

    real_initial = loop.initial_state

    def recording_initial(*args):
        state, shardings, data_state = real_initial(*args)
        record["first_step"] = int(state.step)
        if data_state is not None:
            record["restored"] = integrity.digest_tree(state.params)[0]
        return state, shardings, data_state

    loop.initial_state = recording_initial

    real_save = checkpoint.CheckpointWriter.save

    def recording_save(self, step, arrays, cfg, data_state=None):
        real_save(self, step, arrays, cfg, data_state)
        record["saved"][step] = integrity.digest_tree(arrays["params"])[0]
        record["stopped_at"] = step
        if kind == "kill_at_step":
            self.wait()  # the checkpoint the kill leaves behind is complete

    checkpoint.CheckpointWriter.save = recording_save

    real_scalars = progress.MetricWriter.scalars

    def recording_scalars(self, step, values):
        if "train/loss" in values:
            record["losses"][step] = float(values["train/loss"])
        real_scalars(self, step, values)

    progress.MetricWriter.scalars = recording_scalars
    loop.train_and_evaluate(config, workdir)
    _dump(record, out)


def _dump(record: dict, out: str) -> None:
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
