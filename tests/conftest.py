"""Test setup: an 8-device CPU mesh for every test (the flag must be set before jax is imported)."""

import os

# LLVM's optimisation level 0: the tests' tiny programs spend far longer compiling than running, and
# unoptimised kernels compile faster (README gives the suite's time). On real models it makes the step much
# slower (docs/benchmarks.md), so no config sets it. A user's own XLA_FLAGS follow it; the last value wins.
os.environ["XLA_FLAGS"] = (
    "--xla_backend_optimization_level=0 "
    + os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared beside the project root; tests needing it skip with a reason when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True)
def _unset_compilation_cache():
    """Training and loading a stage point JAX's process-wide compilation cache at the test's workdir;
    unset it afterwards so no test compiles into or loads from another test's cache."""
    yield
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_compilation_cache_dir is not None:
        compilation_cache.set_cache_dir(None)
        compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def shared_compilation_cache(tmp_path_factory) -> str:
    """One persistent compilation cache for runs of the same tiny programs in many workdirs and
    processes (`config.compilation_cache_dir`), so each compiles once per session, not once per run."""
    return str(tmp_path_factory.mktemp("compilation_cache"))


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
