"""Preemption with real processes and real signals: SIGTERM/SIGINT stop cleanly at a verified checkpoint
that resumes bitwise, a second signal does not spoil the stop save, and kill -9 at random moments never
leaves an unfinished checkpoint as the latest."""

import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs.shapes import get_config
from imagen_jax.stage import build as stage_lib
from imagen_jax.stage import checkpoint
from imagen_jax.training import state as state_lib
from imagen_jax.training.state import make_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")


def _driver(root, workdir, num_steps, mode, timeout=300):
    args = [str(workdir), str(root / "data"), str(num_steps), mode, str(root / "compilation_cache")]
    cmd = [sys.executable, "tests/preemption_driver.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _restore(workdir, step=None):
    config = get_config("tiny")
    stage = stage_lib.build_stage(config)
    structs, _ = state_lib.abstract_train_state(stage, make_optimizer(config.optim, config.train.num_steps))
    restored, damaged = checkpoint.restore_newest_good(
        str(workdir), lambda _: state_lib.to_items(structs), None, step
    )
    assert not damaged
    return restored


def _assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 3 and 6) and the data folder the others share."""
    root = tmp_path_factory.mktemp("preemption")
    result = _driver(root, root / "straight", 6, "none")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, state_lib.from_items(_restore(root / "straight").items)


def _steps(workdir):
    return checkpoint.make_manager(str(workdir), create=False).all_steps()


@pytest.mark.parametrize(
    "mode,stop_step,saved",
    [
        ("term_in_save:3", 4, [3, 4]),  # SIGTERM while checkpoint 3 is written in the background
        ("term_twice:5", 5, [3, 5]),  # a second SIGTERM during the stop save is ignored, the save completes
    ],
)
def test_sigterm_stops_at_a_verified_checkpoint_that_resumes_bitwise(straight, mode, stop_step, saved):
    root, final = straight
    workdir = root / mode.replace(":", "_")
    stopped = _driver(root, workdir, 6, mode)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert f"stopped by SIGTERM at step {stop_step}: checkpoint" in stopped.stderr
    # What a run waits for before its first step is logged, in order, with the seconds it took.
    waits = (
        "compiled the train state's program in ",
        "train state initialised in ",
        "compiling the train step at ",
        "compiled the train step in ",
    )
    found = [stopped.stderr.find(line) for line in waits]
    assert -1 not in found and found == sorted(found), found
    if mode.startswith("term_twice"):
        assert "SIGTERM received again" in stopped.stderr
    assert list(_steps(workdir)) == saved
    assert _restore(workdir).step == stop_step
    assert not list(workdir.glob("checkpoints/*tmp*"))
    assert (workdir / "checkpoints" / str(stop_step) / "files.process_0.json").is_file()

    resumed = _driver(root, workdir, 6, "none")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint.checkpoint_dir(str(workdir))} at step {stop_step}" in resumed.stderr
    assert "train state restored in " in resumed.stderr and "train state's program" not in resumed.stderr
    _assert_bitwise_equal(state_lib.from_items(_restore(workdir).items), final)


def _train_cli(workdir, root, *overrides):
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        "configs/shapes.py:tiny",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={root / 'data'}",
        f"--config.compilation_cache_dir={root / 'compilation_cache'}",
        *overrides,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc, needle, timeout=240):
    deadline = time.monotonic() + timeout
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return seen
        assert time.monotonic() < deadline, "".join(seen[-30:])
    raise AssertionError(f"process ended before {needle!r}:\n" + "".join(seen[-30:]))


def test_train_py_stops_cleanly_on_a_signal_from_outside(straight, tmp_path):
    """The real command, signalled by another process at whatever moment the loop is in (SIGINT, as
    Ctrl-C sends; the driver runs above use SIGTERM)."""
    root, _ = straight
    sig = signal.SIGINT
    proc = _train_cli(
        tmp_path / "run",
        root,
        "--config.train.num_steps=100000",
        "--config.train.checkpoint_every=100000",
        "--config.train.log_every=1",
    )
    _wait_for_line(proc, "step 3/")
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, rest[-3000:]
    assert f"stopped by {sig.name} at step" in rest and "Traceback" not in rest
    step = int(rest.split(f"stopped by {sig.name} at step ")[1].split(":")[0])
    assert 3 <= step < 100000 and list(_steps(tmp_path / "run")) == [step]
    assert _restore(tmp_path / "run").step == step


def test_a_signal_before_the_first_step_ends_the_run_at_once(straight, tmp_path):
    root, _ = straight
    proc = _train_cli(tmp_path / "run", root)
    _wait_for_line(proc, "devices: ")  # setting up: data, state, compilation still to come
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, rest[-3000:]
    assert "SIGTERM before training started: stopped, nothing new to save" in rest
    assert not (tmp_path / "run" / "checkpoints").is_dir() or not list(_steps(tmp_path / "run"))


def test_kill_9_at_random_moments_never_leaves_an_unfinished_latest_checkpoint(straight, tmp_path):
    """Restart after restart killed with SIGKILL, mid-step, mid-save or mid-start-up: every checkpoint
    Orbax lists verifies, and the run still ends bitwise equal to one never interrupted."""
    root, reference = straight  # the same 6 steps, never interrupted
    overrides = (
        "--config.train.num_steps=6",
        "--config.train.checkpoint_every=1",
        "--config.train.log_every=1",
    )

    rng = random.Random(0)
    workdir = tmp_path / "killed"
    kills = 0
    for _ in range(4):
        proc = _train_cli(workdir, root, *overrides)
        if rng.random() < 0.7:
            try:
                _wait_for_line(proc, "/6 [")
            except AssertionError:  # finished already
                pass
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate(timeout=120)
        steps = list(_steps(workdir)) if (workdir / "checkpoints").is_dir() else []
        for step in steps:  # every checkpoint Orbax would offer is whole and verifies
            assert _restore(workdir, step).step == step
        if steps and max(steps) == 6:
            break
    assert kills >= 2
    final = _train_cli(workdir, root, *overrides)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err[-3000:]
    _assert_bitwise_equal(state_lib.from_items(_restore(workdir).items), reference)
    shutil.rmtree(workdir)
