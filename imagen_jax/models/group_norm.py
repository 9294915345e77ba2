"""GroupNorm fused with what follows it in the U-Net (FiLM scale-shift, SiLU), with a hand-derived backward.

Autodiff of `nn.GroupNorm` then FiLM then SiLU keeps several float32 copies of the activation for the
backward pass (centred, normalised, modulated, the sigmoid) and differentiates each step into its own
kernels. The fused op keeps only its input and computes the backward in two passes: one reduction per
(example, channel), then one elementwise pass. The function is the same as the unfused layers' (forward
within float32 rounding, gradients too: `tests/test_group_norm.py`); the parameters are `nn.GroupNorm`'s
(`scale`, `bias`), so checkpoints are unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.parallel import axes

Dtype = Any
EPSILON = 1e-6  # nn.GroupNorm's
Film = tuple[jax.Array, jax.Array]  # (scale, shift), each [B, C]: the output is y * (1 + scale) + shift


def _per_channel(v: jax.Array, ndim: int) -> jax.Array:
    """[B, C] -> [B, 1, ..., 1, C], to broadcast against a [B, ..., C] activation."""
    return v.reshape(v.shape[0], *([1] * (ndim - 2)), v.shape[-1])


def _to_channels(v: jax.Array, channels: int) -> jax.Array:
    """[B, G] per-group values -> [B, C], each group's value on its channels."""
    b, g = v.shape
    return jnp.broadcast_to(v[:, :, None], (b, g, channels // g)).reshape(b, channels)


def _statistics(x: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and 1/std of each (example, group) in float32, as `nn.GroupNorm` computes them
    (variance as E[x^2] - E[x]^2, clipped at 0)."""
    b, c = x.shape[0], x.shape[-1]
    xg = x.astype(jnp.float32).reshape(b, -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3))
    var = jnp.maximum(0.0, jnp.square(xg).mean(axis=(1, 3)) - jnp.square(mean))
    return _to_channels(mean, c), _to_channels(jax.lax.rsqrt(var + EPSILON), c)


def _affine(gamma: jax.Array, beta: jax.Array, film: Film | None) -> tuple[jax.Array, jax.Array]:
    """The per-channel scale and shift applied to the normalised input: [C] or [B, C]."""
    gamma, beta = gamma.astype(jnp.float32), beta.astype(jnp.float32)
    if film is None:
        return gamma[None], beta[None]
    scale, shift = (f.astype(jnp.float32) for f in film)
    return gamma * (1.0 + scale), beta * (1.0 + scale) + shift


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def group_norm_act(
    x: jax.Array,
    gamma: jax.Array,
    beta: jax.Array,
    film: Film | None,
    groups: int,
    silu: bool,
    out_dtype: Dtype,
) -> jax.Array:
    """GroupNorm(x) * gamma + beta, then FiLM (y * (1 + scale) + shift) if `film` is given and SiLU if
    `silu`, for x [B, ..., C]; computed in float32 and returned as `out_dtype`."""
    mean, rstd = _statistics(x, groups)
    a, b = _affine(gamma, beta, film)
    # One factor per channel (rstd * a), not the normalised x then a: sharing the backward pass's x_hat
    # here made XLA plan the demo's step 10% larger and run it 20% slower (docs/benchmarks.md).
    z = (x.astype(jnp.float32) - _per_channel(mean, x.ndim)) * _per_channel(rstd * a, x.ndim)
    z = z + _per_channel(b, x.ndim)
    return (jax.nn.silu(z) if silu else z).astype(out_dtype)


def _forward(
    x: jax.Array, gamma: jax.Array, beta: jax.Array, film: Film | None, *static: Any
) -> tuple[jax.Array, tuple]:
    """custom_vjp's forward rule: the output, and the residuals the backward pass recomputes from."""
    return group_norm_act(x, gamma, beta, film, *static), (x, gamma, beta, film)


def _backward(groups: int, silu: bool, out_dtype: Dtype, residuals: tuple, grad: jax.Array) -> tuple:
    """custom_vjp's backward rule: the cotangents of x, gamma, beta and the FiLM pair."""
    del out_dtype
    x, gamma, beta, film = residuals
    mean, rstd = _statistics(x, groups)
    a, b = _affine(gamma, beta, film)
    x_hat = (x.astype(jnp.float32) - _per_channel(mean, x.ndim)) * _per_channel(rstd, x.ndim)
    dz = grad.astype(jnp.float32)
    if silu:
        z = x_hat * _per_channel(a, x.ndim) + _per_channel(b, x.ndim)
        sig = jax.nn.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    spatial = tuple(range(1, x.ndim - 1))
    sum_dz = dz.sum(spatial)  # [B, C]
    sum_dz_xhat = (dz * x_hat).sum(spatial)
    # d/dx of the normalisation, per group of n elements: rstd * (dx_hat - mean(dx_hat) - x_hat *
    # mean(dx_hat * x_hat)), where dx_hat = dz * a.
    batch, channels = sum_dz.shape
    n = x.size // (batch * groups)
    a = jnp.broadcast_to(a, sum_dz.shape)

    def group_mean(v: jax.Array) -> jax.Array:
        return _to_channels(v.reshape(batch, groups, -1).sum(-1) / n, channels)

    mean_dx_hat, mean_dx_hat_xhat = group_mean(a * sum_dz), group_mean(a * sum_dz_xhat)
    dx_hat = dz * _per_channel(a, x.ndim)
    dx = _per_channel(rstd, x.ndim) * (
        dx_hat - _per_channel(mean_dx_hat, x.ndim) - x_hat * _per_channel(mean_dx_hat_xhat, x.ndim)
    )
    if film is None:
        d_gamma, d_beta, d_film = sum_dz_xhat.sum(0), sum_dz.sum(0), None
    else:
        scale = film[0].astype(jnp.float32)
        d_gamma, d_beta = ((1.0 + scale) * sum_dz_xhat).sum(0), ((1.0 + scale) * sum_dz).sum(0)
        d_scale = gamma.astype(jnp.float32) * sum_dz_xhat + beta.astype(jnp.float32) * sum_dz
        d_film = (d_scale.astype(film[0].dtype), sum_dz.astype(film[1].dtype))
    return dx.astype(x.dtype), d_gamma.astype(gamma.dtype), d_beta.astype(beta.dtype), d_film


group_norm_act.defvjp(_forward, _backward)


class GroupNorm(nn.Module):
    """`nn.GroupNorm`'s parameters and statistics (float32 whatever the input's dtype), optionally followed
    by FiLM and SiLU in the same fused op."""

    num_groups: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, film: Film | None = None, *, silu: bool = False, dtype: Dtype = jnp.float32
    ) -> jax.Array:
        """x: [B, ..., C]; film: ([B, C], [B, C]) or None; the result is `dtype`."""
        channels = x.shape[-1]
        init = lambda fn: nn.with_logical_partitioning(fn, (axes.NORM,))  # noqa: E731
        gamma = self.param("scale", init(nn.initializers.ones), (channels,), self.param_dtype)
        beta = self.param("bias", init(nn.initializers.zeros), (channels,), self.param_dtype)
        groups = math.gcd(self.num_groups, channels)
        return group_norm_act(x, gamma, beta, film, groups, silu, jnp.dtype(dtype))
