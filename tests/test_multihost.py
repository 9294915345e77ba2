"""A real multi-host run on localhost: two processes with 4 CPU devices each join through
`jax.distributed.initialize` (gloo collectives) and train the tiny model with FSDP over all 8 devices.
They match the one-process 8-device run, save collectively, resume after both are killed with each
host's input stream where it stopped, and stop together when one of them gets SIGTERM."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    # conftest's XLA flags (the tests' faster-compiling LLVM level) with this process's device count
    # appended: XLA takes the last value of a flag.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


def _run(root, name, mode, processes=2, num_steps=NUM_STEPS, timeout=600):
    """Starts the driver's processes together; (return codes, per-process records, stderr tails)."""
    port = _free_port()
    procs, outs = [], []
    for index in range(processes):
        out = root / f"{name}.{mode.replace(':', '_')}.{index}.json"
        args = [str(index), str(processes), str(port), str(root / name), str(root / "data"), str(num_steps)]
        cmd = [sys.executable, "tests/multihost_driver.py", *args, mode, str(out)]
        log = open(root / f"{out.name}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=_env(8 // processes), stdout=log, stderr=log), log))
        outs.append(out)
    if mode.startswith("kill_at_step"):
        # Each driver parks at the kill point once its record is written; kill all of them together.
        ready = [pathlib.Path(f"{out}.ready") for out in outs]
        deadline = time.monotonic() + timeout
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            if any(proc.poll() is not None for proc, _ in procs):
                break  # one died before the kill point: its code and log say why
            time.sleep(0.1)
        for proc, _ in procs:
            proc.send_signal(signal.SIGKILL)
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        finally:
            proc.kill()
            log.close()
    tails = [(root / f"{out.name}.log").read_text()[-3000:] for out in outs]
    records = [json.loads(out.read_text()) if out.exists() else None for out in outs]
    return codes, records, tails


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run on 8 devices (it also prepares the data folder the others read)."""
    root = tmp_path_factory.mktemp("multihost")
    codes, records, tails = _run(root, "single", "run", processes=1)
    assert codes == [0], tails[0]
    return root, records[0]


def test_two_processes_train_like_one_and_resume_each_hosts_stream_after_both_are_killed(single):
    root, one = single
    # Both processes are killed together (SIGKILL) while fetching step 5's batch, after checkpoint 3 is
    # written.
    codes, killed, tails = _run(root, "two", "kill_at_step:5")
    assert codes == [-9, -9], tails
    # Rerunning both resumes from checkpoint 3 and trains to the end.
    codes, resumed, tails = _run(root, "two", "run")
    assert codes == [0, 0], tails
    for index in range(2):
        # The losses of steps 1-4 (before the kill) and 4-6 (after) are the one-process run's.
        losses = {**killed[index]["losses"], **resumed[index]["losses"]}
        assert sorted(losses) == sorted(one["losses"]) == [str(s) for s in range(1, NUM_STEPS + 1)]
        for step, loss in losses.items():
            np.testing.assert_allclose(loss, one["losses"][step], rtol=1e-5, err_msg=f"step {step}")
        # The parameters resumed are bitwise those saved, on both hosts.
        assert resumed[index]["restored"] == killed[index]["saved"]["3"]
        assert resumed[index]["restored"] == killed[1 - index]["saved"]["3"]
    # Each host reads its own half of every global batch, in the one-process run's row order, and after
    # the resume continues exactly where its stream was at the checkpoint.
    for step in range(1, NUM_STEPS + 1):
        key = str(step)
        source = killed if step <= 3 else resumed
        halves = [source[index]["scenes"][key] for index in range(2)]
        assert halves[0] + halves[1] == one["scenes"][key], f"step {step}"
        assert not set(halves[0]) & set(halves[1])
    assert sorted(resumed[0]["scenes"]) == ["4", "5", "6"]
    # The final checkpoints agree.
    assert resumed[0]["saved"][str(NUM_STEPS)] == resumed[1]["saved"][str(NUM_STEPS)]


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(single):
    root, _ = single
    # Only process 1 gets SIGTERM (while fetching step 4's batch, so step 4 is its last local step); the
    # vote reaches process 0 one step later and both save that step.
    codes, records, tails = _run(root, "term", "term_at_step:4")  # the killed run's programs, from the cache
    assert codes == [0, 0], tails
    assert records[0]["stopped_at"] == records[1]["stopped_at"] == 5, [r["stopped_at"] for r in records]
    assert records[0]["saved"]["5"] == records[1]["saved"]["5"]
    assert "stopped by a stop request on another process at step 5" in tails[0], tails[0]
    assert "stopped by SIGTERM at step 5" in tails[1], tails[1]
