r"""Compile-only sharding plan of a stage's train step over N fake CPU devices: what each device holds.

    python benchmarks/sharding_plan.py --devices 8                   # paper base U-Net, preset fsdp
    python benchmarks/sharding_plan.py --devices 32 --preset fsdp --batch_size 2048 \
        --config.train.grad_accum_steps=8                            # the paper's batch, micro-batch 8/device
    python benchmarks/sharding_plan.py --devices 8 --preset dp --state_only   # no XLA compile: seconds
    python benchmarks/sharding_plan.py --devices 8 --config configs/bench_tiny.py --mesh data=2,fsdp=4

Nothing is allocated at model size and nothing runs: the train state is `abstract_train_state`'s
ShapeDtypeStructs (with their shardings), the batch is ShapeDtypeStructs too, and the step is lowered and
compiled ahead of time (`training.loop.compile_train_step`, the program `train.py` runs) for a mesh of
`--devices` host devices (`--xla_force_host_platform_device_count`, set before jax starts: the script
re-executes itself with it; `--devices 0` plans on the host's real devices, e.g. a GPU's or TPU's). The
default config is `configs/imagen_base64.py:bench`: the paper's 2.1B U-Net with Adafactor and EMA, fed
synthetic 4096-wide text, so nothing is downloaded.

The report separates two kinds of figures:
- `state` (backend-independent): bytes of the parameters, EMA and optimizer state each device holds,
  computed from the shardings themselves (`NamedSharding.devices_indices_map`: the exact slice of each
  leaf on each device), the same on a CPU, GPU or TPU mesh of that shape. Also the largest parameter shard,
  the leaves left replicated (below `sharding.min_shard_size`, no dimension the rules divide, or
  Adafactor's factored moments, which carry no logical names) and whether the state fits
  `--device_memory_gib` per device.
- `xla_cpu` (specific to XLA:CPU on this host): XLA's memory plan of each compiled SPMD program of the
  step per device (arguments, outputs, temporaries; with `train.separate_update` the gradients' program
  and the update's, the larger one being the step's peak), the step's FLOPs per device from the cost
  analysis, the collectives the partitioner inserted, and lowering/compile seconds. The update's arguments
  match the state above plus the gradients (the parameters' size); the temporaries are XLA:CPU's buffer
  assignment, which is not a GPU's or TPU's (see docs/benchmarks.md): size activation memory on the
  accelerator itself.
"""

from __future__ import annotations

import ast
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import common  # also puts the project root on sys.path
import jax
import ml_collections
import numpy as np
import train_step as train_step_bench
from absl import flags
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import build as stage_lib
from imagen_jax.training import state as state_lib
from imagen_jax.training.config_checks import validate_config
from imagen_jax.training.loop import compile_train_step, frozen_inputs, peak_plan

FLAGS = flags.FLAGS
GIB = 1024**3
DEFAULT_CONFIG = str(common.ROOT / "configs" / "imagen_base64.py") + ":bench"
STATE_GROUPS = ("params", "ema_params", "opt_state")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


# ---------------------------------------------------------------------------------------------------
# Backend-independent: bytes per device from the shardings.


def _slice_len(s: slice, dim: int) -> int:
    return len(range(*s.indices(dim)))


def leaf_device_bytes(shape: Sequence[int], dtype: Any, sharding: jax.sharding.Sharding) -> dict[int, int]:
    """{device id: bytes of the slice of this array that device holds}, from the sharding alone."""
    itemsize = np.dtype(dtype).itemsize
    out = {}
    for device, index in sharding.devices_indices_map(tuple(shape)).items():
        n = math.prod(_slice_len(s, d) for s, d in zip(index, shape, strict=True)) if shape else 1
        out[device.id] = n * itemsize
    return out


def _spec(sharding: Any) -> str:
    spec = getattr(sharding, "spec", None)
    return str(tuple(spec)) if spec is not None else str(sharding)


def tree_report(tree: Any, num_devices: int, top: int = 5) -> dict[str, Any]:
    """Per-device bytes of a tree of arrays or ShapeDtypeStructs carrying shardings.

    `bytes_per_device` is one device's share by `sharding.shard_shape` (device 0's layout); `max_device_bytes`
    / `min_device_bytes` come from every device's exact slice; `sum_over_devices_bytes` counts each
    replica (>= `full_bytes`, equal only when nothing is replicated)."""
    per_device = np.zeros(num_devices, dtype=np.int64)
    full = shard = replicated_leaves = replicated_bytes = sharded_leaves = 0
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    largest: dict[str, Any] | None = None
    replicated: list[tuple[int, str, tuple[int, ...], str]] = []
    for path, leaf in leaves:
        shape, dtype, sharding = tuple(leaf.shape), leaf.dtype, leaf.sharding
        itemsize = np.dtype(dtype).itemsize
        nbytes = math.prod(shape) * itemsize
        shard_bytes = math.prod(sharding.shard_shape(shape)) * itemsize
        full += nbytes
        shard += shard_bytes
        for device_id, b in leaf_device_bytes(shape, dtype, sharding).items():
            per_device[device_id] += b
        name = jax.tree_util.keystr(path)
        if sharding.is_fully_replicated:
            replicated_leaves += 1
            replicated_bytes += nbytes
            replicated.append((nbytes, name, shape, str(np.dtype(dtype))))
        else:
            sharded_leaves += 1
        if largest is None or shard_bytes > largest["shard_bytes"]:
            largest = {
                "path": name,
                "shape": list(shape),
                "dtype": str(np.dtype(dtype)),
                "spec": _spec(sharding),
                "shard_shape": list(sharding.shard_shape(shape)),
                "shard_bytes": shard_bytes,
                "full_bytes": nbytes,
            }
    replicated.sort(reverse=True)
    return {
        "leaves": len(leaves),
        "elements": int(sum(math.prod(leaf.shape) for _, leaf in leaves)),
        "full_bytes": full,
        "bytes_per_device": shard,
        "max_device_bytes": int(per_device.max()) if len(leaves) else 0,
        "min_device_bytes": int(per_device.min()) if len(leaves) else 0,
        "sum_over_devices_bytes": int(per_device.sum()),
        "sharded_leaves": sharded_leaves,
        "replicated_leaves": replicated_leaves,
        "replicated_bytes_per_device": replicated_bytes,
        "largest_shard": largest,
        "largest_replicated": [
            {"path": p, "shape": list(s), "dtype": d, "bytes": b} for b, p, s, d in replicated[:top]
        ],
    }


def state_report(state: Any, num_devices: int, budget_bytes: int) -> dict[str, Any]:
    """`tree_report` of the params, EMA, optimizer state and the rest (step, rng) of a TrainState of
    ShapeDtypeStructs, their per-device total and whether it fits `budget_bytes`."""
    groups = {name: tree_report(getattr(state, name), num_devices) for name in STATE_GROUPS}
    groups["other"] = tree_report({"step": state.step, "rng": state.rng}, num_devices)
    total = tree_report(state, num_devices)
    return {
        **groups,
        "total": {
            k: total[k]
            for k in (
                "leaves",
                "full_bytes",
                "bytes_per_device",
                "max_device_bytes",
                "min_device_bytes",
                "sum_over_devices_bytes",
                "replicated_leaves",
                "replicated_bytes_per_device",
            )
        },
        "device_memory_budget_bytes": budget_bytes,
        "fits_budget": total["max_device_bytes"] <= budget_bytes,
        "headroom_bytes": budget_bytes - total["max_device_bytes"],
    }


# ---------------------------------------------------------------------------------------------------
# The plan.


def configure(
    config: ml_collections.ConfigDict,
    preset: str | None = None,
    mesh: Sequence[Sequence[Any]] | None = None,
    batch_size: int | None = None,
) -> ml_collections.ConfigDict:
    """A copy of `config` with the plan's overrides (None keeps the config's value)."""
    config = config.copy_and_resolve_references()
    if preset:
        config.sharding.preset = preset
    if mesh:
        config.mesh = tuple((str(name), int(size)) for name, size in mesh)
    if batch_size:
        config.train.batch_size = int(batch_size)
    return config


def batch_structs(config, stage: stage_lib.Stage, mesh, text: str) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as ShapeDtypeStructs sharded over the batch mesh axes: the keys, per-example
    shapes and dtypes of `benchmarks/train_step.py`'s synthetic batch (built at batch 1), nothing
    allocated at the global size."""
    one = config.copy_and_resolve_references()
    one.train.batch_size = 1
    example = train_step_bench.synthetic_batch(one, stage, text)
    b = config.train.batch_size
    return {
        k: jax.ShapeDtypeStruct(
            (b, *v.shape[1:]), v.dtype, sharding=mesh_lib.batch_sharding(mesh, config.sharding, v.ndim)
        )
        for k, v in example.items()
    }


class _Heartbeat:
    """Prints `what ... N s` every `every` seconds until the block ends (long XLA compiles)."""

    def __init__(self, what: str, log: Callable[[str], None], every: float = 60.0):
        self.what, self.log, self.every = what, log, every
        self.done = threading.Event()

    def __enter__(self) -> _Heartbeat:
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.done.wait(self.every):
            self.log(f"  ... {self.what}: {time.perf_counter() - self.t0:.0f} s")

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join()


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _hlo_type_bytes(text: str) -> int:
    """Bytes of an HLO result type such as `f32[3,3,64,32]{3,2,1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(compiled: Any) -> dict[str, dict[str, Any]] | None:
    """Each collective in the compiled (partitioned) HLO: how many there are (async start/done pairs
    once), the bytes of their results summed over the program text (a loop body's once), and the largest
    one, e.g. a gradient all-reduced whole instead of reduce-scattered."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - not every backend returns HLO text
        return None
    out = {op: {"count": 0, "result_bytes": 0, "largest": None, "largest_bytes": 0} for op in COLLECTIVES}
    pattern = re.compile(r"=\s*(.+?)\s+(" + "|".join(map(re.escape, COLLECTIVES)) + r")(?:-start)?\(")
    for line in text.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        kind, result = out[m.group(2)], m.group(1)
        nbytes = _hlo_type_bytes(result)
        kind["count"] += 1
        kind["result_bytes"] += nbytes
        if nbytes > kind["largest_bytes"]:
            kind["largest"], kind["largest_bytes"] = re.sub(r"\{[^}]*\}", "", result), nbytes
    return out


def _print(msg: str) -> None:
    print(msg, flush=True)


def plan(
    config: ml_collections.ConfigDict,
    *,
    preset: str | None = None,
    mesh: Sequence[Sequence[Any]] | None = None,
    batch_size: int | None = None,
    compile_step: bool = True,
    device_memory_gib: float = 16.0,
    text: str = "auto",
    log: Callable[[str], None] = _print,
) -> dict[str, Any]:
    """The sharding plan of `config`'s train step on this process's devices (see the module docstring).
    Returns a dict with `state` (backend-independent bytes per device) and `xla_cpu` (None unless
    `compile_step`)."""
    config = configure(config, preset, mesh, batch_size)
    validate_config(config)
    tc = config.train
    mesh_ = mesh_lib.make_mesh(config.mesh, dcn=config.mesh_dcn)
    mesh_lib.check_batch_divisible(tc.batch_size, mesh_, config.sharding)
    accum = int(tc.get("grad_accum_steps", 1))
    micro = tc.batch_size // accum
    mesh_lib.check_batch_divisible(micro, mesh_, config.sharding, what="the micro-batch")
    shards = mesh_lib.batch_shards(mesh_, config.sharding)
    n = mesh_.size
    rules = mesh_lib.axis_rules(config.sharding)
    log(
        f"mesh {dict(mesh_.shape)} ({n} {jax.devices()[0].platform} devices), preset "
        f"{config.sharding.preset}, batch {tc.batch_size} ({accum} micro-batches of {micro}, "
        f"{micro // shards} per device per micro-batch)"
    )
    t0 = time.perf_counter()
    stage = stage_lib.build_stage(common.seeded_text(config), mesh_)
    optimizer = state_lib.make_optimizer(config.optim, tc.num_steps)
    state, shardings = state_lib.abstract_train_state(stage, optimizer)
    budget = int(device_memory_gib * GIB)
    report = state_report(state, n, budget)
    if text == "auto":
        text = "ids" if config.text.train_jointly else "embeddings"
    frozen = frozen_inputs(config, stage, state.params)
    batch = batch_structs(config, stage, mesh_, text)
    inputs = {"frozen": tree_report(frozen, n), "batch": tree_report(batch, n)}
    unet_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params["unet"])))
    tot = report["total"]
    gib = lambda r: f"{r['max_device_bytes'] / GIB:.2f}"  # noqa: E731
    log(
        f"state from shapes in {time.perf_counter() - t0:.1f} s: {unet_params:,} U-Net parameters; per "
        f"device {tot['max_device_bytes'] / GIB:.2f} GiB (params {gib(report['params'])}, EMA "
        f"{gib(report['ema_params'])}, optimizer {gib(report['opt_state'])}) of "
        f"{tot['full_bytes'] / GIB:.2f} GiB "
        f"unsharded; {tot['replicated_leaves']} of {tot['leaves']} leaves replicated; "
        f"{'fits' if report['fits_budget'] else 'does NOT fit'} {device_memory_gib:g} GiB"
    )
    result: dict[str, Any] = {
        "devices": n,
        "platform": jax.devices()[0].platform,
        "mesh": dict(mesh_.shape),
        "preset": config.sharding.preset,
        "rules": [list(r) for r in rules.table],
        "min_shard_size": rules.min_shard_size,
        "batch_size": tc.batch_size,
        "grad_accum_steps": accum,
        "micro_batch": micro,
        "batch_shards": shards,
        "per_device_micro_batch": micro // shards,
        "text_input": text,
        "unet_params": unet_params,
        "dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype,
        "optimizer": config.optim.name,
        "backend_independent": (
            "state and inputs: bytes per device from the shardings (NamedSharding.devices_indices_map); "
            "identical for any backend with this mesh shape"
        ),
        "state": report,
        "inputs": inputs,
        "xla_cpu": None,
    }
    if not compile_step:
        return result

    log(f"lowering and compiling the train step (XLA:{jax.devices()[0].platform}; minutes for a 2B U-Net)...")
    with _Heartbeat("compiling", log):
        compiled, seconds = compile_train_step(
            config, stage, optimizer, shardings, state, batch, frozen, check_memory=False
        )
    plans = compiled.memory_plans()
    mem = peak_plan(plans)
    flops = common.cost_flops(*compiled.programs)
    xla = {
        "note": (
            "XLA:CPU specific: buffer assignment (temporaries) and fusion differ on GPU/TPU; FLOPs are "
            "one device's partition of the SPMD program (a while loop's body, e.g. gradient "
            "accumulation, is counted once); collectives are GSPMD's choice for this mesh"
        ),
        "lower_seconds": seconds.lower,
        "compile_seconds": seconds.xla,
        "argument_bytes": mem.arguments if mem else None,
        "output_bytes": mem.outputs if mem else None,
        "temp_bytes": mem.temporaries if mem else None,
        "alias_bytes": mem.aliased if mem else None,
        "total_bytes": mem.total if mem else None,
        "programs": {  # the step's peak above is the larger program's
            name: {
                "argument_bytes": p.arguments,
                "output_bytes": p.outputs,
                "temp_bytes": p.temporaries,
                "alias_bytes": p.aliased,
                "total_bytes": p.total,
            }
            for name, p in plans.items()
            if p
        },
        "flops_per_device": flops,
        "flops_all_devices": flops * n if flops else None,
        "flops_per_image": flops * n / tc.batch_size if flops and accum == 1 else None,
        "collectives": collectives(compiled),
    }
    result["xla_cpu"] = xla
    log(
        f"compiled: lowering {seconds.lower:.1f} s, XLA {seconds.xla:.1f} s; XLA:CPU plan per device: "
        f"arguments {_fmt_gib(xla['argument_bytes'])} GiB, outputs {_fmt_gib(xla['output_bytes'])}, "
        f"temporaries {_fmt_gib(xla['temp_bytes'])}, total {_fmt_gib(xla['total_bytes'])}; "
        f"{(flops or 0) / 1e12:.3f} TFLOP per device; collectives "
        f"{ {k: v['count'] for k, v in (xla['collectives'] or {}).items()} }"
    )
    return result


# ---------------------------------------------------------------------------------------------------
# Command line.


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
    """`data=1,fsdp=-1,tensor=1` or the config's form `(('data', 1), ('fsdp', -1), ('tensor', 1))`."""
    text = text.strip()
    if text.startswith("("):
        return tuple((str(a), int(b)) for a, b in ast.literal_eval(text))
    pairs = [p.split("=") for p in text.split(",") if p.strip()]
    return tuple((name.strip(), int(size)) for name, size in pairs)


def _reexec_with_devices(n: int) -> None:
    """Restarts this script with `n` fake CPU devices when jax's backend would not have them (XLA reads
    the device count once, when jax starts its backend; jax is imported above, its backend not started).
    `n` = 0: the host's own devices (a GPU/TPU plan), as the environment gives them."""
    if n == 0:
        return
    flags_now = os.environ.get("XLA_FLAGS", "")
    want = f"{_DEVICE_COUNT_FLAG}={n}"
    if want in flags_now.split() and os.environ.get("JAX_PLATFORMS") == "cpu":
        return
    if os.environ.get("_SHARDING_PLAN_REEXEC"):
        raise SystemExit(f"could not set {want} for jax (XLA_FLAGS={flags_now!r})")
    kept = [f for f in flags_now.split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    env = dict(os.environ, XLA_FLAGS=" ".join([*kept, want]), JAX_PLATFORMS="cpu", _SHARDING_PLAN_REEXEC="1")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _fmt_gib(v: int | None) -> str:
    return "-" if v is None else f"{v / GIB:.3f}"


def main(argv: list[str]) -> None:
    del argv
    _reexec_with_devices(FLAGS.devices)
    common.compile_from_scratch()
    result = plan(
        FLAGS.config,
        preset=FLAGS.preset,
        mesh=parse_mesh(FLAGS.mesh) if FLAGS.mesh else None,
        batch_size=FLAGS.batch_size,
        compile_step=not FLAGS.state_only,
        device_memory_gib=FLAGS.device_memory_gib,
    )
    s, x = result["state"], result["xla_cpu"] or {}
    rows = [
        {
            "group": g,
            "leaves": s[g]["leaves"],
            "GiB_unsharded": _fmt_gib(s[g]["full_bytes"]),
            "GiB_per_device": _fmt_gib(s[g]["bytes_per_device"]),
            "GiB_max_device": _fmt_gib(s[g]["max_device_bytes"]),
            "replicated_leaves": s[g]["replicated_leaves"],
        }
        for g in (*STATE_GROUPS, "other")
    ]
    t = s["total"]
    rows.append(
        {
            "group": "state total",
            "leaves": t["leaves"],
            "GiB_unsharded": _fmt_gib(t["full_bytes"]),
            "GiB_per_device": _fmt_gib(t["bytes_per_device"]),
            "GiB_max_device": _fmt_gib(t["max_device_bytes"]),
            "replicated_leaves": t["replicated_leaves"],
        }
    )
    print("\nBackend-independent (from the shardings), per device:")
    common.print_table(rows, list(rows[0]))
    big = s["params"]["largest_shard"]
    print(
        f"largest parameter shard: {big['path']} {big['shape']} {big['spec']} -> {big['shard_shape']}, "
        f"{big['shard_bytes'] / 2**20:.1f} MiB"
    )
    verdict = "fits" if s["fits_budget"] else "does NOT fit"
    print(
        f"state (params + EMA + optimizer) {verdict} in {FLAGS.device_memory_gib:g} GiB per device: "
        f"{t['max_device_bytes'] / GIB:.2f} GiB, {s['headroom_bytes'] / GIB:.2f} GiB left for "
        "activations, gradients and workspace"
    )
    if x:
        print("\nXLA:CPU specific (this host's compiler), per device:")
        keys = ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes")
        common.print_table(
            [
                {"program": program, **{k.replace("_bytes", "_GiB"): _fmt_gib(plan[k]) for k in keys}}
                for program, plan in x["programs"].items()
            ],
            ["program", *(k.replace("_bytes", "_GiB") for k in keys)],
        )
        tflop = f"{x['flops_per_device'] / 1e12:.3f}" if x["flops_per_device"] else "-"
        print(
            f"the step: {tflop} TFLOP per device, lowering {x['lower_seconds']:.1f} s, XLA "
            f"{x['compile_seconds']:.1f} s"
        )
    name = f"sharding_plan_{common.config_name(FLAGS['config'])}_{result['preset']}_{result['devices']}dev"
    out = FLAGS.out or str(common.RESULTS / f"{name}.json")
    common.write_json(
        out,
        {
            "benchmark": "sharding_plan",
            "machine": common.machine_info(),
            "command": " ".join(["python", *sys.argv]),
            "config": FLAGS.config.to_dict(),
            **result,
        },
    )


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Config file.py[:variant]; --config.x=... overrides.", lock_config=True
    )
    flags.DEFINE_integer("devices", 8, "Fake CPU devices (the script re-executes with them); 0: real ones.")
    flags.DEFINE_enum("preset", None, sorted(mesh_lib.PRESETS), "Sharding preset (default: the config's).")
    flags.DEFINE_string(
        "mesh", None, "Mesh axes, e.g. data=1,fsdp=-1,tensor=1 (default: the config's; -1 = the rest)."
    )
    flags.DEFINE_integer("batch_size", None, "Global batch (default: config.train.batch_size).")
    flags.DEFINE_float("device_memory_gib", 16.0, "Per-device memory the state is checked against.")
    flags.DEFINE_bool("state_only", False, "Only the state sizes from the shardings; no XLA compile.")
    flags.DEFINE_string("out", None, "Output JSON (default benchmarks/results/sharding_plan_<...>.json).")
    cli.run(main, verbose=flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP))
