"""What the network predicts (v, eps or x0), exact conversions between them, and the training loss.

With z = alpha*x + sigma*eps and alpha^2 + sigma^2 = 1:
    v   = alpha*eps - sigma*x            (Salimans & Ho 2022; a rotation of (x, eps))
    x   = alpha*z - sigma*v,   eps = sigma*z + alpha*v
    x   = (z - sigma*eps) / alpha,   eps = (z - alpha*x) / sigma
All log-SNR arguments are per example, shape [B], and broadcast over the image dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.schedules import alpha_sigma, expand_to

OBJECTIVES = ("v", "eps", "x0")
WEIGHTINGS = ("none", "min_snr", "snr_trunc")


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")


def _alpha_sigma_like(logsnr: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    return alpha_sigma(expand_to(logsnr, like))


def v_from_x_eps(x: jax.Array, eps: jax.Array, logsnr: jax.Array) -> jax.Array:
    alpha, sigma = _alpha_sigma_like(logsnr, x)
    return alpha * eps - sigma * x


def x_eps_from_v(v: jax.Array, z: jax.Array, logsnr: jax.Array) -> tuple[jax.Array, jax.Array]:
    alpha, sigma = _alpha_sigma_like(logsnr, z)
    return alpha * z - sigma * v, sigma * z + alpha * v


def x_from_eps(eps: jax.Array, z: jax.Array, logsnr: jax.Array) -> jax.Array:
    # Ill-conditioned at very low log-SNR (alpha -> 0): that is inherent to eps-prediction.
    alpha, sigma = _alpha_sigma_like(logsnr, z)
    return (z - sigma * eps) / alpha


def eps_from_x(x: jax.Array, z: jax.Array, logsnr: jax.Array) -> jax.Array:
    # Ill-conditioned at very high log-SNR (sigma -> 0): that is inherent to x0-prediction.
    alpha, sigma = _alpha_sigma_like(logsnr, z)
    return (z - alpha * x) / sigma


def prediction_to_x_eps(
    pred: jax.Array, z: jax.Array, logsnr: jax.Array, *, objective: str
) -> tuple[jax.Array, jax.Array]:
    """Turn a raw network output into (x0_hat, eps_hat); the one place samplers and losses do this."""
    _check_objective(objective)
    if objective == "v":
        return x_eps_from_v(pred, z, logsnr)
    if objective == "eps":
        return x_from_eps(pred, z, logsnr), pred
    return pred, eps_from_x(pred, z, logsnr)


def target(x: jax.Array, eps: jax.Array, logsnr: jax.Array, *, objective: str) -> jax.Array:
    """Regression target of the network for clean data x and noise eps."""
    _check_objective(objective)
    if objective == "v":
        return v_from_x_eps(x, eps, logsnr)
    return eps if objective == "eps" else x


def loss_weight(
    logsnr: jax.Array, *, objective: str, weighting: str = "none", min_snr_gamma: float = 5.0
) -> jax.Array:
    """Per-example weight [B] applied to the squared error of the chosen target.

    For fixed z, the target errors are proportional to the x0 error (snr = exp(logsnr)):
        |eps_hat - eps|^2 = snr * |x_hat - x|^2,   |v_hat - v|^2 = (snr + 1) * |x_hat - x|^2.
    A weighting is defined as an x0-space weight w_x(snr) and divided by that factor, so every objective
    optimises the same function of the x0 error:
        "none":      weight 1 on the chosen target (plain MSE; implicitly w_x = 1, snr or snr+1)
        "min_snr":   w_x = min(snr, gamma)   (Min-SNR-gamma, Hang et al. 2023)
                     -> eps: min(snr, gamma)/snr, x0: min(snr, gamma), v: min(snr, gamma)/(snr + 1)
        "snr_trunc": w_x = max(snr, 1)       (truncated SNR, Salimans & Ho 2022)
    Computed in log space so that log-SNR of +-20 neither overflows nor loses precision.
    """
    _check_objective(objective)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown loss weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    logsnr = jnp.asarray(logsnr, jnp.float32)
    if weighting == "none":
        return jnp.ones_like(logsnr)
    if weighting == "min_snr":
        log_wx = jnp.minimum(logsnr, jnp.log(min_snr_gamma))
    else:
        log_wx = jnp.maximum(logsnr, 0.0)
    log_factor = {"x0": jnp.zeros_like(logsnr), "eps": logsnr, "v": jax.nn.softplus(logsnr)}[objective]
    return jnp.exp(log_wx - log_factor)


def diffusion_loss(
    pred: jax.Array,
    x: jax.Array,
    eps: jax.Array,
    logsnr: jax.Array,
    *,
    objective: str = "v",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Per-example loss [B]: weight(logsnr) * mean over pixels of (pred - target)^2.

    pred is the raw network output for z = diffuse(x, eps, logsnr); see `loss_weight` for the weightings.
    mask (optional) is broadcastable to x after aligning its leading dims with the batch (e.g. [B] to drop
    examples, or [B, H, W, 1] for pixels); the mean is then taken over unmasked elements only and an
    example with nothing unmasked gets loss 0.
    """
    tgt = target(x, eps, logsnr, objective=objective)
    err = jnp.square(pred.astype(jnp.float32) - tgt.astype(jnp.float32))
    axes = tuple(range(1, err.ndim))
    if mask is None:
        per_example = jnp.mean(err, axis=axes)
    else:
        m = jnp.broadcast_to(expand_to(mask, err).astype(jnp.float32), err.shape)
        count = jnp.sum(m, axis=axes)
        per_example = jnp.sum(err * m, axis=axes) / jnp.maximum(count, 1e-12)
    w = loss_weight(logsnr, objective=objective, weighting=weighting, min_snr_gamma=min_snr_gamma)
    return w * per_example
