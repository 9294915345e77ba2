"""XLA compiler options per backend, from `config.xla_options`: the one place every compiled program
(train step, sampler) gets them, so a run's compiler settings live in its config and checkpoint. Also
where a run's compiled programs are kept between processes (`config.compilation_cache_dir`).

`config.xla_options` maps a backend ("cpu", "gpu", "tpu") to space-separated `name=value` pairs, e.g.
`--config.xla_options.gpu="xla_gpu_enable_latency_hiding_scheduler=true"`. Only the running backend's
entry applies. Values are typed as XLA expects: true/false -> bool, integers -> int, decimals -> float,
anything else (an empty value included) -> string.
"""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental.compilation_cache import compilation_cache

from imagen_jax.errors import ConfigError

OptionValue = bool | int | float | str
_NAME = re.compile(r"^xla_[a-z0-9_]+$")


def _typed(value: str) -> OptionValue:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_options(spec: str, *, key: str = "xla_options") -> dict[str, OptionValue]:
    """`"xla_a=1 xla_b=true"` -> {"xla_a": 1, "xla_b": True}; a malformed pair names itself and `key`."""
    options: dict[str, OptionValue] = {}
    for pair in spec.split():
        name, sep, value = pair.partition("=")
        if not sep or not _NAME.match(name):
            raise ConfigError(
                f"config.{key}: {pair!r} is not an XLA option; write space-separated name=value pairs whose "
                "names start with 'xla_', e.g. 'xla_cpu_enable_fast_math=false'."
            )
        options[name] = _typed(value)
    return options


def compiler_options(
    xla_options: ml_collections.ConfigDict | None, backend: str | None = None
) -> dict[str, OptionValue]:
    """The options for `backend` (default: JAX's default backend) to pass to `jax.jit(compiler_options=)`.

    Configs written before this knob existed (e.g. restored from old checkpoints) have none: no options.
    """
    backend = backend or jax.default_backend()
    return dict(_checked(backend, _spec(xla_options, backend)))


def _spec(xla_options: ml_collections.ConfigDict | None, backend: str) -> str:
    return "" if xla_options is None else xla_options.get(backend, "")


@functools.cache
def _checked(backend: str, spec: str) -> tuple[tuple[str, OptionValue], ...]:
    """Parsed options, tried once on a trivial program so a name or value XLA does not know fails here,
    naming the config key, rather than deep inside the first real compile."""
    key = f"xla_options.{backend}"
    options = parse_options(spec, key=key)
    if options and backend == jax.default_backend():
        try:
            jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros(())).compile()
        except Exception as e:  # XLA raises a runtime error type that jax does not export stably
            raise ConfigError(f"config.{key}={spec!r}: XLA refused these options: {e}") from None
    return tuple(options.items())


# In jax 0.10.2, explicitly enabled YNNPACK fusion types abort XLA's CPU compiler (a failed CHECK in its
# YNN emitter, killing the process) when the model computes in bf16.
_YNN_TYPES = "xla_cpu_experimental_ynn_fusion_type"


def check_model_dtype(
    xla_options: ml_collections.ConfigDict | None, dtype: str, backend: str | None = None
) -> None:
    """Refuses bf16 compute with explicit YNNPACK fusions on CPU, which would crash the compiler."""
    backend = backend or jax.default_backend()
    ynn_types = parse_options(_spec(xla_options, backend)).get(_YNN_TYPES)
    if backend == "cpu" and dtype == "bfloat16" and ynn_types:
        raise ConfigError(
            f"config.model.dtype='bfloat16' with {_YNN_TYPES} in config.xla_options.cpu crashes XLA's CPU "
            "compiler (jax 0.10.2). On CPU keep model.dtype='float32' (faster here), or drop the option: "
            "--config.xla_options.cpu=''."
        )


def use_compilation_cache(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> str | None:
    """Points JAX's persistent compilation cache at `config.compilation_cache_dir` (a relative path is
    under `workdir`), so a resumed or restarted run, and sampling from its workdir, load the compiled train
    step and samplers instead of compiling them again (on GPU that is a minute for a small U-Net, README).
    Programs that compiled faster than `config.compilation_cache_min_compile_seconds` are not kept.
    Returns the cache path; `""` sets nothing (JAX's own setting, e.g. $JAX_COMPILATION_CACHE_DIR, stays),
    nor do configs saved before the key existed, and returns None. `workdir` or the cache folder may be a
    `gs://` URL: JAX's cache reaches non-local folders itself (through etils epath).
    """
    cache_dir = config.get("compilation_cache_dir", "")
    if not cache_dir:
        return None
    # Plain string joins: JAX takes the folder as a string, and "gs://..." must stay a URL.
    path = cache_dir if os.path.isabs(cache_dir) or "://" in cache_dir else os.path.join(workdir, cache_dir)
    min_seconds = config.get("compilation_cache_min_compile_seconds")
    if min_seconds is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_seconds))
    previous = jax.config.jax_compilation_cache_dir
    if previous != path:
        compilation_cache.set_cache_dir(path)
        if previous is not None:
            # JAX opens its cache once per process, at the first compile after a folder is set: without
            # this, a second run in the same process (a notebook, the tests) would write to the first's.
            compilation_cache.reset_cache()
    return path
