"""Training state (a pytree), its creation already sharded, its checkpoint items, and the optimizer."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from imagen_jax.errors import ConfigError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import stacking
from imagen_jax.stage.build import Stage, abstract_text_params, params_factory


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; checkpointed as the items of `to_items`.

    `params` holds {"unet": ..., "text": ...}; "text" is present only when the text encoder trains jointly
    (a frozen encoder's weights come from its own source, never from our checkpoints). With
    `optim.stack_by_shape` each part is a `stacking.Stacked` (as is the EMA); `stacking.unstacked` gives
    the trees the models read.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warm-up, then cosine decay to `end_lr_factor * learning_rate` (or constant)."""
    lr, warmup = optim.learning_rate, optim.warmup_steps
    if optim.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0,
            lr,
            warmup_steps=max(warmup, 1),
            decay_steps=max(num_steps, warmup + 1),
            end_value=lr * optim.end_lr_factor,
        )
    if optim.decay == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [max(warmup, 1)]
        )
    raise ConfigError(f"config.optim.decay={optim.decay!r}: use 'cosine' or 'constant'.")


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """The configured optimizer; with `optim.stack_by_shape` its per-parameter part runs on weights held
    stacked by shape (`stacked_by_shape`; the train state is built so), after the global-norm clipping,
    which reads every parameter."""
    schedule = learning_rate_schedule(optim, num_steps)
    if optim.name == "adamw":
        opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
    elif optim.name == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=optim.weight_decay or None)
    else:
        raise ConfigError(f"config.optim.name={optim.name!r}: use 'adamw' or 'adafactor'.")
    if optim.get("stack_by_shape", False):
        opt = stacked_by_shape(opt)
    if optim.grad_clip:
        opt = optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt)
    return opt


@flax.struct.dataclass
class StackedState:
    """`stacked_by_shape`'s state: the inner optimizer's state for each leaf of the weights, which for a
    stack of several parameters is that of each, stacked along the same first axis."""

    inner: tuple[Any, ...]


def stacked_by_shape(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` for weights stacked by shape (`stage.stacking`): vmapped over each stack of several
    parameters, as it is for a parameter without a twin.

    The same arithmetic for any `inner` that treats each parameter on its own (Adam, Adafactor, weight
    decay; not clipping by the global norm, which must come before): Adafactor factors each parameter's
    second moment by that parameter's own shape, never the stack's.
    """

    def init(params: Any) -> StackedState:
        leaves = jax.tree.leaves(params, is_leaf=stacking.is_box)  # boxed: the moments keep the names
        flags = stacking.stack_flags(params)
        return StackedState(
            inner=tuple(
                jax.vmap(inner.init)(x) if grouped else inner.init(x)
                for x, grouped in zip(leaves, flags, strict=True)
            )
        )

    def update(updates: Any, state: StackedState, params: Any = None) -> tuple[Any, StackedState]:
        grads, treedef = jax.tree.flatten(updates)
        values = jax.tree.leaves(params) if params is not None else [None] * len(grads)
        new_grads, new_inner = [], []
        for g, s, p, grouped in zip(grads, state.inner, values, stacking.stack_flags(updates), strict=True):
            g, s = (jax.vmap(inner.update) if grouped else inner.update)(g, s, p)
            new_grads.append(g)
            new_inner.append(s)
        return jax.tree.unflatten(treedef, new_grads), StackedState(inner=tuple(new_inner))

    return optax.GradientTransformation(init, update)


def ema_decay(optim: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """EMA decay at `step`; with warm-up the average forgets the random init quickly in short runs."""
    decay = jnp.asarray(optim.ema_decay, jnp.float32)
    if optim.ema_warmup:
        step = step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


def create_train_state(
    params: Any, optimizer: optax.GradientTransformation, rng: jax.Array, stack_by_shape: bool = False
) -> TrainState:
    """A fresh state; with `stack_by_shape` the weights and EMA (and so the optimizer state) are held
    stacked by shape, each part on its own (`stage.stacking`)."""
    if stack_by_shape:
        params = stacking.stack_parts(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=rng,
    )


def _state_factory(stage: Stage, optimizer: optax.GradientTransformation, rng: jax.Array) -> Any:
    """`make(text_params) -> TrainState` with boxed (logically annotated) parameters."""
    init_rng, state_rng = jax.random.split(rng)
    make_params = params_factory(stage, init_rng)
    stacked = stacking.enabled(stage.config)
    return lambda text_params: create_train_state(make_params(text_params), optimizer, state_rng, stacked)


def _state_shardings(stage: Stage, make: Any) -> tuple[Any, Any]:
    """(abstract boxed state, shardings) from shapes alone: nothing is computed or allocated.

    optax keeps the logical boxes, so the optimizer moments get the same names as their parameters.
    """
    abstract = jax.eval_shape(make, abstract_text_params(stage))
    return abstract, mesh_lib.tree_shardings(abstract, stage.mesh, stage.rules)


def init_train_state(
    stage: Stage, optimizer: optax.GradientTransformation, rng: jax.Array
) -> tuple[TrainState, Any]:
    """A fresh train state created directly with its shardings (no unsharded copy), and those shardings."""
    make = _state_factory(stage, optimizer, rng)
    _, shardings = _state_shardings(stage, make)
    text_params = stage.text.params if stage.config.text.train_jointly else None
    # The encoder's weights come unboxed; boxed as in the abstract state, the optimizer sees the same
    # logical names here as there (`stage.stacking` groups by them).
    boxes = abstract_text_params(stage)

    def boxed(tp: Any) -> Any:
        return jax.tree.map(
            lambda b, x: b.replace(value=x) if stacking.is_box(b) else x, boxes, tp, is_leaf=stacking.is_box
        )

    state = jax.jit(lambda tp: nn.unbox(make(boxed(tp))), out_shardings=shardings)(text_params)
    return state, shardings


def abstract_train_state(stage: Stage, optimizer: optax.GradientTransformation) -> tuple[Any, Any]:
    """ShapeDtypeStructs (with shardings) of the train state, for restoring without initialising."""
    abstract, shardings = _state_shardings(stage, _state_factory(stage, optimizer, jax.random.PRNGKey(0)))
    structs = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(abstract), shardings
    )
    return structs, shardings


def to_items(state: Any) -> dict[str, Any]:
    """The checkpoint's array items: the weights and their EMA apart (sampling reads only the EMA), and
    the rest of the state that only training resumes from."""
    return {
        "params": state.params,
        "ema_params": state.ema_params,
        "train": {"step": state.step, "opt_state": state.opt_state, "rng": state.rng},
    }


def from_items(items: dict[str, Any]) -> TrainState:
    train = items["train"]
    return TrainState(
        step=train["step"],
        params=items["params"],
        ema_params=items["ema_params"],
        opt_state=train["opt_state"],
        rng=train["rng"],
    )
