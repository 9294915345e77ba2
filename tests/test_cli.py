"""train.py / sample.py as a user runs them: a mistake ends with one `error:` line and a non-zero exit, no
traceback (unless --verbose or IMAGEN_JAX_VERBOSE=1), and every config key, lists included, can be
overridden on the command line. Each case fails before anything is compiled (~2 s per process)."""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from imagen_jax import errors
from imagen_jax.cascade.sampling_cli import read_prompts, sample_to_grid
from imagen_jax.data.prompts import read_prompt_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/shapes.py:tiny"
DRAWBENCH = ROOT.parent / "shared" / "data" / "drawbench.csv"


def _run(script: str, *args: str, verbose_env: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA_FLAGS from conftest: 8 CPU devices
    env.pop("IMAGEN_JAX_VERBOSE", None)
    if verbose_env:
        env["IMAGEN_JAX_VERBOSE"] = "1"
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, message: str, status: int) -> None:
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors_ = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors_) == 1 and message in errors_[0], proc.stderr


def _train(tmp_path: pathlib.Path, *args: str, **kw: bool) -> subprocess.CompletedProcess:
    return _run("train.py", "--config", TINY, "--workdir", str(tmp_path / "run"), *args, **kw)


@pytest.mark.parametrize(
    "args, message, status",
    [
        # Command-line mistakes (exit 2).
        (
            ["--config.train.num_step=5"],
            "--config.train.num_step: config.train has no key 'num_step'; did you mean num_steps?",
            2,
        ),
        (["--config.trian.batch_size=4"], "config has no key 'trian'; did you mean train?", 2),
        (
            ["--config.train.batch_size=abc"],
            "--config.train.batch_size=abc: config.train.batch_size takes an int",
            2,
        ),
        (["--bogus=1"], "Unknown command line flag 'bogus'", 2),
        (["extra_argument"], "unexpected arguments: ['extra_argument']", 2),
        # Values that parse but cannot work: validate_config, before any compilation (exit 1).
        (["--config.sample.sampler=foo"], "config.sample.sampler='foo' is not one of", 1),
        # One pair without the outer tuple: ml_collections accepts it as a flat tuple.
        (["--config.mesh=('data', 8)"], "config.mesh=('data', 8) must be a non-empty tuple of", 1),
        # List overrides are applied: each error below shows the overridden value.
        (
            ["--config.mesh=(('model', -1),)"],
            "config.mesh axis 'model' is not one of ('data', 'fsdp', 'tensor')",
            1,
        ),
        (
            ["--config.mesh=(('data', -1),)", "--config.sharding.rules=(('embed', 'fsdp'),)"],
            "config.sharding.rules names mesh axis 'fsdp' (for 'embed'), which config.mesh=(('data', -1),) "
            "does not have",
            1,
        ),
        (["--config.sharding.preset=zero3"], "config.sharding.preset='zero3' is not one of", 1),
        (
            ["--config.train.sample_every=1", "--config.train.sample_prompts=()"],
            "config.train.sample_prompts=() must be a non-empty tuple of strings",
            1,
        ),
        # The U-Net's own checks run here too, before the data and text encoder are prepared.
        (["--config.model.channels=0"], "model.channels=0 must be an int >= 1", 1),
        (
            ["--config.model.channel_mults=(1, 2, 4)"],
            "config.model.self_attention=(False, True) has 2 entries but model.channel_mults=(1, 2, 4)",
            1,
        ),
        # The mesh override reaches the device mesh: 2 x 4 over the 8 CPU devices, batch over both.
        (
            ["--config.mesh=(('data', 2), ('tensor', -1))", "--config.train.batch_size=3"],
            "batch size 3 does not divide over the 2 devices of mesh axes ('data',) "
            "(mesh {'data': 2, 'tensor': 4})",
            1,
        ),
        (
            ["--config.mesh=(('data', 2), ('fsdp', -1))", "--config.train.batch_size=6"],
            "batch size 6 does not divide over the 8 devices of mesh axes ('data', 'fsdp')",
            1,
        ),
    ],
)
def test_train_mistakes_are_one_line(tmp_path, args, message, status):
    _assert_one_line_error(_train(tmp_path, *args), message, status)


def test_joining_mistakes_are_one_line(tmp_path):
    numbering = _train(tmp_path, "--num_processes=2", "--process_id=5")
    _assert_one_line_error(numbering, "--process_id=5 must be >= 0 and < --num_processes=2", 1)
    alone = _train(tmp_path, "--distributed")  # no coordinator in this environment
    _assert_one_line_error(alone, "could not join the multi-process run (given: none): ", 1)
    assert ".." not in alone.stderr.split("error: ", 1)[1]  # JAX's sentence and ours, one full stop


def test_train_missing_or_broken_config_file(tmp_path):
    missing = _run("train.py", "--config", "configs/nope.py", "--workdir", str(tmp_path))
    _assert_one_line_error(missing, "--config=configs/nope.py: config file 'configs/nope.py' not found.", 2)
    variant = _run("train.py", "--config", "configs/shapes.py:huge", "--workdir", str(tmp_path))
    _assert_one_line_error(variant, "variant 'huge': use 'demo', 'words' or 'tiny'.", 2)
    no_workdir = _run("train.py", "--config", TINY)
    _assert_one_line_error(no_workdir, "--workdir is required.", 2)


def test_verbose_shows_the_traceback(tmp_path):
    for proc in (
        _train(tmp_path, "--config.train.num_step=5", "--verbose"),
        _train(tmp_path, "--config.sample.sampler=foo", "--verbose"),
        _train(tmp_path, "--config.sample.sampler=foo", verbose_env=True),
    ):
        assert proc.returncode != 0
        assert "Traceback (most recent call last)" in proc.stderr, proc.stderr
    assert "ConfigError: config.sample.sampler='foo'" in proc.stderr


@pytest.mark.parametrize(
    "args, message, status",
    [
        (
            ["--sampler=foo", "--prompt=x"],
            "--sampler=foo: value should be one of <ddpm|ddim|dpmpp2m|dpmpp2m_sde>",
            2,
        ),
        (["--threshold=maybe", "--prompt=x"], "--threshold=maybe: value should be one of", 2),
        (["--num=0", "--prompt=x"], "--num must be >= 1, got 0.", 2),
        (["--steps=0", "--prompt=x"], "--steps must be >= 1, got 0.", 2),
        ([], "no prompts: pass --prompt TEXT", 2),
        (["--prompts_file=/nonexistent/prompts.txt"], "'/nonexistent/prompts.txt' does not exist.", 1),
        # Before the checkpoint is looked for: before, only after sampling.
        (["--prompt=x", "--out=grid.pgn"], "unknown image file extension '.pgn' in grid.pgn; use e.g.", 2),
        (["--prompt=x", "--eta=1.5"], "--eta must be in [0, 1], got 1.5.", 2),
    ],
)
def test_sample_mistakes_are_one_line(tmp_path, args, message, status):
    proc = _run("sample.py", "--workdir", str(tmp_path), *args)
    _assert_one_line_error(proc, message, status)


def test_prompts_file_errors_are_user_errors(tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a red circle\n\n\xe9t\xe9 bleu\n")
    with pytest.raises(errors.DataError, match=r"prompts.txt' line 3 is not UTF-8 \(byte 0xe9 at column 1\)"):
        read_prompts([], str(bad))
    good = tmp_path / "good.txt"
    good.write_bytes(b"\xef\xbb\xbfa red circle\r\n\r\n\xc3\xa9t\xc3\xa9\n")  # BOM, CRLF, UTF-8
    assert read_prompts(["x"], str(good)) == ["x", "a red circle", "été"]
    # Still catchable as the built-in types library callers expect.
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts([], str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts([], None)
    with pytest.raises(errors.UsageError, match="--num must be >= 1"):
        sample_to_grid(str(tmp_path), prompts=["x"], prompts_file=None, num=0, out="g.png")
    for options, message in (({"eta": 1.5}, "--eta must be in"), ({"aug_level": -0.1}, "--sr_aug_level")):
        with pytest.raises(errors.UsageError, match=message):
            sample_to_grid(str(tmp_path), prompts=["x"], prompts_file=None, num=1, out="g.png", **options)


def test_one_prompt_reader_for_text_csv_and_json(tmp_path):
    """sample.py and `python -m imagen_jax.text.encode` read prompt files alike (`data.prompts`)."""
    drawbench = read_prompt_file(DRAWBENCH, keep_blank=False)
    assert len(drawbench) == 200 and drawbench[0] == "A red colored car."
    assert read_prompts([], str(DRAWBENCH)) == drawbench
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\na blue square\n")
    # encode keeps a blank line (the unconditional prompt); sample.py skips it
    assert read_prompt_file(text, keep_blank=True) == ["a red circle", "", "a blue square"]
    assert read_prompt_file(text, keep_blank=False) == ["a red circle", "a blue square"]
    listed = tmp_path / "p.json"
    listed.write_text('["a", ""]')
    assert read_prompt_file(listed, keep_blank=False) == ["a", ""]
    for name, content, message in (
        ("cols.csv", "text,category\na,b\n", r"has no 'prompt' column \(columns: \['text', 'category'\]\)"),
        ("bad.json", '{"prompt": "a"}', "must hold a JSON list of strings"),
        ("broken.json", '["a",', "is not JSON"),
    ):
        (tmp_path / name).write_text(content)
        with pytest.raises(errors.DataError, match=message):
            read_prompt_file(tmp_path / name, keep_blank=False)
    with pytest.raises(errors.InputFileNotFoundError, match="is not a file"):
        read_prompt_file(tmp_path, keep_blank=False)


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return _run("-m", module, *args)


EVAL = "imagen_jax.evaluation.shapes"


@pytest.mark.parametrize(
    "module, args, message, status",
    [
        (EVAL, ["--sampler", "ddpm,foo"], "argument --sampler: 'foo' is not one of ddpm, ddim", 2),
        (EVAL, ["--steps", "25,x"], "argument --steps: 'x' is not an integer", 2),
        (EVAL, ["--num", "0"], "argument --num: '0' is below 1", 2),
        (EVAL, ["--guidance", "1,abc"], "argument --guidance: 'abc' is not a number", 2),
        (EVAL, [], "no checkpoints in", 1),  # before: CheckpointNotFoundError's traceback
        (EVAL + "_sr", ["--aug_level", "2"], "argument --aug_level: '2' is above 1", 2),
        (EVAL + "_sr", [], "no checkpoints in", 1),
    ],
)
def test_evaluation_mistakes_are_one_line(tmp_path, module, args, message, status):
    _assert_one_line_error(_run_module(module, "--workdir", str(tmp_path), *args), message, status)


def test_encode_mistakes_are_one_line(tmp_path):
    args = ["--t5", str(tmp_path / "t5"), "--out", str(tmp_path / "e.npz")]
    missing = _run_module("imagen_jax.text.encode", *args, "--prompts_file", str(tmp_path / "p.txt"))
    _assert_one_line_error(missing, "prompts file", 1)
    (tmp_path / "p.txt").write_text("a corgi\n")
    no_t5 = _run_module("imagen_jax.text.encode", *args, "--prompts_file", str(tmp_path / "p.txt"))
    _assert_one_line_error(no_t5, "T5 checkpoint folder", 1)
    short = _run_module("imagen_jax.text.encode", *args, "--prompts_file", "x", "--max_length", "1")
    _assert_one_line_error(short, "argument --max_length: '1' is below 2", 2)


def _leaves(config: ml_collections.ConfigDict, prefix: str = "config"):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


@pytest.mark.parametrize(
    "module, variants",
    [
        ("shapes", [None, "tiny"]),
        ("bench_tiny", [None]),
        ("bench_small", [None]),
        ("imagen_base64", [None, "paper"]),
    ],
)
def test_every_config_key_is_overridable(module, variants):
    """ml_collections overrides bool/int/float/str/tuple fields only: a list in a config could not be set from
    the command line (write a tuple instead)."""
    for variant in variants:
        config = importlib.import_module(f"configs.{module}").get_config(variant)
        bad = [
            (key, type(v).__name__)
            for key, v in _leaves(config)
            if not isinstance(v, (bool, int, float, str, tuple))
        ]
        assert not bad, f"configs/{module}.py:{variant} has keys the command line cannot override: {bad}"
