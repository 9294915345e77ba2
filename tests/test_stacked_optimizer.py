"""`optim.stack_by_shape`: the optimizer run once per group of same-shaped parameters computes the
per-parameter optimizer's updates, its state is sharded like the parameters it belongs to, and a run with it
resumes exactly, but only in the optimizer-state layout it began with."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.shapes import get_config
from imagen_jax.errors import CheckpointError
from imagen_jax.stage import build as stage_lib
from imagen_jax.training import loop
from imagen_jax.training import state as state_lib

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

    results = []
    for opt in (plain, stacked):
        params, state = _params(), opt.init(_params())
        update = jax.jit(opt.update)
        for i in range(3):
            grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)) * 10.0, params)  # the clip engages
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
        results.append((params, state))

    (plain_params, plain_state), (stacked_params, stacked_state) = results
    for key in plain_params:
        assert not np.allclose(plain_params[key], _params()[key])
        np.testing.assert_allclose(stacked_params[key], plain_params[key], rtol=1e-6, atol=1e-7, err_msg=key)
    grouped = stacked_state[1]
    assert isinstance(grouped, state_lib.StackedState)
    assert sorted(map(len, grouped.groups)) == [2, 2, 2]  # three shapes, two parameters each
    if name == "adafactor":
        # Each parameter's row and column statistics, stacked: the factoring saw one parameter's shape.
        proj = plain_state[1][0]
        factored = [g[0] for g in grouped.inner if g[0].v_row.size > 2]
        assert [(f.v_row.shape, f.v_col.shape) for f in factored] == [
            ((2, *proj.v_row["proj_a"].shape), (2, *proj.v_col["proj_a"].shape))
        ]
        assert proj.v_row["proj_a"].size > 1 and proj.v_col["proj_a"].size > 1


def _config(root, cache, **optim):
    config = get_config("tiny")
    config.data.data_dir = str(root / "data")
    config.compilation_cache_dir = cache
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


def test_stacked_state_is_sharded_like_its_parameters_and_resumes_only_in_its_layout(
    tmp_path, shared_compilation_cache
):
    config = _config(tmp_path, shared_compilation_cache)
    whole = loop.train_and_evaluate(config, str(tmp_path / "whole"))
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    grouped = whole.opt_state[1]
    assert isinstance(grouped, state_lib.StackedState)
    leaves = jax.tree.leaves(whole.params)
    sharded = 0
    for group, inner in zip(grouped.groups, grouped.inner, strict=True):
        param = leaves[group[0]]
        moment = inner[0].v  # Adafactor's unfactored second moment: the parameters' shape, stacked
        if len(group) == 1 and moment.ndim == param.ndim:  # a parameter without a twin keeps its own state
            assert _spec(moment) == _spec(param), group
            continue
        if moment.ndim != param.ndim + 1:
            continue  # factored: a parameter's row and column statistics, small and replicated
        assert moment.shape == (len(group), *param.shape)
        assert _spec(moment) == (None, *_spec(param)), group
        sharded += "fsdp" in jax.tree.leaves(_spec(param))
    assert sharded >= 5  # the large kernels' groups are split over fsdp, as their parameters are

    # A run resumes only in the optimizer-state layout it began with, and says how.
    other = _config(tmp_path, shared_compilation_cache, stack_by_shape=False)
    expected = r"optim.stack_by_shape=True.*--config.optim.stack_by_shape=True"
    with pytest.raises(CheckpointError, match=expected):
        loop.train_and_evaluate(other, str(tmp_path / "whole"))
    # Sampling reads only the EMA weights, which do not depend on that layout.
    stage = stage_lib.load_stage(str(tmp_path / "whole"), config=other)
    for a, b in zip(
        jax.tree.leaves(stage.params["unet"]), jax.tree.leaves(whole.ema_params["unet"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
