"""Checkpoints move between meshes: written on one mesh, restored onto another (fewer devices, another
sharding preset, one device for sampling) with every array resharded as it loads and bitwise equal; a
training run resumes on another mesh; and a restore asking for other array structures than the checkpoint
holds is refused before any array is read, naming the arrays."""

import math
import shutil

import jax
import numpy as np
import pytest

from configs.shapes import get_config
from imagen_jax.errors import CheckpointDamagedError, CheckpointError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import build as stage_lib
from imagen_jax.stage import checkpoint, sampling
from imagen_jax.training import loop
from imagen_jax.training import state as state_lib
from imagen_jax.training.state import make_optimizer

FSDP_MESH = (("data", 2), ("fsdp", 4), ("tensor", 1))
# The tiny model's kernels hold 1-18k elements: shard everything from 1k up, so most kernels split.
MIN_SHARD_SIZE = 1024


def _config(root, preset="dp", mesh=(("data", -1), ("fsdp", 1), ("tensor", 1))):
    config = get_config("tiny")
    config.data.data_dir = str(root / "data")
    config.train.update({"num_steps": 4, "checkpoint_every": 2, "log_every": 2, "keep_checkpoints": 2})
    config.mesh = mesh
    config.sharding.preset = preset
    config.sharding.min_shard_size = MIN_SHARD_SIZE
    return config


def _structs(config, mesh):
    stage = stage_lib.build_stage(config, mesh)
    structs, _ = state_lib.abstract_train_state(stage, make_optimizer(config.optim, config.train.num_steps))
    return state_lib.to_items(structs)


def _assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step data-parallel run on all 8 devices (checkpoints 2 and 4), and the same run resumed from its
    step-2 checkpoint on a data=2 x fsdp=4 mesh with the fsdp preset up to step 4 (with rematerialisation
    switched on: it changes the computation, not the checkpoint, so resuming accepts it)."""
    root = tmp_path_factory.mktemp("mesh_restore")
    dp_config = _config(root)
    dp_state = loop.train_and_evaluate(dp_config, str(root / "dp"))
    shutil.copytree(root / "dp", root / "fsdp")
    shutil.rmtree(root / "fsdp" / "checkpoints" / "4")
    fsdp_config = _config(root, "fsdp", FSDP_MESH)
    fsdp_config.model.remat, fsdp_config.model.remat_policy = True, "dots_saveable"
    fsdp_state = loop.train_and_evaluate(fsdp_config, str(root / "fsdp"))
    host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    return root, dp_config, host(dp_state), fsdp_config, fsdp_state


def test_eight_device_checkpoint_restores_onto_four_devices(runs):
    root, config, dp_state, _, _ = runs
    mesh4 = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:4])
    restored, damaged = checkpoint.restore_newest_good(
        str(root / "dp"), lambda _: _structs(config, mesh4), config
    )
    assert restored.step == 4 and not damaged
    for leaf in jax.tree.leaves(restored.items):
        assert leaf.sharding.mesh.devices.size == 4
        assert set(leaf.sharding.device_set) == set(jax.devices()[:4])
    _assert_bitwise_equal(restored.items, state_lib.to_items(dp_state))


def test_data_parallel_checkpoint_restores_fsdp_sharded_for_resuming(runs):
    """dp (parameters replicated on 8 devices) -> data=2 x fsdp=4 with the fsdp preset: params, EMA and
    the optimizer moments come back split over `fsdp`, each device holding a quarter of a large kernel."""
    root, _, dp_state, fsdp_config, _ = runs
    mesh = mesh_lib.make_mesh(fsdp_config.mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    structs = _structs(fsdp_config, mesh)
    restored, damaged = checkpoint.restore_newest_good(str(root / "dp"), lambda _: structs, fsdp_config)
    assert restored.step == 4 and not damaged
    _assert_bitwise_equal(restored.items, state_lib.to_items(dp_state))

    sharded = {}
    for name in ("params", "ema_params", "train"):
        pairs = zip(
            jax.tree_util.tree_flatten_with_path(restored.items[name])[0],
            jax.tree.leaves(structs[name]),
            strict=True,
        )
        sharded[name] = []
        for (path, leaf), struct in pairs:
            assert leaf.sharding.mesh.shape == mesh.shape
            assert leaf.sharding.spec == struct.sharding.spec, jax.tree_util.keystr(path)
            shard = leaf.addressable_shards[0].data.shape
            if "fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec)):
                assert math.prod(shard) * 4 == math.prod(leaf.shape), (jax.tree_util.keystr(path), shard)
                sharded[name].append(jax.tree_util.keystr(path))
            else:
                assert shard == leaf.shape
    # Every large kernel is split; the EMA like the weights, the optimizer's two moments like each.
    assert len(sharded["params"]) >= 20, sharded["params"]
    assert len(sharded["ema_params"]) == len(sharded["params"])
    assert len(sharded["train"]) == 2 * len(sharded["params"])
    kernel = restored.items["params"]["unet"]["up1_0_res"]["conv1"]["kernel"]
    assert kernel.shape == (3, 3, 64, 32) and kernel.addressable_shards[0].data.shape != kernel.shape
    mu = restored.items["train"]["opt_state"][1][0].mu["unet"]["up1_0_res"]["conv1"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec and "fsdp" in kernel.sharding.spec


def test_training_resumes_on_another_mesh_and_continues(runs):
    """The run resumed from step 2 on the fsdp mesh reaches step 4 with its state on that mesh, and its
    values match the data-parallel run's (the same steps, other reduction orders)."""
    root, _, dp_state, fsdp_config, fsdp_state = runs
    assert int(fsdp_state.step) == 4
    assert list(checkpoint.make_manager(str(root / "fsdp"), create=False).all_steps()) == [2, 4]
    kernel = fsdp_state.params["unet"]["up1_0_res"]["conv1"]["kernel"]
    assert dict(kernel.sharding.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert "fsdp" in kernel.sharding.spec
    for a, b in zip(jax.tree.leaves(fsdp_state.params), jax.tree.leaves(dp_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)
    saved = checkpoint.restore_newest_good(
        str(root / "fsdp"), lambda _: _structs(fsdp_config, mesh_lib.make_mesh(FSDP_MESH)), fsdp_config
    )[0]
    _assert_bitwise_equal(saved.items, state_lib.to_items(fsdp_state))


def test_fsdp_checkpoint_loads_onto_one_device_and_samples(runs):
    root, _, _, _, fsdp_state = runs
    one = mesh_lib.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), devices=jax.devices()[:1])
    stage = stage_lib.load_stage(str(root / "fsdp"), mesh=one)
    assert stage.step == 4 and stage.config.sharding.preset == "fsdp"  # the checkpoint's own config
    for leaf in jax.tree.leaves(stage.params):
        assert leaf.sharding.device_set == {jax.devices()[0]}
        assert leaf.addressable_shards[0].data.shape == leaf.shape
    _assert_bitwise_equal(stage.params, fsdp_state.ema_params)
    images = sampling.generate(stage, ["a red circle", ""], rng=jax.random.PRNGKey(0), num_steps=2)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


# --- stored structures that differ from those asked for --------------------------------------------------


def test_other_array_shapes_than_stored_are_refused_before_reading(runs, monkeypatch):
    """`config=None` takes the checkpoint's own config, so no config keys differ; the caller's structures
    come from a wider model. The stored shapes are compared first: one message names the arrays."""
    root, config, _, _, _ = runs
    wider = _config(root)
    wider.model.channels = 24
    mesh = mesh_lib.make_mesh(config.mesh)
    structs = _structs(wider, mesh)
    reads = []
    real_restore_item = checkpoint._restore_item
    monkeypatch.setattr(
        checkpoint,
        "_restore_item",
        lambda m, s, name, a: reads.append(name) or real_restore_item(m, s, name, a),
    )
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore_newest_good(str(root / "dp"), lambda _: structs, None)
    err = info.value
    assert not isinstance(err, CheckpointDamagedError)  # not damage: no fallback to an older checkpoint
    assert "params" not in reads and "train" not in reads  # only config and digests were read
    message = str(err)
    assert message.startswith(
        f"checkpoint {root / 'dp' / 'checkpoints' / '4'} holds a different architecture"
    )
    assert (
        "params/unet/conv_in/kernel: checkpoint (3, 3, 12, 16) float32 vs asked (3, 3, 12, 24) float32"
        in (message)
    ), message
    count = int(message.split(" arrays with other shapes")[0].rsplit("\n", 1)[-1])
    assert count > 50  # params, EMA and both optimizer moments of almost every layer
    assert f"... and {count - 5} more" in message
    assert "Traceback" not in message and "tensorstore" not in message.lower() and len(message) < 3000


def test_missing_and_unexpected_arrays_are_named(runs):
    """A frozen text encoder's state has no `params/text`; a checkpoint trained jointly holds it."""
    root, config, _, _, _ = runs
    frozen = _config(root)
    frozen.text.train_jointly = False
    mesh = mesh_lib.make_mesh(config.mesh)
    items = _structs(frozen, mesh)
    manager = checkpoint.make_manager(str(root / "dp"), create=False)
    with pytest.raises(
        CheckpointError, match=r"arrays in the checkpoint, not asked for:\n    params/text/"
    ):
        checkpoint.restore_verified(manager, 4, lambda _: {"params": items["params"]})

    stored = _structs(config, mesh)
    extra = {**stored["ema_params"], "extra": {"kernel": jax.ShapeDtypeStruct((4, 4), np.float32)}}
    with pytest.raises(
        CheckpointError,
        match=r"1 array asked for, not in the checkpoint:\n    ema_params/extra/kernel \(4, 4\) float32",
    ):
        checkpoint.restore_verified(manager, 4, lambda _: {"ema_params": extra})
    # The matching structures restore as before.
    assert set(
        checkpoint.restore_verified(manager, 4, lambda _: {"ema_params": stored["ema_params"]}).items
    ) == {"ema_params"}


# --- workdirs as local paths or URLs ----------------------------------------------------------------------


def test_checkpoint_paths_take_local_paths_and_urls_alike(tmp_path, monkeypatch):
    """One code path: str or `epath.Path`, local (made absolute and normalised) or a URL (kept as is; no
    bucket is reached here)."""
    from etils import epath

    monkeypatch.chdir(tmp_path)
    assert checkpoint.checkpoint_dir("runs/../run") == str(tmp_path / "run" / "checkpoints")
    assert checkpoint.checkpoint_dir(epath.Path(tmp_path) / "run") == str(tmp_path / "run" / "checkpoints")
    assert checkpoint.damaged_dir("run") == str(tmp_path / "run" / "checkpoints_damaged")
    for url in ("gs://bucket/run", epath.Path("gs://bucket/run")):
        assert checkpoint.checkpoint_dir(url) == "gs://bucket/run/checkpoints"
        assert checkpoint.damaged_dir(url) == "gs://bucket/run/checkpoints_damaged"
    assert not checkpoint.has_checkpoints(epath.Path(tmp_path) / "missing")
    with pytest.raises(FileNotFoundError, match="train first"):
        checkpoint.restore_newest_good(epath.Path(tmp_path) / "missing", lambda _: {})
