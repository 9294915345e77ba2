"""Several parameters in one array: weights, EMA and optimizer state held stacked by shape
(`optim.stack_by_shape`) or a scanned run's blocks (`model.scan_blocks`) get the per-parameter optimizer's
updates; each stack is sharded like the parameters in it, a run resumes exactly but only in the layout it
began with, and sampling reads the weights in either."""

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.shapes import get_config
from imagen_jax.errors import CheckpointError
from imagen_jax.models.unet import convert_layout
from imagen_jax.stage import build as stage_lib
from imagen_jax.stage import stacking
from imagen_jax.training import loop
from imagen_jax.training import state as state_lib
from tests.test_training import _batch
from tests.test_unet import _perturbed

FSDP_MESH = (("data", 2), ("fsdp", 4), ("tensor", 1))


def _params():
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    shapes = {
        "conv_a": (3, 3, 8, 16),
        "conv_b": (3, 3, 8, 16),
        "proj_a": (256, 128),  # large enough for Adafactor to factor its second moment
        "proj_b": (256, 128),
        "bias": (16,),
        "scale": (16,),
    }
    return {name: jax.random.normal(k, s) for k, (name, s) in zip(keys, shapes.items(), strict=True)}


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_stacked_optimizer_computes_the_per_parameter_updates(name):
    optim = get_config("tiny").optim
    optim.name = name
    optim.weight_decay = 0.1 if name == "adamw" else 0.0
    plain = state_lib.make_optimizer(optim, 10)
    optim.stack_by_shape = True
    stacked = state_lib.make_optimizer(optim, 10)

    def grads_of(params, i):
        return jax.tree.map(lambda p: jnp.sin(p * (i + 1)) * 10.0, params)  # the clip engages

    params, state = _params(), plain.init(_params())
    held = stacking.stack(_params())
    held_state = stacked.init(held)
    for i in range(3):
        updates, state = jax.jit(plain.update)(grads_of(params, i), state, params)
        params = optax.apply_updates(params, updates)
        grads = stacking.stack(grads_of(held.unstack(), i))
        updates, held_state = jax.jit(stacked.update)(grads, held_state, held)
        held = optax.apply_updates(held, updates)

    assert sorted(map(len, held.groups)) == [2, 2, 2]  # three shapes, two parameters each
    for key, value in held.unstack().items():
        assert not np.allclose(params[key], _params()[key])
        np.testing.assert_allclose(value, params[key], rtol=1e-6, atol=1e-7, err_msg=key)
    grouped = held_state[1]
    assert isinstance(grouped, state_lib.PerParameterState) and len(grouped.inner) == 3
    if name == "adafactor":
        # Each parameter's row and column statistics, stacked: the factoring saw one parameter's shape.
        proj = state[1][0]
        factored = [s[0] for s in grouped.inner if s[0].v_row.size > 2]
        assert [(f.v_row.shape, f.v_col.shape) for f in factored] == [
            ((2, *proj.v_row["proj_a"].shape), (2, *proj.v_col["proj_a"].shape))
        ]
        assert proj.v_row["proj_a"].size > 1 and proj.v_col["proj_a"].size > 1


def test_a_scanned_stage_starts_from_the_unrolled_weights():
    """The same seed gives a scanned U-Net the unrolled one's weights, stacked, boxed with the scanned
    model's own logical names: with `scan_blocks` only the program differs."""
    config = get_config("tiny")
    config.text.train_jointly = False
    config.model.num_res_blocks = 2
    unrolled = stage_lib.build_stage(config)
    config.model.scan_blocks = True
    scanned = stage_lib.build_stage(config)
    key = jax.random.PRNGKey(3)
    weights = [jax.jit(stage_lib.params_factory(s, key))(None)["unet"] for s in (unrolled, scanned)]
    args, kwargs = stage_lib.unet_inputs(scanned)
    own = jax.eval_shape(lambda: scanned.unet.init(key, *args, **kwargs)["params"])

    def layout(tree):
        return jax.tree.map(lambda b: (b.value.shape, b.names), tree, is_leaf=stacking.is_box)

    assert layout(weights[1]) == layout(own)
    stacked = convert_layout(nn.unbox(weights[0]), scanned.unet, scanned=True)
    assert any(name.endswith("to1") for name in stacked)  # runs of two blocks, stacked
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(nn.unbox(weights[1])), strict=True):
        np.testing.assert_array_equal(a, b)


def _trained_unet(config, unet_params, steps=3):
    """`steps` train steps of `config`'s stage on one batch from the unrolled U-Net weights `unet_params`
    (converted to the stage's layout): the U-Net's weights after them, unrolled and unstacked, and the
    optimizer's state."""
    stage = stage_lib.build_stage(config)
    optimizer = state_lib.make_optimizer(config.optim, config.train.num_steps)
    # The boxed parameters, as the train state is built: their logical names mark the scanned runs.
    boxes = jax.eval_shape(stage_lib.params_factory(stage, jax.random.PRNGKey(0)), None)
    weights = {"unet": convert_layout(unet_params, stage.unet, scanned=config.model.scan_blocks)}

    # On the stage's mesh, as the step returns it: a state on one device would compile the step twice.
    _, shardings = state_lib.abstract_train_state(stage, optimizer)

    @jax.jit(out_shardings=shardings)
    def create(weights):
        boxed = jax.tree.map(lambda b, x: b.replace(value=x), boxes, weights, is_leaf=stacking.is_box)
        stacked = config.optim.stack_by_shape
        return nn.unbox(state_lib.create_train_state(boxed, optimizer, jax.random.PRNGKey(1), stacked))

    state = create(weights)
    batch = _batch(stage, size=4, res=config.data.resolution)
    step = jax.jit(loop.train_step_fn(config, stage, optimizer))
    for _ in range(steps):
        state, _ = step(state, batch, loop.frozen_inputs(config, stage, state.params))
    unet = convert_layout(stacking.unstacked(state.params)["unet"], stage.unet, scanned=False)
    return unet, state.opt_state


def test_scanned_blocks_train_as_the_unrolled_model():
    """Adafactor clips and scales each update by its parameter's RMS and factors its second moment by the
    parameter's shape: a scanned run's stacked blocks must still get the per-block updates (optax alone, on
    the stack, differs by more than 100% at the first step). Held stacked by shape as well, the state has
    arrays of one parameter, of a scanned run's blocks, and of groups of those."""
    config = get_config("tiny")
    config.text.train_jointly = False
    config.data.resolution = 16
    config.model.num_res_blocks = 2  # two identical blocks a level: runs `scan_blocks` stacks
    config.optim.update({"name": "adafactor", "warmup_steps": 1})
    stage = stage_lib.build_stage(config)
    # Off the zero-initialised output layers, so that every parameter has a gradient from the start.
    init = _perturbed(jax.jit(stage_lib.params_factory(stage, jax.random.PRNGKey(0)))(None)["unet"], seed=0)
    reference, plain_state = _trained_unet(config, init)
    config.model.scan_blocks = True
    config.optim.stack_by_shape = True
    trained, held_state = _trained_unet(config, init)

    assert not isinstance(plain_state[1], state_lib.PerParameterState)  # optax's own state, as it was
    assert set(held_state[1].stacked_axes) == {0, 1, 2}
    assert jax.tree.structure(trained) == jax.tree.structure(reference)
    for (path, a), b in zip(jax.tree.leaves_with_path(reference), jax.tree.leaves(trained), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    scanned_runs = [r for r in stage.unet.block_runs() if r.count > 1]
    assert len(scanned_runs) >= 2
    for run in scanned_runs:  # the scanned blocks really trained
        for name in run.block_names():
            kernel = reference[f"{name}_res"]["conv1"]["kernel"]
            assert np.abs(kernel - init[f"{name}_res"]["conv1"]["kernel"]).max() > 1e-4, name


def _config(root, **optim):
    config = get_config("tiny")
    config.data.data_dir = str(root / "data")
    config.train.update({"num_steps": 4, "checkpoint_every": 2, "log_every": 2, "keep_checkpoints": 2})
    config.mesh = FSDP_MESH
    config.sharding.preset = "fsdp"
    config.sharding.min_shard_size = 1024
    config.optim.update({"name": "adafactor", "stack_by_shape": True, **optim})
    return config


def _spec(x):
    """The array's partition spec with one entry per dimension (trailing unsplit ones are left out)."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def test_stacked_state_is_sharded_like_its_parameters_and_resumes_only_in_its_layout(tmp_path):
    config = _config(tmp_path)
    whole = loop.train_and_evaluate(config, str(tmp_path / "whole"))
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # A run resumes only in the layout it began with, and says how.
    other = _config(tmp_path, stack_by_shape=False)
    expected = r"optim.stack_by_shape=True.*--config.optim.stack_by_shape=True"
    with pytest.raises(CheckpointError, match=expected):
        loop.train_and_evaluate(other, str(tmp_path / "whole"))
    # Sampling reads the EMA weights in either layout.
    stage = stage_lib.load_stage(str(tmp_path / "whole"), config=other)
    ema = stacking.unstacked(whole.ema_params)["unet"]
    for a, b in zip(jax.tree.leaves(stage.params["unet"]), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Each stack of several parameters is sharded as each of them is in the unstacked layout, with the
    # new axis unsplit; its Adafactor moment too. A parameter without a twin is held as it is.
    unstacked_specs = [_spec(s) for s in jax.tree.leaves(stage_lib.params_structs(stage)["unet"])]
    held = whole.params["unet"]
    assert isinstance(held, stacking.Stacked) and len(held.stacks) < len(unstacked_specs)
    before = sum(len(whole.params[part].stacks) for part in whole.params if part < "unet")  # "text"
    inner = whole.opt_state[1].inner[before:]
    sharded = 0
    for group, stack, moments in zip(held.groups, held.stacks, inner, strict=True):
        spec = unstacked_specs[group[0]]
        assert all(unstacked_specs[i] == spec for i in group)
        if len(group) == 1:
            assert _spec(stack) == spec
            continue
        assert stack.shape[0] == len(group) and _spec(stack) == (None, *spec), group
        if moments[0].v.shape == stack.shape:  # unfactored: the parameters' shape, stacked
            assert _spec(moments[0].v) == (None, *spec)
        sharded += "fsdp" in jax.tree.leaves(spec)
    assert sharded >= 5  # the large kernels' stacks are split over fsdp, as their parameters are
