"""Checkpoint integrity: content digests, file manifests, fallback past damaged checkpoints, no NaN saved,
and retention that never drops the last read-back checkpoint for an unverified newer one."""

import dataclasses
import glob
import logging
import os
import re
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs.shapes import get_config
from imagen_jax.errors import CheckpointDamagedError, CheckpointError, NonFiniteError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import build as stage_lib
from imagen_jax.stage import checkpoint, integrity, sampling, stacking
from imagen_jax.training import loop
from imagen_jax.training import state as state_lib
from imagen_jax.training.state import TrainState, make_optimizer


def _config(root, **train):
    config = get_config("tiny")
    config.data.data_dir = str(root / "data")
    config.train.update({"num_steps": 4, "checkpoint_every": 2, "log_every": 2, **train})
    return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step tiny run with checkpoints 2 and 4, and its final state."""
    root = tmp_path_factory.mktemp("integrity")
    config = _config(root)
    state = loop.train_and_evaluate(config, str(root / "run"))
    return root, config, jax.tree.map(np.asarray, state)


_STRUCTS: dict[str, dict] = {}


def _structs(config):
    """The abstract train state items of `config`, traced once per config: most tests here restore the
    same run's checkpoints, and tracing the model for each restore cost a second."""
    key = config.to_json_best_effort(sort_keys=True)
    if key not in _STRUCTS:
        stage = stage_lib.build_stage(config)
        optimizer = make_optimizer(config.optim, config.train.num_steps)
        _STRUCTS[key] = state_lib.to_items(state_lib.abstract_train_state(stage, optimizer)[0])
    return _STRUCTS[key]


# --- content digests ----------------------------------------------------------------------------------


def test_digests_are_the_same_on_any_sharding_and_catch_any_change():
    x = jnp.arange(8 * 6 * 4, dtype=jnp.float32).reshape(8, 6, 4) / 7.0
    mesh = mesh_lib.make_mesh((("data", -1),))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    single = jax.device_put(x, jax.devices()[0])
    tree = {"a": x, "b": jnp.ones((3,), jnp.bfloat16), "step": jnp.int32(7), "key": jax.random.PRNGKey(0)}
    digest, nonfinite = integrity.digest_tree(tree)
    assert nonfinite == [] and set(digest) == {"a", "b", "step", "key"}
    assert integrity.digest_tree({"a": sharded})[0]["a"] == integrity.digest_tree({"a": single})[0]["a"]
    assert digest["a"] == integrity.digest_tree({"a": sharded})[0]["a"]

    flat = np.asarray(x).reshape(-1).view(np.uint32)
    changed = set()
    for i, bit in [(0, 0), (5, 31), (100, 7), (191, 22)]:  # one flipped bit anywhere
        y = flat.copy()
        y[i] ^= np.uint32(1 << bit)
        changed.add(integrity.digest_tree({"a": jnp.asarray(y.view(np.float32).reshape(x.shape))})[0]["a"])
    swapped = np.asarray(x).reshape(-1).copy()
    swapped[[3, 4]] = swapped[[4, 3]]  # same values, other positions
    changed.add(integrity.digest_tree({"a": jnp.asarray(swapped.reshape(x.shape))})[0]["a"])
    assert digest["a"] not in changed and len(changed) == 5


def test_digests_name_the_non_finite_arrays():
    tree = {
        "ok": jnp.ones(3),
        "nan": jnp.array([1.0, jnp.nan]),
        "inf": jnp.array([jnp.inf]),
        "i": jnp.int32(1),
    }
    _, nonfinite = integrity.digest_tree(tree)
    assert sorted(nonfinite) == ["inf", "nan"]


def test_a_stack_of_parameters_holding_nan_is_named_by_them():
    """Weights held stacked by shape (`optim.stack_by_shape`): the refusal names the parameters a stack
    holds, not only its index."""
    bad = jnp.array([[jnp.nan, 1.0], [1.0, 1.0]])
    held = stacking.stack({"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": bad}, "c": jnp.ones(3)})
    tree = {"unet": held}
    _, nonfinite = integrity.digest_tree(tree)
    readable = integrity.readable_paths(tree)
    assert [readable.get(path, path) for path in nonfinite] == ["unet/stacks/0 (a/kernel and 1 more)"]
    assert readable["unet/stacks/1"] == "unet/stacks/1 (c)"


# --- damaged checkpoints ---------------------------------------------------------------------------------


def _array_files(step_dir):
    """Every array data file: damage to all of them reaches the arrays (OCDBT may leave a data file that
    no array reads, whose damage a restore would rightly never see). Orbax's finalisation may also have
    merged the per-process OCDBT trees into one at the item's root, with data files of its own."""
    files = glob.glob(f"{step_dir}/ema_params/ocdbt.process_*/d/*") + glob.glob(f"{step_dir}/ema_params/d/*")
    assert files, f"no array data files under {step_dir}/ema_params"
    return files


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _zero(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(b"\0" * size)


def _flip(path):
    data = bytearray(open(path, "rb").read())
    for k in range(4):
        data[len(data) // 2 + k] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _empty(path):
    open(path, "w").close()


# Array data is damaged in the EMA weights (what sampling reads), metadata in the optimizer's item (a tree
# of optax states that Orbax cannot rebuild without it; a plain dict of weights restores without it).
DAMAGE = {
    "truncated array data": lambda d: [_truncate(f) for f in _array_files(d)],
    "zeroed array data": lambda d: [_zero(f) for f in _array_files(d)],
    "flipped array bytes": lambda d: [_flip(f) for f in _array_files(d)],
    "emptied array metadata": lambda d: _empty(f"{d}/train/_METADATA"),
    "emptied OCDBT manifest": lambda d: _empty(f"{d}/train/manifest.ocdbt"),
    "deleted array metadata": lambda d: os.remove(f"{d}/train/_METADATA"),
    "emptied config": lambda d: _empty(f"{d}/config/metadata"),
    "deleted config": lambda d: os.remove(f"{d}/config/metadata"),
    "deleted digests": lambda d: shutil.rmtree(f"{d}/integrity"),
}
# What names the damage: the file manifest (fast, exact file) when present, else the restore itself.
WITH_MANIFEST = {
    "truncated array data": r"ema_params/(ocdbt.process_0/)?d/\w+ is \d+ bytes, \d+ when written",
    "zeroed array data": r"ema_params/(ocdbt.process_0/)?d/\w+ changed after it was written",
    "flipped array bytes": r"ema_params/(ocdbt.process_0/)?d/\w+ changed after it was written",
    "emptied array metadata": r"train/_METADATA is 0 bytes",
    "emptied OCDBT manifest": r"train/manifest.ocdbt is 0 bytes",
    "deleted array metadata": r"train/_METADATA is missing",
    "emptied config": r"config/metadata is 0 bytes",
    "deleted config": r"config/metadata is missing",
    "deleted digests": r"integrity/\S+ is missing",
}
WITHOUT_MANIFEST = {
    "truncated array data": r"ema_params: OUT_OF_RANGE: .*Error reading .* byte range",
    "zeroed array data": r"ema_params: \w+: .*Error reading",
    # Flipped bytes inside compressed chunks either decode to other values (the digests catch them) or
    # fail to decode: both are named.
    "flipped array bytes": r"ema_params: ([\w/]+: content differs from the saved|\w+: .*Error reading)",
    "emptied array metadata": r"train: JSONDecodeError",
    "emptied OCDBT manifest": r"train: DATA_LOSS: .*manifest.ocdbt",
    "deleted array metadata": r"train: \w+",
    "emptied config": r"config: JSONDecodeError",
    "deleted config": r"config: FileNotFoundError",
    "deleted digests": r"integrity/ is missing: no content digests",
}


def _damaged_copy(root, name, damage, manifest=True):
    workdir = root / name.replace(" ", "_") / ("with_manifest" if manifest else "without_manifest")
    shutil.copytree(root / "run", workdir)
    step_dir = workdir / "checkpoints" / "4"
    if not manifest:
        os.remove(step_dir / "files.process_0.json")
    DAMAGE[damage](str(step_dir))
    return workdir


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no_manifest"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished_run, damage, manifest, caplog):
    root, config, _ = finished_run
    workdir = _damaged_copy(root, damage, damage, manifest)
    with caplog.at_level(logging.WARNING, logger="imagen_jax"):
        restored, damaged = checkpoint.restore_newest_good(str(workdir), lambda _: _structs(config), config)
    assert restored.step == 2 and len(damaged) == 1
    expected = (WITH_MANIFEST if manifest else WITHOUT_MANIFEST)[damage]
    assert damaged[0].path.endswith("checkpoints/4")
    assert re.search(expected, damaged[0].cause), damaged[0].cause
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "imagen_jax"
    ]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "checkpoints/4 is damaged: " in warnings[0]
    assert len(warnings[0]) < 800


def test_training_resumes_past_a_damaged_checkpoint_and_sets_it_aside(finished_run, caplog):
    """Flipped bytes and no file manifest: training falls back to step 2, moves step 4 to
    checkpoints_damaged/, trains steps 3-4 again and arrives at exactly the state it had saved."""
    root, config, final = finished_run
    workdir = _damaged_copy(root, "resume", "flipped array bytes", manifest=False)
    with caplog.at_level(logging.WARNING, logger="imagen_jax"):
        state = loop.train_and_evaluate(config, str(workdir))
    assert any("checkpoints/4 is damaged: ema_params: " in r.getMessage() for r in caplog.records)
    assert len(os.listdir(workdir / "checkpoints_damaged")) == 1
    assert int(state.step) == 4
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert checkpoint.restore_newest_good(str(workdir), lambda _: _structs(config), config)[0].step == 4


def test_sampling_falls_back_unless_the_step_was_asked_for(finished_run, caplog):
    root, _, _ = finished_run
    workdir = _damaged_copy(root, "sampling", "zeroed array data")
    with caplog.at_level(logging.WARNING, logger="imagen_jax"):
        stage = stage_lib.load_stage(str(workdir))
    assert any("checkpoints/4 is damaged" in r.getMessage() for r in caplog.records)
    images = sampling.generate(stage, ["a red circle"], rng=jax.random.PRNGKey(0), num_steps=2)
    assert images.dtype == np.uint8
    with pytest.raises(CheckpointDamagedError, match=r"checkpoints/4 is damaged: .* Leave out the step"):
        stage_lib.load_stage(str(workdir), step=4)
    assert stage_lib.load_stage(str(workdir), step=2).params is not None
    assert os.path.isdir(workdir / "checkpoints" / "4")  # sampling never moves files


def test_sampling_reads_only_the_ema_weights(finished_run):
    """With the optimizer item gone (and no manifest to notice it), sampling still loads step 4's EMA
    weights, exactly those training saved; training needs the whole state and falls back."""
    root, config, final = finished_run
    workdir = root / "no_optimizer"
    shutil.copytree(root / "run", workdir)
    os.remove(workdir / "checkpoints" / "4" / "files.process_0.json")
    shutil.rmtree(workdir / "checkpoints" / "4" / "train")
    stage = stage_lib.load_stage(str(workdir), step=4)
    for a, b in zip(jax.tree.leaves(stage.params), jax.tree.leaves(final.ema_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    restored, damaged = checkpoint.restore_newest_good(str(workdir), lambda _: _structs(config), config)
    assert restored.step == 2 and "train: " in damaged[0].cause


def test_no_good_checkpoint_is_an_error_naming_each_cause(finished_run):
    root, config, _ = finished_run
    workdir = _damaged_copy(root, "all damaged", "emptied config")
    _empty(workdir / "checkpoints" / "2" / "config" / "metadata")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*4: config/metadata is 0 bytes.*; 2: "):
        stage_lib.load_stage(str(workdir))


def test_sampling_never_writes_non_finite_images(finished_run):
    root, _, _ = finished_run
    stage = stage_lib.load_stage(str(root / "run"))
    poisoned = jax.tree.map(lambda p: p * jnp.nan, stage.params)
    with pytest.raises(NonFiniteError, match="NaN/inf pixels"):
        sampling.generate(dataclasses.replace(stage, params=poisoned), ["x"], rng=jax.random.PRNGKey(0))


# --- nothing non-finite is saved ---------------------------------------------------------------------------


def test_a_non_finite_update_with_a_finite_loss_is_never_saved(tmp_path):
    """An infinite learning rate makes the first update NaN while that step's loss, computed before the
    update, is finite: the state is refused at save time, in a fresh run and in a resumed one."""
    fresh = _config(tmp_path, checkpoint_every=1, log_every=100)
    fresh.optim.learning_rate = 1e39  # inf in float32
    with pytest.raises(
        NonFiniteError, match=r"state at step 1 holds NaN/inf values \(params/.*No checkpoint"
    ):
        loop.train_and_evaluate(fresh, str(tmp_path / "fresh"))
    assert not checkpoint.has_checkpoints(str(tmp_path / "fresh"))

    good = _config(tmp_path, num_steps=1, checkpoint_every=1)
    loop.train_and_evaluate(good, str(tmp_path / "resumed"))
    diverging = _config(tmp_path, checkpoint_every=1, log_every=100)
    diverging.optim.learning_rate = 1e39
    with pytest.raises(NonFiniteError, match=r"state at step 2 holds .* last good checkpoint is step 1 "):
        loop.train_and_evaluate(diverging, str(tmp_path / "resumed"))
    assert list(checkpoint.make_manager(str(tmp_path / "resumed"), create=False).all_steps()) == [1]
    restored, _ = checkpoint.restore_newest_good(str(tmp_path / "resumed"), lambda _: _structs(good), good)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.items))


# --- retention -------------------------------------------------------------------------------------------


def _tiny_state(step):
    return TrainState(
        step=jnp.int32(step),
        params={"w": jnp.full((4,), float(step))},
        ema_params={"w": jnp.zeros(4)},
        opt_state=(),
        rng=jax.random.PRNGKey(0),
    )


def test_retention_keeps_the_last_read_back_checkpoint_until_a_newer_one_is(tmp_path, monkeypatch):
    config = get_config("tiny")
    release = threading.Event()
    real_manifest = integrity.write_file_manifest

    def slow_manifest(step_dir, process=0):
        release.wait(timeout=60)
        if step_dir.endswith("/3"):
            raise OSError("read back failed")  # step 3 can never be read back
        return real_manifest(step_dir, process)

    monkeypatch.setattr(integrity, "write_file_manifest", slow_manifest)
    writer = checkpoint.CheckpointWriter(str(tmp_path), keep=1)
    for step in (1, 2, 3):
        writer.save(step, state_lib.to_items(_tiny_state(step)), config, None)
        writer.manager.wait_until_finished()
    # Steps 1 and 2 are written but not read back yet: keep=1 must not delete them.
    assert list(writer.manager.all_steps()) == [1, 2, 3]
    release.set()
    writer.close()
    # 2 is the newest read-back checkpoint and 3 failed its read-back: both stay; 1 goes.
    assert list(checkpoint.make_manager(str(tmp_path), create=False).all_steps()) == [2, 3]


def test_a_replicated_array_is_cut_into_replica_slices_only_when_they_are_large(tmp_path, monkeypatch):
    """Orbax writes an array replicated over the devices as one slice per replica, each cut by an eager
    dispatch before `save()` returns: for small arrays the cuts were nearly all of the save's time
    (docs/robustness.md). Under `MIN_REPLICA_SLICE_BYTES` a replica the array is written whole."""
    devices = jax.devices()
    replicated = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec())
    rows = checkpoint.MIN_REPLICA_SLICE_BYTES * len(devices) // (4 * 256)  # one MiB a replica, float32
    arrays = {"small": jnp.ones((len(devices), 256)), "large": jnp.ones((rows, 256))}
    arrays = jax.device_put(arrays, replicated)
    cuts = []
    real_slice = jax.lax.slice_in_dim

    def counted_slice(x, *args, **kwargs):
        cuts.append(x.shape)
        return real_slice(x, *args, **kwargs)

    monkeypatch.setattr(jax.lax, "slice_in_dim", counted_slice)
    manager = checkpoint.make_manager(tmp_path)
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(arrays)))
    manager.wait_until_finished()
    assert cuts == [(rows, 256)] * len(devices)  # the large array in 8 slices, the small one whole
    restored = manager.restore(0, args=ocp.args.Composite(params=ocp.args.StandardRestore(arrays)))
    for name, value in arrays.items():
        np.testing.assert_array_equal(np.asarray(restored["params"][name]), np.asarray(value))
