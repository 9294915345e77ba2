"""Per-backend XLA compiler options from the config: parsing, clear errors, and that the train step and the
sampler are compiled with them; the compilation cache under the run's workdir."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

from configs.shapes import get_config
from imagen_jax.parallel import xla_options
from imagen_jax.stage import build as stage_lib
from imagen_jax.stage import sampling
from imagen_jax.training import loop
from imagen_jax.training import state as state_lib
from imagen_jax.training.config_checks import validate_config


def test_pairs_are_typed_as_xla_expects():
    spec = "xla_a=true xla_b=False xla_c=512 xla_d=0.5 xla_e=LIBRARY_FUSION_TYPE_DOT,X xla_f="
    assert xla_options.parse_options(spec) == {
        "xla_a": True,
        "xla_b": False,
        "xla_c": 512,
        "xla_d": 0.5,
        "xla_e": "LIBRARY_FUSION_TYPE_DOT,X",
        "xla_f": "",
    }
    assert xla_options.parse_options("  ") == {}


@pytest.mark.parametrize("spec", ["fast_math=true", "xla_cpu_enable_fast_math", "XLA_A=1"])
def test_malformed_pairs_name_the_config_key(spec):
    config = get_config("tiny")
    config.xla_options.gpu = spec
    with pytest.raises(ValueError, match=r"config\.xla_options\.gpu: .* is not an XLA option"):
        validate_config(config)


def test_only_the_running_backends_options_apply():
    options = ml_collections.ConfigDict(dict(cpu="xla_cpu_enable_fast_math=false", gpu="xla_gpu_x=1"))
    assert jax.default_backend() == "cpu"
    assert xla_options.compiler_options(options) == {"xla_cpu_enable_fast_math": False}
    # Another backend's options are parsed but not tried here (this XLA build may not know them).
    assert xla_options.compiler_options(options, backend="gpu") == {"xla_gpu_x": 1}
    assert xla_options.compiler_options(None) == {}  # configs older than the knob


def test_bf16_with_explicit_ynn_fusions_on_cpu_is_refused_not_a_compiler_crash():
    config = get_config("tiny")
    config.xla_options.cpu = "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    config.model.dtype = "bfloat16"
    with pytest.raises(ValueError, match="crashes XLA's CPU compiler.*--config.xla_options.cpu=''"):
        validate_config(config)
    config.xla_options.cpu = ""
    validate_config(config)
    config.xla_options.cpu = "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    config.model.dtype = "float32"
    validate_config(config)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("xla_no_such_option=1", "No such compile option: 'xla_no_such_option'"),
        ("xla_cpu_enable_fast_math=maybe", "not a valid bool value"),
    ],
)
def test_options_xla_refuses_fail_before_the_real_compile(spec, message):
    options = ml_collections.ConfigDict(dict(cpu=spec))
    with pytest.raises(ValueError, match=rf"config\.xla_options\.cpu='{spec}': XLA refused .*{message}"):
        xla_options.compiler_options(options)


def test_train_step_and_sampler_are_compiled_with_the_configs_options():
    config = get_config("tiny")
    stage = stage_lib.build_stage(config)
    optimizer = optax.sgd(0.1)
    state, shardings = state_lib.init_train_state(stage, optimizer, jax.random.PRNGKey(0))
    batch = {"image": jax.numpy.zeros((8, 32, 32, 3))}
    config.xla_options.cpu = "xla_no_such_option=1"
    with pytest.raises(ValueError, match="config.xla_options.cpu"):
        loop.compile_train_step(config, stage, optimizer, shardings, state, batch, {})
    with pytest.raises(ValueError, match="config.xla_options.cpu"):
        sampling.sample_program(config.xla_options)

    # One jitted sampler (and compile cache) per distinct set of options.
    a, b = get_config("tiny"), get_config("tiny")
    assert sampling.sample_program(a.xla_options) is sampling.sample_program(b.xla_options)
    b.xla_options.cpu = "xla_cpu_enable_fast_math=false"
    assert sampling.sample_program(a.xla_options) is not sampling.sample_program(b.xla_options)


def _cache_entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_compilation_cache_follows_the_runs_workdir(tmp_path, compilation_cache_hits):
    def cache_config(cache_dir):
        # Minimum 0: the tiny programs below compile in well under JAX's default of 1 s, so they are kept
        # only if the config's minimum reaches JAX.
        return ml_collections.ConfigDict(
            dict(compilation_cache_dir=cache_dir, compilation_cache_min_compile_seconds=0.0)
        )

    own = jax.config.jax_compilation_cache_dir  # JAX's own setting (the tests set one for the session)
    assert xla_options.use_compilation_cache(cache_config(""), str(tmp_path)) is None
    assert xla_options.use_compilation_cache(ml_collections.ConfigDict(), str(tmp_path)) is None  # old config
    assert jax.config.jax_compilation_cache_dir == own
    hits = compilation_cache_hits

    def compile_program(scale):
        jax.jit(lambda x: jnp.tanh(x) * scale).lower(jnp.ones((3, 5))).compile()

    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # JAX's default
    try:
        first = xla_options.use_compilation_cache(cache_config("cc"), str(tmp_path / "a"))
        assert first == str(tmp_path / "a" / "cc")
        compile_program(2.0)
        written = _cache_entries(tmp_path / "a" / "cc")
        assert written and not hits

        # A second run in the same process gets its own folder, not the first run's.
        absolute = str(tmp_path / "shared_cache")
        assert xla_options.use_compilation_cache(cache_config(absolute), str(tmp_path / "b")) == absolute
        compile_program(3.0)
        assert _cache_entries(tmp_path / "shared_cache") and not (tmp_path / "b").exists()
        assert _cache_entries(tmp_path / "a" / "cc") == written

        # Back in the first run's folder, the same program is loaded instead of compiled.
        xla_options.use_compilation_cache(cache_config("cc"), str(tmp_path / "a"))
        jax.clear_caches()
        compile_program(2.0)
        assert hits
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
