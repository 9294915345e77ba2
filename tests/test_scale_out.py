"""Scale-out on one host's 8 CPU devices: sharding presets give the same training as one device with the
state really split, rules that do not divide fall back, gradient accumulation and remat policies."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.shapes import get_config
from imagen_jax.errors import ConfigError
from imagen_jax.models.unet import unet_from_config
from imagen_jax.parallel import axes
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import build as stage_lib
from imagen_jax.training import loop
from imagen_jax.training import state as state_lib
from imagen_jax.training.step import accumulate_gradients, micro_batches
from tests.test_training import _batch

MIN_SHARD = 512  # the tiny model's kernels have 512-18k elements, its biases and norms <= 64


def _config(preset, mesh, grad_accum=2):
    config = get_config("tiny")
    config.mesh = mesh
    config.sharding.preset = preset
    config.sharding.min_shard_size = MIN_SHARD
    config.train.grad_accum_steps = grad_accum
    # Adam moves every weight by about the learning rate whatever its gradient's size, so a near-zero
    # gradient summed in another order (another mesh) moves it by up to that much either way; a small rate
    # keeps those differences small next to the 1e-5 the losses are compared at.
    config.optim.learning_rate = 1e-4
    return config


def _train(config, devices, num_steps=5):
    """`num_steps` steps of the jitted train step exactly as the loop compiles it (explicit shardings,
    donated state) on one fixed batch; (state, losses)."""
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    stage = stage_lib.build_stage(config, mesh)
    optimizer = state_lib.make_optimizer(config.optim, config.train.num_steps)
    state, shardings = state_lib.init_train_state(stage, optimizer, jax.random.PRNGKey(config.seed))
    batch = loop.global_batch(_batch(stage), mesh, stage.rules)
    frozen = loop.frozen_inputs(config, stage, state.params)
    step, _ = loop.compile_train_step(config, stage, optimizer, shardings, state, batch, frozen)
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))
    return state, losses


def _large_leaves(tree):
    return [
        (jax.tree_util.keystr(path), x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if x.size >= MIN_SHARD
    ]


def _assert_split(tree, ways):
    """No device holds a full copy of any array of at least MIN_SHARD elements, and nearly all are split
    `ways` ways (a dimension no parameter axis divides, e.g. fsdp_tp's text positions with 84 rows, may
    leave one split fewer ways); smaller ones are whole on every device."""
    large = _large_leaves(tree)
    assert large
    full_split = 0
    for name, x in large:
        shards = [math.prod(s.data.shape) for s in x.addressable_shards]
        assert max(shards) < x.size, (name, x.shape, x.sharding.spec)
        full_split += max(shards) * ways == x.size
    assert full_split >= 0.9 * len(large), (full_split, len(large))
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(tree) if x.size < MIN_SHARD)


@pytest.fixture(scope="module")
def one_device_run():
    """The reference: one device, the batch of 16 as 2 accumulated micro-batches of 8 (so every run below
    also checks accumulation over a sharded batch)."""
    return _train(_config("dp", (("data", 1),)), jax.devices()[:1])


@pytest.mark.parametrize(
    "preset, mesh, ways",
    [
        ("dp", (("data", 8), ("fsdp", 1), ("tensor", 1)), 1),
        ("fsdp", (("data", 2), ("fsdp", 4), ("tensor", 1)), 4),
        ("fsdp_tp", (("data", 2), ("fsdp", 2), ("tensor", 2)), 4),
    ],
)
def test_presets_train_as_one_device_with_the_state_split(one_device_run, preset, mesh, ways):
    state1, losses1 = one_device_run
    state, losses = _train(_config(preset, mesh), jax.devices())
    np.testing.assert_allclose(losses, losses1, rtol=1e-5)
    # Weights: within a few learning rates of each other (a flipped Adam update differs by twice the rate).
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state1.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=3e-4)
    for tree in (state.params, state.ema_params, state.opt_state):
        if ways == 1:
            assert all(x.sharding.is_fully_replicated for _, x in _large_leaves(tree))
        else:
            _assert_split(tree, ways)
    # The batch is split over data x fsdp whatever the preset.
    assert mesh_lib.batch_shards(mesh_lib.make_mesh(mesh), mesh_lib.axis_rules({"preset": preset})) == (
        8 // dict(mesh)["tensor"]
    )


def test_fsdp_tp_splits_kernels_over_both_axes():
    config = _config("fsdp_tp", (("data", 2), ("fsdp", 2), ("tensor", 2)))
    stage = stage_lib.build_stage(config, mesh_lib.make_mesh(config.mesh))
    structs = stage_lib.params_structs(stage)["unet"]
    conv = structs["mid_0_res"]["conv1"]["kernel"]  # (3, 3, in 32, out 32)
    assert conv.sharding.spec == P(None, None, "fsdp", "tensor")
    query = structs["mid_0_attn"]["query"]["kernel"]  # (embed 32, heads 4, kv 8)
    assert query.sharding.spec == P("fsdp", "tensor", None)


def test_rules_skip_what_does_not_divide_and_overrides_replace_a_preset_rule():
    mesh = mesh_lib.make_mesh((("data", 1), ("fsdp", 8), ("tensor", 1)))
    rules = mesh_lib.axis_rules({"preset": "fsdp", "rules": (), "min_shard_size": 0})
    conv = (None, None, axes.CONV_IN, axes.CONV_OUT)
    # 12 output channels do not split 8 ways: the input channels (16) take the axis instead.
    assert mesh_lib.partition_spec(conv, mesh, rules, (3, 3, 16, 12)) == P(None, None, "fsdp", None)
    assert mesh_lib.partition_spec(conv, mesh, rules, (3, 3, 12, 12)) == P()
    small = mesh_lib.axis_rules({"preset": "fsdp", "rules": (), "min_shard_size": 10_000})
    assert mesh_lib.partition_spec(conv, mesh, small, (3, 3, 16, 16)) == P()
    override = mesh_lib.axis_rules({"preset": "fsdp", "rules": ((axes.CONV_OUT, None),)})
    assert mesh_lib.partition_spec(conv, mesh, override, (3, 3, 64, 64)) == P(None, None, "fsdp", None)
    with pytest.raises(ConfigError, match="config.sharding.preset='zero'"):
        mesh_lib.axis_rules({"preset": "zero"})


def test_mesh_axes_sizes_and_errors():
    mesh = mesh_lib.make_mesh((("data", 2), ("fsdp", -1), ("tensor", 2)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="needs 16 devices but 8 are available"):
        mesh_lib.make_mesh((("data", 2), ("fsdp", 8)))
    with pytest.raises(ConfigError, match="config.mesh_dcn .* do not split into 3 slices"):
        mesh_lib.make_mesh((("data", -1),), dcn=(("data", 3),))


def test_grad_accumulation_is_the_mean_over_micro_batches():
    batch = {"x": jnp.arange(24.0).reshape(8, 3)}
    micro = micro_batches(batch, 2)["x"]
    np.testing.assert_array_equal(micro[0], batch["x"][0::2])
    np.testing.assert_array_equal(micro[1], batch["x"][1::2])

    def loss_fn(params, frozen, b, rng):
        noise = jax.random.normal(rng, b["x"].shape)
        return jnp.mean((b["x"] * params["w"] + noise) ** 2)

    params, rng = {"w": jnp.float32(0.5)}, jax.random.PRNGKey(3)
    loss, grads = accumulate_gradients(loss_fn, params, None, batch, rng, 2)
    value_and_grad = jax.value_and_grad(loss_fn)
    parts = [value_and_grad(params, None, {"x": micro[i]}, jax.random.fold_in(rng, i)) for i in range(2)]
    np.testing.assert_allclose(loss, np.mean([p[0] for p in parts]), rtol=1e-6)
    np.testing.assert_allclose(grads["w"], np.mean([p[1]["w"] for p in parts]), rtol=1e-6)


def test_a_remat_policy_computes_the_same_gradients():
    """`dots_with_no_batch_dims_saveable` (nothing_saveable: test_unet's remat test; dots_saveable trains
    in test_mesh_restore's resume)."""
    policy = "dots_with_no_batch_dims_saveable"
    config = get_config("tiny")
    plain = unet_from_config(config.model)
    config.model.remat, config.model.remat_policy = True, policy
    remat = unet_from_config(config.model)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    logsnr = jnp.array([-1.0, 2.0])
    text = jax.random.normal(jax.random.PRNGKey(1), (2, 84, 32))
    mask = jnp.ones((2, 84), bool)
    params = plain.init(jax.random.PRNGKey(2), x, logsnr, text, mask)["params"]

    def grads(unet):
        loss = lambda p: jnp.sum(unet.apply({"params": p}, x, logsnr, text, mask) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_policy_and_grad_accumulation_config_errors():
    from imagen_jax.training.config_checks import validate_config

    config = get_config("tiny")
    config.model.remat_policy = "dots"
    with pytest.raises(ConfigError, match="model.remat_policy='dots' is not one of"):
        validate_config(config)
    config = get_config("tiny")
    config.train.grad_accum_steps = 3
    with pytest.raises(ConfigError, match="batch_size=16 does not split into .*grad_accum_steps=3"):
        validate_config(config)
