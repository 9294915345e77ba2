"""Noise-conditioning augmentation of a super-resolution stage's low-resolution input (Imagen, sec. 2.5).

The one implementation both the train step and the cascade sampler call, so the two cannot drift apart.
An augmentation level `a` in [0, 1] is a time on the stage's own log-SNR schedule: the low-res image is
noised exactly like the forward process, z = alpha(a) * x + sigma(a) * eps (variance preserving), and the
U-Net is told log-SNR(a). Training draws a level per example, uniform over a range, so the stage learns to
fix whatever artefacts the previous stage leaves; sampling uses one fixed level (0 = the input as given).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.schedules import Schedule, diffuse


def draw_levels(rng: jax.Array, batch: int, level_range: Sequence[float]) -> jax.Array:
    """Per-example augmentation levels [batch], uniform over `level_range` = (low, high) in [0, 1]."""
    low, high = (float(v) for v in level_range)
    return jax.random.uniform(rng, (batch,), jnp.float32, minval=low, maxval=high)


def augment(
    lowres: jax.Array, level: jax.Array, rng: jax.Array, schedule: Schedule
) -> tuple[jax.Array, jax.Array]:
    """(noised low-res image, its log-SNR [B]) for levels `level` ([B] or a scalar).

    Level 0 returns the image unchanged (the schedule's clipped log-SNR at t=0 would still add ~1e-4 noise).
    """
    level = jnp.broadcast_to(jnp.asarray(level, jnp.float32), lowres.shape[:1])
    logsnr = schedule.logsnr(level)
    eps = jax.random.normal(rng, lowres.shape, lowres.dtype)
    noised = diffuse(lowres, eps, logsnr)
    keep = (level > 0).reshape((-1,) + (1,) * (lowres.ndim - 1))
    return jnp.where(keep, noised, lowres), logsnr
