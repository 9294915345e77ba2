r"""What checkpoint verification costs: content digests, file manifests and the verified restore.

  python benchmarks/checkpoint_integrity.py --config configs/shapes.py --workdir /tmp/ckpt_bench
  python benchmarks/checkpoint_integrity.py --config configs/imagen_base64.py:bench --compile_only

Measured (default): a real train state of the config is digested (first call = compile + run, then the
median of 3), saved through `CheckpointWriter` (the blocking part of the save and the background write),
its files hashed into the manifest, and restored with every check (`restore_verified`).
`--compile_only`: the state's shapes alone (nothing allocated, so the ~2B base stage plans on any host):
every distinct per-array digest program is compiled, XLA's cost analysis gives the bytes it reads and
its FLOPs, and the digest time is bounded from the accelerators' memory bandwidth; the manifest's time
comes from this host's measured SHA-256 rate over the state's bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import time

import common  # noqa: F401  (puts the project root on sys.path)
import jax
from absl import app, flags
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import build as stage_lib
from imagen_jax.stage import checkpoint, integrity
from imagen_jax.training import state as state_lib
from imagen_jax.training.state import make_optimizer

FLAGS = flags.FLAGS
# Peak HBM bandwidth per chip (bytes/s), vendors' data sheets: the digest reads each byte once.
HBM_BANDWIDTH = {
    "TPU v4": 1.2e12,
    "TPU v5e": 0.82e12,
    "TPU v5p": 2.76e12,
    "A100 80GB": 2.0e12,
    "H100 SXM": 3.35e12,
}


def _state(config, compile_only: bool):
    mesh = mesh_lib.make_mesh(config.mesh)
    stage = stage_lib.build_stage(common.seeded_text(config), mesh)
    optimizer = make_optimizer(config.optim, config.train.num_steps)
    if compile_only:
        return state_lib.abstract_train_state(stage, optimizer)[0]
    return state_lib.init_train_state(stage, optimizer, jax.random.PRNGKey(config.seed))[0]


def sha256_bytes_per_second(size: int = 256 << 20) -> float:
    data = os.urandom(1 << 20) * (size >> 20)
    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return size / (time.perf_counter() - t0)


def plan(config) -> dict:
    """Digest programs compiled against shapes: bytes read, FLOPs, compile seconds; time estimates."""
    state = _state(config, compile_only=True)
    leaves = jax.tree.leaves(state)
    programs: dict[tuple, tuple[int, object]] = {}
    for leaf in leaves:
        key = (leaf.shape, str(leaf.dtype), str(leaf.sharding))
        count, struct = programs.get(key, (0, leaf))
        programs[key] = (count + 1, struct)
    read = flops = 0.0
    t0 = time.perf_counter()
    for count, struct in programs.values():
        cost = integrity._leaf_digest.lower(struct).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        read += count * float(cost.get("bytes accessed", 0.0))
        flops += count * float(cost.get("flops", 0.0))
    compile_s = time.perf_counter() - t0
    state_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    devices = jax.device_count()
    sha_rate = sha256_bytes_per_second()
    return {
        "state_bytes": state_bytes,
        "arrays": len(leaves),
        "distinct_digest_programs": len(programs),
        "digest_compile_seconds": compile_s,
        "digest_bytes_read_all_devices": read * devices,
        "digest_flops_all_devices": flops * devices,
        "devices": devices,
        # Two bounds per chip: reading the state once (a fused reduction's cost), and XLA's cost analysis
        # on this backend, which counts every unfused operation's operands (an upper bound).
        "digest_seconds_reading_the_state_once": {
            chip: state_bytes / devices / bw for chip, bw in HBM_BANDWIDTH.items()
        },
        "digest_seconds_xla_cost_analysis": {chip: read / bw for chip, bw in HBM_BANDWIDTH.items()},
        "host_sha256_bytes_per_second": sha_rate,
        "manifest_seconds_estimate_one_host_one_thread": state_bytes / sha_rate,
    }


def measure(config, workdir: str) -> dict:
    state = _state(config, compile_only=False)
    t0 = time.perf_counter()
    integrity.digest_tree(state)
    first = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        integrity.digest_tree(state)
        runs.append(time.perf_counter() - t0)

    shutil.rmtree(workdir, ignore_errors=True)
    writer = checkpoint.CheckpointWriter(workdir, keep=2)
    t0 = time.perf_counter()
    writer.save(
        int(state.step), state_lib.to_items(state), config, None
    )  # digest + the synchronous part of Orbax's async save
    save_blocking = time.perf_counter() - t0
    writer.manager.wait_until_finished()
    written = time.perf_counter() - t0
    step_dir = os.path.join(checkpoint.checkpoint_dir(workdir), str(int(state.step)))
    t0 = time.perf_counter()
    integrity.write_file_manifest(step_dir)
    manifest = time.perf_counter() - t0
    writer.close()
    disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step_dir) for f in fs)

    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    manager = checkpoint.make_manager(workdir, create=False)
    t0 = time.perf_counter()
    integrity.check_file_manifests(step_dir)
    check_files = time.perf_counter() - t0
    t0 = time.perf_counter()
    checkpoint.restore_verified(manager, int(state.step), lambda _: state_lib.to_items(structs), config)
    restore = time.perf_counter() - t0
    return {
        "state_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)),
        "arrays": len(jax.tree.leaves(state)),
        "checkpoint_bytes_on_disk": disk,
        "digest_first_call_seconds": first,
        "digest_seconds_median": statistics.median(runs),
        "save_blocking_seconds": save_blocking,
        "save_written_seconds": written,
        "manifest_seconds": manifest,
        "check_file_manifests_seconds": check_files,
        "restore_verified_seconds": restore,
    }


def main(argv: list[str]) -> None:
    del argv
    common.compile_from_scratch()
    config = FLAGS.config
    if FLAGS.compile_only:
        result = plan(config)
    else:
        if not FLAGS.workdir:
            raise app.UsageError("--workdir is needed to write the checkpoint (or pass --compile_only).")
        result = measure(config, FLAGS.workdir)
    for key, value in result.items():
        print(f"{key:48s} {value}")
    kind = "checkpoint_integrity_plan" if FLAGS.compile_only else "checkpoint_integrity"
    common.save_result(kind, FLAGS["config"], result, FLAGS.json)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Stage config (file.py[:variant]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Scratch directory for the measured checkpoint (emptied first).")
    flags.DEFINE_bool("compile_only", False, "Plan from shapes only (no state allocated).")
    flags.DEFINE_string(
        "json", None, "Output JSON (default: benchmarks/results/<kind>_<config>_<dtype>.json)."
    )
    flags.mark_flags_as_required(["config"])
    cli.run(main, verbose=flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP))
