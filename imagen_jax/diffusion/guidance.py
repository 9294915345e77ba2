"""Classifier-free guidance and x0 thresholding (static / dynamic, Imagen section 2.3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import choice
from imagen_jax.diffusion.choice import Choice
from imagen_jax.diffusion.schedules import expand_to

THRESHOLD_KINDS = ("none", "static", "dynamic")

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def classifier_free_guidance(
    cond_pred: jax.Array, uncond_pred: jax.Array, weight: float | jax.Array
) -> jax.Array:
    """uncond + w * (cond - uncond): w=1 is the conditional model, w=0 the unconditional one.

    Applied to raw outputs of any objective. For fixed (z, logsnr) each conversion to eps (or x0) is
    affine in the prediction, eps = a*pred + b*z, and an affine map commutes with an affine combination
    whose coefficients sum to 1 ((1-w) + w), so guiding v or x0 equals guiding eps as in the paper.
    A per-example weight of shape [B] is broadcast over the image dims.
    """
    w = jnp.asarray(weight)
    if w.ndim == 1:
        w = expand_to(w, cond_pred)
    return uncond_pred + w * (cond_pred - uncond_pred)


def guided_model(model_fn: ModelFn, weight: float | jax.Array) -> Callable[..., jax.Array]:
    """Wrap model_fn(z, logsnr, cond) -> pred into guided(z, logsnr, cond, uncond) -> guided pred.

    cond and uncond are pytrees of the same structure whose leaves have batch as first dim (e.g. text
    embeddings + mask; for super-resolution the low-res image goes in both). The conditional and
    unconditional branches run as ONE forward on a doubled batch, which keeps the accelerator busy and
    traces the model once. A python weight of exactly 1.0 (0.0) skips the doubling and runs only the
    conditional (unconditional) branch.
    """

    def guided(z: jax.Array, logsnr: jax.Array, cond: Any, uncond: Any = None) -> jax.Array:
        if isinstance(weight, (int, float)) and weight == 1.0:
            return model_fn(z, logsnr, cond)
        if uncond is None:
            raise ValueError(f"guidance weight {weight} needs an unconditional input (uncond)")
        if isinstance(weight, (int, float)) and weight == 0.0:
            return model_fn(z, logsnr, uncond)
        batch = z.shape[0]
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
        pred = model_fn(jnp.concatenate([z, z], axis=0), jnp.concatenate([logsnr, logsnr], axis=0), both)
        return classifier_free_guidance(pred[:batch], pred[batch:], weight)

    return guided


def threshold_x0(x0: jax.Array, *, kind: Choice = "none", percentile: float | jax.Array = 99.5) -> jax.Array:
    """Keep an x0 prediction inside the data range [-1, 1].

    "static": clip to [-1, 1]. "dynamic" (Imagen): per sample s = max(1, percentile(|x0|, p));
    x0 <- clip(x0, -s, s) / s, which pulls saturated pixels inward instead of flattening them, and leaves
    samples whose p-th percentile is below 1 unchanged. `kind` is a name or its run-time index
    (`choice.index_of(name, THRESHOLD_KINDS, ...)`); `percentile` may be traced.
    """

    def dynamic(x: jax.Array) -> jax.Array:
        flat = jnp.abs(x.reshape(x.shape[0], -1)).astype(jnp.float32)
        s = jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0)
        s = expand_to(s, x).astype(x.dtype)
        return jnp.clip(x, -s, s) / s

    def static(x: jax.Array) -> jax.Array:
        return jnp.clip(x, -1.0, 1.0)

    return choice.switch(kind, THRESHOLD_KINDS, "threshold kind", (lambda x: x, static, dynamic), x0)
