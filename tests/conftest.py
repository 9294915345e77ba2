"""Test setup: an 8-device CPU mesh for every test and one compilation cache for the session (both set
before jax is imported)."""

import os

# The tests' tiny programs spend far longer compiling than running, so they are compiled for that: at
# LLVM's optimisation level 0 and with XLA:CPU's older kernel emitters, which compile the tiny train step
# about a third faster (README gives the suite's time). On real models both make the step or its compile
# slower (docs/benchmarks.md), so no config sets them. A user's own XLA_FLAGS follow; the last value wins.
os.environ["XLA_FLAGS"] = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
    + os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# One persistent compilation cache for the whole session, through JAX's own settings (read from the
# environment when jax is imported): the tests compile the tiny config's train step, samplers and
# benchmarks again and again in other tests, other xdist workers and train.py subprocesses, which inherit
# this environment. The first process (pytest's, or xdist's controller) makes the folder and removes it at
# exit. A size limit makes JAX lock the folder around each read and write, so processes never read an
# entry another is still writing. Programs that compile in under half a second are not worth a file.
if not os.environ.get("IMAGEN_JAX_TEST_CACHE"):
    _cache = tempfile.mkdtemp(prefix="imagen_jax_test_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["IMAGEN_JAX_TEST_CACHE"] = _cache
SESSION_CACHE = os.environ["IMAGEN_JAX_TEST_CACHE"]
MIN_CACHE_SECONDS = 0.5
os.environ["JAX_COMPILATION_CACHE_DIR"] = SESSION_CACHE
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(MIN_CACHE_SECONDS)

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared beside the project root; tests needing it skip with a reason when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True)
def _session_compilation_cache():
    """Training and loading a stage point JAX's process-wide compilation cache at a config's folder;
    point it back at the session's afterwards, so no test compiles into or loads from another test's own
    folder."""
    yield
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHE_SECONDS)
    if jax.config.jax_compilation_cache_dir != SESSION_CACHE:
        compilation_cache.set_cache_dir(SESSION_CACHE)
        compilation_cache.reset_cache()


@pytest.fixture
def compilation_cache_hits():
    """A list that gets one entry each time JAX loads a program from the persistent compilation cache
    while the test runs."""
    import jax

    hits = []

    def record(event, **kwargs):
        hits.extend([event] if event == "/jax/compilation_cache/cache_hits" else [])

    jax.monitoring.register_event_listener(record)
    yield hits
    jax.monitoring.unregister_event_listener(record)
