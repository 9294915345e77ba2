"""Training state (a pytree), its creation already sharded, its checkpoint items, and the optimizer."""

from __future__ import annotations

import logging
import time
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

log = logging.getLogger("imagen_jax")


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
    """The configured optimizer, run on each parameter on its own (`per_parameter`) also where the train
    state holds several in one array, after the global-norm clipping, which reads every parameter."""
    schedule = learning_rate_schedule(optim, num_steps)
    if optim.name == "adamw":
        opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
    elif optim.name == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=optim.weight_decay or None)
    else:
        raise ConfigError(f"config.optim.name={optim.name!r}: use 'adamw' or 'adafactor'.")
    opt = per_parameter(opt)
    if optim.grad_clip:
        opt = optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt)
    return opt


@flax.struct.dataclass
class PerParameterState:
    """`per_parameter`'s state: the inner optimizer's state for each leaf of the weights; for a leaf that
    holds several parameters, that of each, stacked along the same leading axes (`stacked_axes` of
    them)."""

    inner: tuple[Any, ...]
    stacked_axes: tuple[int, ...] = flax.struct.field(pytree_node=False)


def _vmapped(fn: Any, times: int) -> Any:
    for _ in range(times):
        fn = jax.vmap(fn)
    return fn


def per_parameter(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run on each parameter on its own, also where one array holds several: vmapped over the
    leading axes that stack parameters (`stacking.stacked_axes`: the group axis of weights held stacked by
    shape, `optim.stack_by_shape`, and the `layers` axis of a scanned run of blocks, `model.scan_blocks`).
    Where no array holds more than one parameter, the state is `inner`'s own.

    Adafactor needs this: it factors each parameter's second moment by that parameter's shape, and clips
    and scales its update by that parameter's RMS. Run on a stack of blocks it would mix their statistics
    and train differently from the unrolled model. Elementwise optimizers (Adam, weight decay) give the
    same numbers either way. Clipping by the global norm reads every parameter and must come before.

    `init` must see the logically boxed parameters, as the train state builds them: the `layers` name is
    what marks a scanned parameter's stacking axis.
    """

    def init(params: Any) -> Any:
        axes_per_leaf = stacking.stacked_axes(params)
        if not any(axes_per_leaf):
            return inner.init(params)
        leaves = jax.tree.leaves(params, is_leaf=stacking.is_box)  # boxed: the moments keep the names
        return PerParameterState(
            inner=tuple(_vmapped(inner.init, n)(x) for x, n in zip(leaves, axes_per_leaf, strict=True)),
            stacked_axes=tuple(axes_per_leaf),
        )

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if not isinstance(state, PerParameterState):
            return inner.update(updates, state, params)
        grads, treedef = jax.tree.flatten(updates)
        values = jax.tree.leaves(params) if params is not None else [None] * len(grads)
        new_grads, new_inner = [], []
        for g, s, p, n in zip(grads, state.inner, values, state.stacked_axes, strict=True):
            g, s = _vmapped(inner.update, n)(g, s, p)
            new_grads.append(g)
            new_inner.append(s)
        return jax.tree.unflatten(treedef, new_grads), state.replace(inner=tuple(new_inner))

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

    # Compiled ahead of time so that the log can say how much of a fresh run's wait for its state is
    # compiling (docs/benchmarks.md).
    started = time.perf_counter()
    lowered = jax.jit(lambda tp: nn.unbox(make(boxed(tp))), out_shardings=shardings).lower(text_params)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    log.info(
        "compiled the train state's program in %.1f s (lowering %.1f s, XLA %.1f s)",
        done - started,
        lowered_at - started,
        done - lowered_at,
    )
    return compiled(text_params), shardings


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
