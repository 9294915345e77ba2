"""T5 checkpoint loading: peak host memory while loading, load time, and encoder throughput.

    python benchmarks/t5_load.py                      # XL width (d_model 2048, d_ff 5120, 32 heads), 2 layers
    python benchmarks/t5_load.py --layers 4 --dtype bfloat16 --shards 3

Writes a synthetic Hugging Face-style checkpoint (random weights, written with safetensors from numpy, in
--shards shards plus the index json; reused if present), then loads it in a fresh process and measures
resident memory above the process baseline (after `import jax` and backend start-up) by sampling every
millisecond. The claim checked: peak load-time memory <= 1.3 x the final parameter bytes, i.e. the loader
never holds a second copy of the weights. Then times the jitted encoder on random ids (prompts/s).
Prints a table and writes JSON (machine, versions, numbers) to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_checkpoint(folder: pathlib.Path, cfg: dict, shards: int, seed: int = 0) -> None:
    """Random T5 v1.1 encoder tensors in HF names, split over `shards` safetensors files + index json."""
    from safetensors.numpy import save_file

    d, ff, inner = cfg["d_model"], cfg["d_ff"], cfg["num_heads"] * cfg["d_kv"]
    shapes = {
        "shared.weight": (cfg["vocab_size"], d),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, cfg["num_heads"]),
        "encoder.final_layer_norm.weight": (d,),
    }
    for i in range(cfg["num_layers"]):
        p = f"encoder.block.{i}.layer"
        shapes.update({f"{p}.0.layer_norm.weight": (d,), f"{p}.1.layer_norm.weight": (d,)})
        shapes.update({f"{p}.0.SelfAttention.{x}.weight": (inner, d) for x in "qkv"})
        shapes[f"{p}.0.SelfAttention.o.weight"] = (d, inner)
        shapes.update({f"{p}.1.DenseReluDense.{x}.weight": (ff, d) for x in ("wi_0", "wi_1")})
        shapes[f"{p}.1.DenseReluDense.wo.weight"] = (d, ff)
    names = sorted(shapes)
    groups = [names[i::shards] for i in range(shards)]  # interleaved: every shard holds several layers
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for s, group in enumerate(groups):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {n: (rng.standard_normal(shapes[n], dtype=np.float32) * 0.02) for n in group}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(group, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(
        json.dumps(dict(model_type="t5", feed_forward_proj="gated-gelu", **cfg))
    )


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(folder: pathlib.Path, dtype: str, batch: int, length: int, iters: int, fsdp: bool) -> dict:
    """Runs in a fresh process: load (with an RSS sampler), then encoder throughput."""
    import jax
    import jax.numpy as jnp

    from imagen_jax.parallel import axes
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.text import encoder as encoder_lib
    from imagen_jax.text import hf_loader

    jax.devices()
    jnp.zeros(1).block_until_ready()
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    config = hf_loader.read_t5_config(folder)
    mesh = rules = None
    if fsdp:  # every parameter's EMBED dimension split over all devices
        mesh = mesh_lib.make_mesh([("data", -1)])
        rules = mesh_lib.preset_rules("dp", [(axes.EMBED, "data")])
    params = hf_loader.load_t5_params(folder, config, encoder_lib.parse_dtype(dtype), mesh, rules)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], _rss())
    after = _rss()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    file_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    jdtype = encoder_lib.parse_dtype(dtype)
    module = hf_loader.T5Encoder(config, dtype=jdtype, param_dtype=jdtype)
    fn = jax.jit(encoder_lib.encode_tokens, static_argnums=0)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, config.vocab_size, (batch, length)), jnp.int32)
    mask = jnp.ones((batch, length), bool)
    t0 = time.perf_counter()
    fn(module, params, ids, mask).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(module, params, ids, mask).block_until_ready()
    step_s = (time.perf_counter() - t0) / iters
    return dict(
        params=int(sum(x.size for x in jax.tree.leaves(params))),
        param_bytes=param_bytes,
        file_bytes=file_bytes,
        rss_base=base,
        rss_peak=peak[0],
        rss_after=after,
        peak_over_base=peak[0] - base,
        peak_ratio=(peak[0] - base) / param_bytes,
        load_s=load_s,
        load_gb_s=file_bytes / load_s / 1e9,
        compile_s=compile_s,
        step_s=step_s,
        prompts_per_s=batch / step_s,
        backend=jax.default_backend(),
        device=str(jax.devices()[0].device_kind),
        device_count=jax.device_count(),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/imagen_t5_bench")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d_model", type=int, default=2048)
    parser.add_argument("--d_ff", type=int, default=5120)
    parser.add_argument("--num_heads", type=int, default=32)
    parser.add_argument("--vocab_size", type=int, default=32128)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--fsdp", type=int, default=0, help="N > 0: load sharded over N fake CPU devices")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "t5_load.json"))
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._measure:  # the child process
        r = measure(
            pathlib.Path(args._measure), args.dtype, args.batch, args.length, args.iters, args.fsdp > 0
        )
        print(json.dumps(r))
        return 0

    cfg = dict(
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        d_kv=64,
        d_ff=args.d_ff,
        num_heads=args.num_heads,
        num_layers=args.layers,
    )
    folder = pathlib.Path(args.dir) / "_".join(f"{k}{v}" for k, v in cfg.items()) / f"shards{args.shards}"
    if not (folder / "config.json").is_file():
        t0 = time.perf_counter()
        write_checkpoint(folder, cfg, args.shards)
        print(f"wrote {folder} in {time.perf_counter() - t0:.1f}s")
    # The device count flag must be set before the child imports jax.
    fake_devices = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={args.fsdp}"} if args.fsdp else {}
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--_measure",
            str(folder),
            "--dtype",
            args.dtype,
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
            "--iters",
            str(args.iters),
            "--fsdp",
            str(args.fsdp),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **fake_devices},
    )
    r = json.loads(child.stdout.strip().splitlines()[-1])

    import flax
    import jax
    import transformers

    mb = 1 / 2**20
    rows = [
        (
            "checkpoint",
            f"d_model {args.d_model}, d_ff {args.d_ff}, heads {args.num_heads}, {args.layers} layers, "
            f"{args.shards} shards",
        ),
        ("parameters", f"{r['params'] / 1e6:.1f} M ({r['param_bytes'] * mb:.0f} MiB as {args.dtype})"),
        ("files", f"{r['file_bytes'] * mb:.0f} MiB float32"),
        ("load time", f"{r['load_s']:.2f} s ({r['load_gb_s']:.2f} GB/s of file)"),
        ("RSS baseline", f"{r['rss_base'] * mb:.0f} MiB"),
        ("RSS peak during load", f"{r['rss_peak'] * mb:.0f} MiB (+{r['peak_over_base'] * mb:.0f} MiB)"),
        (
            "peak / param bytes",
            f"{r['peak_ratio']:.3f}  ({'OK' if r['peak_ratio'] <= 1.3 else 'OVER'} <= 1.3)",
        ),
        (
            "encoder",
            f"batch {args.batch} x {args.length} tokens: {r['step_s'] * 1e3:.0f} ms/batch, "
            f"{r['prompts_per_s']:.1f} prompts/s (compile {r['compile_s']:.1f} s)",
        ),
        ("device", f"{r['backend']} {r['device']} x{r['device_count']}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    result = dict(
        command=" ".join(sys.argv),
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor(),
            cpu_count=os.cpu_count(),
            python=platform.python_version(),
        ),
        versions=dict(
            jax=jax.__version__,
            flax=flax.__version__,
            numpy=np.__version__,
            transformers=transformers.__version__,
        ),
        config=dict(
            cfg,
            shards=args.shards,
            dtype=args.dtype,
            batch=args.batch,
            length=args.length,
            fsdp_devices=args.fsdp,
        ),
        results=r,
    )
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
