"""The pure training step: noise the images, predict the diffusion target, update params and EMA.

A super-resolution batch also holds `lowres` (the low-res image, or the crop matching `image`); it is
noise-augmented per example by `diffusion.noise_aug`, the code the cascade sampler uses too.
`make_train_step` returns the step as its two phases, `gradients(state, batch, frozen) -> (loss, grads)`
and `update(state, loss, grads) -> (state, metrics)` (clipping, optimizer, EMA, metrics); calling it runs
both, as one function. jit, shardings and buffer donation are applied by the caller
(`imagen_jax.training.loop`), which compiles either the whole step or the two phases as two programs.
`frozen` carries weights that are inputs but never trained (a frozen text encoder), passed as an argument
so they are not baked into the program, and the positions of weights held stacked (`stacking.positions`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from imagen_jax.diffusion import noise_aug, objectives, schedules
from imagen_jax.models.unet import UNet
from imagen_jax.stage import stacking
from imagen_jax.text.encoder import encode_tokens
from imagen_jax.text.t5 import T5Encoder
from imagen_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """One training step as its two phases. Both are pure; `loop.compile_train_step` jits either the whole
    step (`__call__`) or each phase as its own program, so XLA compiles the two in parallel."""

    gradients: Callable[[TrainState, Batch, Any], tuple[jax.Array, Any]]
    update: Callable[[TrainState, jax.Array, Any], tuple[TrainState, Metrics]]

    def __call__(self, state: TrainState, batch: Batch, frozen: Any) -> tuple[TrainState, Metrics]:
        return self.update(state, *self.gradients(state, batch, frozen))


def text_embeddings(text_module: T5Encoder, text_params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Text embeddings and mask for a batch: precomputed (`text_emb`, from an embedding cache) or encoded."""
    if "text_emb" in batch:
        return batch["text_emb"].astype(jnp.float32), batch["text_mask"]
    return encode_tokens(text_module, text_params, batch["text_ids"], batch["text_mask"]), batch["text_mask"]


def drop_captions(
    emb: jax.Array, mask: jax.Array, rng: jax.Array, rate: float
) -> tuple[jax.Array, jax.Array]:
    """Classifier-free guidance training: a dropped caption becomes the null text (mask all False, zero
    embedding), exactly what an empty prompt gives at sampling time."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, (mask.shape[0],))
    mask = mask & keep[:, None]
    return emb * mask[..., None].astype(emb.dtype), mask


def micro_batches(batch: Batch, count: int) -> Batch:
    """[B, ...] -> [count, B / count, ...], micro-batch i holding examples i, i + count, ...: each device's
    rows of a batch split over the batch mesh axes stay on that device, so no data moves."""

    def split(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_fn: Callable[[Any, Any, Batch, jax.Array], jax.Array],
    params: Any,
    frozen: Any,
    batch: Batch,
    rng: jax.Array,
    count: int,
) -> tuple[jax.Array, Any]:
    """(mean loss, mean gradient) over `count` equal micro-batches of `batch`, one at a time in a scan
    (micro-batch i draws its noise from `fold_in(rng, i)`); the sums are float32."""

    def body(carry: tuple[jax.Array, Any], xs: tuple[jax.Array, Batch]) -> tuple[Any, None]:
        index, micro = xs
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, micro, jax.random.fold_in(rng, index))
        total_loss, total_grads = carry
        total_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), total_grads, grads)
        return (total_loss + loss, total_grads), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (jnp.zeros((), jnp.float32), zeros)
    (loss, grads), _ = jax.lax.scan(body, init, (jnp.arange(count), micro_batches(batch, count)))
    grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, params)
    return loss / count, grads


def make_train_step(
    unet: UNet,
    text_module: T5Encoder,
    optimizer: optax.GradientTransformation,
    *,
    schedule: schedules.Schedule,
    diffusion: ml_collections.ConfigDict,
    lr_fn: optax.Schedule,
    ema_decay_fn: Callable[[jax.Array], jax.Array],
    joint_text: bool,
    grad_accum_steps: int = 1,
) -> TrainStep:
    """`diffusion` is `config.diffusion` (objective, loss weighting, training log-SNR shift, caption
    dropout, noise_aug_range);
    `lr_fn` only feeds the logged learning rate; `joint_text`: the text encoder's weights are in
    `params["text"]` and train, else they come frozen in the step's third argument.
    `grad_accum_steps` > 1 splits the batch into that many micro-batches run one after another inside
    the step (`accumulate_gradients`): one optimizer update for the whole batch at the activation memory
    of one micro-batch."""
    diff = diffusion

    def loss_fn(params: Any, frozen: Any, batch: Batch, rng: jax.Array) -> jax.Array:
        k_t, k_eps, k_drop, k_dropout, k_level, k_aug = jax.random.split(rng, 6)
        text_params = params["text"] if joint_text else frozen.get("text")
        emb, mask = text_embeddings(text_module, text_params, batch)
        emb, mask = drop_captions(emb, mask, k_drop, diff.caption_dropout)
        x = batch["image"]
        b = x.shape[0]
        # Low-discrepancy times (one uniform offset, evenly spaced): lower-variance loss, as in VDM.
        t = jnp.mod(jax.random.uniform(k_t) + jnp.arange(b, dtype=jnp.float32) / b, 1.0)
        logsnr = schedules.shift_logsnr(schedule.logsnr(t), diff.train_logsnr_shift, schedule)
        eps = jax.random.normal(k_eps, x.shape, x.dtype)
        z = schedules.diffuse(x, eps, logsnr)
        sr_inputs = {}
        if "lowres" in batch:
            levels = noise_aug.draw_levels(k_level, b, diff.noise_aug_range)
            lowres, aug_logsnr = noise_aug.augment(batch["lowres"], levels, k_aug, schedule)
            sr_inputs = dict(lowres=lowres, aug_logsnr=aug_logsnr)
        pred = unet.apply(
            {"params": params["unet"]},
            z,
            logsnr,
            emb,
            mask,
            train=True,
            rngs={"dropout": k_dropout},
            **sr_inputs,
        )
        losses = objectives.diffusion_loss(
            pred,
            x,
            eps,
            logsnr,
            objective=diff.objective,
            weighting=diff.loss_weighting,
            min_snr_gamma=diff.min_snr_gamma,
        )
        return jnp.mean(losses)

    def gradients(state: TrainState, batch: Batch, frozen: Any) -> tuple[jax.Array, Any]:
        rng = jax.random.fold_in(state.rng, state.step)
        # Weights held stacked by shape (optim.stack_by_shape), read at the positions passed in.
        params = stacking.unstacked(state.params, frozen.get("positions"))
        if grad_accum_steps > 1:
            loss, grads = accumulate_gradients(loss_fn, params, frozen, batch, rng, grad_accum_steps)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch, rng)
        return loss, stacking.restacked(grads, state.params)

    def update(state: TrainState, loss: jax.Array, grads: Any) -> tuple[TrainState, Metrics]:
        # Each jax.numpy function is a jit of its own, traced anew for every shape: the optimizer of a
        # large model calls thousands of them, and inlined (the same operations, no nested jits) they
        # trace in half the time. Only while this step is traced: the update always runs compiled.
        with jax.disable_jit():
            return _update(state, loss, grads)

    def _update(state: TrainState, loss: jax.Array, grads: Any) -> tuple[TrainState, Metrics]:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_fn(state.step)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": lr_fn(state.step),
            "nonfinite": (~jnp.isfinite(loss)).astype(jnp.int32),
        }
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, metrics

    return TrainStep(gradients=gradients, update=update)
