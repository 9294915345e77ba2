"""Training state (a pytree) and the optimizer built from `config.optim`."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from imagen_jax.errors import ConfigError


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; checkpointed whole.

    `params` holds {"unet": ..., "text": ...}; "text" is present only when the text encoder trains jointly
    (a frozen encoder's weights come from its own source, never from our checkpoints).
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
    schedule = learning_rate_schedule(optim, num_steps)
    if optim.name == "adamw":
        opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
    elif optim.name == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=optim.weight_decay or None)
    else:
        raise ConfigError(f"config.optim.name={optim.name!r}: use 'adamw' or 'adafactor'.")
    if optim.grad_clip:
        opt = optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt)
    return opt


def ema_decay(optim: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """EMA decay at `step`; with warm-up the average forgets the random init quickly in short runs."""
    decay = jnp.asarray(optim.ema_decay, jnp.float32)
    if optim.ema_warmup:
        step = step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


def create_train_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=rng,
    )
