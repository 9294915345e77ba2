"""Shared pieces of the benchmark scripts: machine description, timing, memory, FLOPs/MFU, output.

Every script prints a table and writes JSON holding the machine, the versions, the config and the numbers,
so a result can be reproduced (or challenged) from the file alone.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

# Dense peak FLOP/s per chip for MFU (bf16 unless the name says otherwise), from the vendors' data sheets.
# Matched against `device.device_kind` by substring, longest key first.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # Trillium
    "A100": 312e12,
    "H100": 989e12,  # SXM dense bf16
    "H200": 989e12,
}


def peak_flops(device: Any) -> float | None:
    """The device's dense bf16 peak, or None (CPUs: only achieved FLOP/s is reported)."""
    kind = getattr(device, "device_kind", "")
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in kind.lower():
            return PEAK_FLOPS[key]
    return None


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import flax
    import jax

    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def compile_from_scratch() -> None:
    """Benchmarks report compile times: never load a program from a persistent compilation cache (one
    that $JAX_COMPILATION_CACHE_DIR may have set), which would report a cache read as a compile."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)


def median_seconds(fn: Callable[[], Any], *, iters: int, warmup: int = 2) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` (which must block until its result is ready) over `iters` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def host_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_memory(device: Any) -> dict[str, Any]:
    """Device peak bytes where the backend reports them (GPU/TPU), else the host's peak RSS (CPU)."""
    from imagen_jax.parallel.memory import memory_stats  # imported late: ROOT joins sys.path above

    stats = memory_stats(device)
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_bytes": int(stats["peak_bytes_in_use"]), "kind": "device"}
    return {"peak_bytes": host_peak_rss_bytes(), "kind": "host_rss"}


def cost_flops(*programs: Any) -> float | None:
    """FLOPs of one call of each lowered or compiled jax function, summed, from XLA's cost analysis (None
    if unavailable)."""
    total = 0.0
    for program in programs:
        try:
            cost = program.cost_analysis()
        except Exception:  # noqa: BLE001 - some backends do not implement it
            return None
        if isinstance(cost, Sequence) and not isinstance(cost, dict):
            cost = cost[0] if cost else None
        if not cost or "flops" not in cost:
            return None
        total += float(cost["flops"])
    return total


def matmul_conv_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of the matrix products and convolutions in one call of `fn` (2 per multiply-add), counted in
    its jaxpr, as PyTorch's `FlopCounterMode` counts them: every output position times the whole kernel
    window, padding included. XLA's count (`cost_flops`) also counts elementwise work, so only this one
    compares work across frameworks (`jax.experimental.roofline` counts only a convolution's taps inside
    the input, as XLA does). A transposed convolution counts as the convolution it transposes, so a
    strided convolution's input gradient counts as its forward pass, as PyTorch counts it.
    Loops count each iteration; a while loop's trip count is unknown and is refused."""
    import jax

    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr: Any) -> float:
    from jax.extend.core import ClosedJaxpr, Jaxpr

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            shared = math.prod(lhs[i] for i in (*lhs_contract, *lhs_batch))
            total += 2.0 * math.prod(lhs) * math.prod(rhs) / shared
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "while":
            raise ValueError("matmul_conv_flops: a while loop's trip count is unknown; unroll it.")
        subs = [v for p in eqn.params.values() for v in (p if isinstance(p, (tuple, list)) else (p,))]
        sub_flops = [
            _jaxpr_flops(s.jaxpr if isinstance(s, ClosedJaxpr) else s)
            for s in subs
            if isinstance(s, (ClosedJaxpr, Jaxpr))
        ]
        if name == "cond":  # one branch runs
            total += max(sub_flops, default=0.0)
        else:
            total += sum(sub_flops) * eqn.params.get("length", 1)  # scan: per iteration
    return total


def _conv_flops(eqn: Any) -> float:
    p = eqn.params
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    # Pairs of (output position, kernel tap) per spatial dimension. A dilated input is a transposed
    # convolution (e.g. a strided convolution's input gradient): each real input element meets every tap,
    # as each output position of the convolution it transposes did; the zeros between them count nothing.
    taps = 1
    for d in range(len(p["window_strides"])):
        size, kernel, out_size = lhs[lhs_spec[2 + d]], rhs[rhs_spec[2 + d]], out[out_spec[2 + d]]
        taps *= (out_size if p["lhs_dilation"][d] == 1 else size) * kernel
    batch = lhs[lhs_spec[0]] // p["batch_group_count"]
    return 2.0 * batch * rhs[rhs_spec[0]] * rhs[rhs_spec[1]] * taps


_FUSION = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? fusion\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_BACKEND_CONFIG = re.compile(r"backend_config=(\{.*\})")
_METADATA = re.compile(r", metadata=\{[^}]*\}")
_VALUE_NAME = re.compile(r"%[\w.\-]+")


def distinct_kernels(module_text: str) -> int:
    """How many different kernels one compiled program's HLO text holds: fusions whose computations are
    the same up to names and metadata, with the same backend config, are one kernel (XLA:CPU generates
    code once for them)."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in module_text.splitlines():
        if opening := _COMPUTATION.match(line):
            current = opening.group(1)
            bodies[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(_VALUE_NAME.sub("%", _METADATA.sub("", line)).strip())
    kernels = set()
    for line in module_text.splitlines():
        if _FUSION.match(line) and (called := _CALLS.search(line)):
            config = _BACKEND_CONFIG.search(line)
            kernels.add((tuple(bodies.get(called.group(1), [called.group(1)])), config and config.group(1)))
    return len(kernels)


def kernel_counts(compiled: Any, modules: Sequence[str] = ("UNet", "T5Encoder")) -> dict[str, int | None]:
    """The fused kernels of the compiled program, the pieces XLA generates code for one by one (most of
    XLA:CPU's compile time): all of them, those not named inside any module of `modules` (the optimizer,
    EMA, clipping and loss, and the parameters' layout copies, several per parameter), and the distinct
    ones summed over the programs (`distinct_kernels`: what XLA compiles). A count, unlike a compile time,
    does not vary from run to run. None where the backend gives no HLO text."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - not every backend prints its program
        return {"kernels": None, "kernels_outside_modules": None, "distinct_kernels": None}
    # Every computation's, not the entry's alone: a loop's body is compiled once, however often it runs.
    fusions = [line for line in text.splitlines() if _FUSION.match(line)]
    names = "|".join(map(re.escape, modules))
    in_module = re.compile(rf"\b(?:{names})\b")
    outside = 0
    for line in fusions:
        name = _OP_NAME.search(line)
        outside += not (name and in_module.search(name.group(1)))
    modules_text = re.split(r"^(?=HloModule )", text, flags=re.MULTILINE)
    distinct = sum(distinct_kernels(module) for module in modules_text if module.strip())
    return {"kernels": len(fusions), "kernels_outside_modules": outside, "distinct_kernels": distinct}


def utilisation(flops_per_second: float | None, device: Any, num_devices: int) -> float | None:
    peak = peak_flops(device)
    if peak is None or flops_per_second is None:
        return None
    return flops_per_second / (peak * num_devices)


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path}")


def config_name(config_flag: Any) -> str:
    """'bench_tiny' for `--config configs/bench_tiny.py[:variant]` (names the result files)."""
    from ml_collections import config_flags

    return pathlib.Path(config_flags.get_config_filename(config_flag)).stem


def seeded_text(config: Any) -> Any:
    """`config` with the seeded T5 and bytes where it names what a run makes for itself, a T5 pretrained in
    the run (`text.encoder="pretrain"`, the same sizes `text.t5`) or a vocabulary learned from its captions
    (`text.tokenizer="captions"`, the same `max_length`): benchmarks time programs, not what text says."""
    # Imported late: ROOT joins sys.path above.
    from imagen_jax.text.build import LEARNED_TOKENIZER, PRETRAINED_IN_RUN

    if config.text.encoder != PRETRAINED_IN_RUN and config.text.tokenizer != LEARNED_TOKENIZER:
        return config
    config = config.copy_and_resolve_references()
    if config.text.encoder == PRETRAINED_IN_RUN:
        config.text.encoder = "random"
    if config.text.tokenizer == LEARNED_TOKENIZER:
        config.text.tokenizer = "byte"
    return config


def run_dtype(config: Any) -> str:
    """The U-Net's compute dtype in this process ("auto" resolved for the backend)."""
    from imagen_jax.models.unet import compute_dtype  # imported late: ROOT joins sys.path above

    return compute_dtype(config.model.dtype)


def save_result(kind: str, config_flag: Any, payload: dict[str, Any], path: str | None = None) -> None:
    """Writes `payload` with the machine and the config to `path` (default results/<kind>_<config>.json)."""
    config = config_flag.value
    default = RESULTS / f"{kind}_{config_name(config_flag)}_{run_dtype(config)}.json"
    write_json(
        path or default,
        {"benchmark": kind, "machine": machine_info(), "config": config.to_dict(), **payload},
    )
