"""Samplers on the continuous log-SNR schedule: ancestral DDPM, DDIM (eta), DPM-Solver++(2M) and its
stochastic form DPM-Solver++(2M) SDE.

DPM-Solver++(2M) SDE with r = exp(-2h) = snr_t / snr_s moves z_t to
    z_s = (sigma_s/sigma_t) e^{-h} z_t + alpha_s (1 - r) D + sigma_s sqrt(1 - r) noise,
which is exactly the ancestral (DDPM) posterior step with x0_hat replaced by 2M's extrapolated prediction
D: its fresh noise corrects the model's errors as ancestral sampling does, and D makes it second order.

Time grid: N steps from t_N = 1 down to t_0 = 0, each moving z from t_i to t_{i-1}. "uniform" (default):
t_i = i/N. "quadratic": t_i = (i/N)^2, denser near t=0 where log-SNR changes fastest; few-step DPM-Solver++
needs it (with the exact denoiser of Gaussian data, 20 uniform steps on the cosine schedule miss the std by
~2-12%, 20 quadratic steps by ~1%).

After the N-th step the result is the denoiser's x0 prediction at t=0 (one more model call, like
DPM-Solver's "denoise to zero"): lambda(0) is finite (~8.8 for cosine) so z_0 still holds a little noise,
while returning x0_hat at t_1 would shrink the sample std (x0_hat = E[x | z]; ~4% at t=1/20 on cosine).

Every update is a pure one-step function of (z, x0_hat, eps_hat, log-SNRs); `sample` runs them in one
`lax.fori_loop`, so the whole loop is on device and the model is traced once. The sampler, the time grid
and the number of steps may be chosen at run time (`choice`): then one compiled program serves them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import choice
from imagen_jax.diffusion.choice import Choice
from imagen_jax.diffusion.guidance import THRESHOLD_KINDS, guided_model, threshold_x0
from imagen_jax.diffusion.objectives import eps_from_x, prediction_to_x_eps
from imagen_jax.diffusion.schedules import Schedule, alpha_sigma

SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "dpmpp2m_sde")
TIME_GRIDS = ("uniform", "quadratic")

DenoiseFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def make_denoise_fn(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    *,
    objective: str,
    cond: Any = None,
    uncond: Any = None,
    guidance_weight: float | jax.Array = 1.0,
    threshold: Choice = "none",
    percentile: float | jax.Array = 99.5,
) -> DenoiseFn:
    """Compose model -> guidance -> (x0, eps) -> thresholding into denoise_fn(z, logsnr) -> (x0, eps).

    model_fn(z, logsnr, cond) -> raw prediction for `objective`. When x0 is thresholded, eps is recomputed
    from (z, x0) so that both outputs describe the same point and the sampler update stays consistent.
    Build this inside the jitted function so cond/uncond are traced arguments, not baked-in constants.
    `threshold` is a name of `THRESHOLD_KINDS` or its run-time index (`choice`).
    """
    guided = guided_model(model_fn, guidance_weight)
    if isinstance(threshold, str):
        choice.check_name(threshold, THRESHOLD_KINDS, "threshold kind")

    def denoise_fn(z: jax.Array, logsnr: jax.Array) -> tuple[jax.Array, jax.Array]:
        pred = guided(z, logsnr, cond, uncond)
        x0, eps = prediction_to_x_eps(pred, z, logsnr, objective=objective)
        unclipped = choice.equals(threshold, "none", THRESHOLD_KINDS)
        if unclipped is True:  # named "none": the program holds no thresholding
            return x0, eps
        clipped = threshold_x0(x0, kind=threshold, percentile=percentile)
        return clipped, jnp.where(unclipped, eps, eps_from_x(clipped, z, logsnr))

    return denoise_fn


# ----------------------------------------------------------------------------------------------------
# One-step updates. logsnr_t > ... are scalars (the whole batch shares a time); s is the next, less
# noisy time, so logsnr_s > logsnr_t.


def ddpm_step(
    z: jax.Array, x0_hat: jax.Array, *, logsnr_t: jax.Array, logsnr_s: jax.Array, noise: jax.Array
) -> jax.Array:
    """Ancestral step: sample the posterior q(z_s | z_t, x = x0_hat).

    With r = snr_t / snr_s = exp(lambda_t - lambda_s) < 1:
        mean = r * (alpha_s / alpha_t) * z_t + (1 - r) * alpha_s * x,   var = (1 - r) * sigma_s^2.
    1 - r is formed as -expm1(lambda_t - lambda_s): it is tiny for fine steps and would cancel otherwise.
    """
    alpha_t, _ = alpha_sigma(logsnr_t)
    alpha_s, sigma_s = alpha_sigma(logsnr_s)
    one_minus_r = -jnp.expm1(logsnr_t - logsnr_s)
    r = jnp.exp(logsnr_t - logsnr_s)
    mean = (r * alpha_s / alpha_t) * z + (one_minus_r * alpha_s) * x0_hat
    return mean + jnp.sqrt(one_minus_r) * sigma_s * noise


def ddim_step(
    x0_hat: jax.Array,
    eps_hat: jax.Array,
    *,
    logsnr_t: jax.Array,
    logsnr_s: jax.Array,
    eta: float | jax.Array = 0.0,
    noise: jax.Array | None = None,
) -> jax.Array:
    """DDIM: z_s = alpha_s*x0 + sqrt(sigma_s^2 - c^2)*eps + c*noise, c = eta * sqrt(1 - r) * sigma_s.

    eta=0 is the deterministic DDIM; eta=1 gives c^2 equal to the posterior variance and the same mean,
    i.e. exactly the ancestral step for a consistent (x0_hat, eps_hat) pair.
    """
    alpha_s, sigma_s = alpha_sigma(logsnr_s)
    c = eta * jnp.sqrt(-jnp.expm1(logsnr_t - logsnr_s)) * sigma_s
    z_s = alpha_s * x0_hat + jnp.sqrt(jnp.maximum(jnp.square(sigma_s) - jnp.square(c), 0.0)) * eps_hat
    if noise is not None:
        z_s = z_s + c * noise
    return z_s


def extrapolated_x0(
    x0_hat: jax.Array,
    x0_prev: jax.Array,
    *,
    logsnr_prev: jax.Array,
    logsnr_t: jax.Array,
    logsnr_s: jax.Array,
    first: jax.Array | bool,
) -> jax.Array:
    """DPM-Solver++(2M)'s data prediction D = (1 + 1/(2q)) x0_hat - 1/(2q) x0_prev, q = h_prev / h, with
    h = lambda_s - lambda_t in lambda = logsnr/2: a linear extrapolation in lambda from the previous step's
    prediction to the middle of this step. `first` (no usable history) gives x0_hat itself."""
    h = 0.5 * (logsnr_s - logsnr_t)
    h_prev = 0.5 * (logsnr_t - logsnr_prev)
    k = 0.5 * h / jnp.where(first, 1.0, h_prev)  # 1/(2q); guarded so the unused branch stays finite
    return jnp.where(first, x0_hat, (1.0 + k) * x0_hat - k * x0_prev)


def dpmpp_step(z: jax.Array, d: jax.Array, *, logsnr_t: jax.Array, logsnr_s: jax.Array) -> jax.Array:
    """DPM-Solver++ in lambda = log(alpha/sigma) = logsnr/2 from a data prediction d:
    z_s = (sigma_s/sigma_t) z_t - alpha_s expm1(-h) d, h = lambda_s - lambda_t. With d = x0_hat it is first
    order (= DDIM); with d = `extrapolated_x0` it is DPM-Solver++(2M), multistep second order."""
    _, sigma_t = alpha_sigma(logsnr_t)
    alpha_s, sigma_s = alpha_sigma(logsnr_s)
    return (sigma_s / sigma_t) * z - (alpha_s * jnp.expm1(-0.5 * (logsnr_s - logsnr_t))) * d


# ----------------------------------------------------------------------------------------------------


def sample(
    denoise_fn: DenoiseFn,
    *,
    shape: tuple[int, ...],
    rng: jax.Array,
    schedule: Schedule,
    sampler: Choice,
    num_steps: int | jax.Array,
    eta: float | jax.Array = 0.0,
    z_init: jax.Array | None = None,
    dtype: Any = jnp.float32,
    time_grid: Choice = "uniform",
    t_start: float | jax.Array = 1.0,
) -> jax.Array:
    """Draw samples x0 of `shape` (batch first) by integrating from t=t_start to t=0 in `num_steps` steps.

    denoise_fn(z, logsnr[B]) -> (x0_hat, eps_hat); see `make_denoise_fn`. Uses num_steps + 1 denoiser calls
    (the last turns z_0 into x0_hat). `eta` is used by "ddim" only. Jittable with shape and schedule
    static; deterministic given rng. `sampler` and `time_grid` are names, or int32 indices into `SAMPLERS`
    and `TIME_GRIDS` (`choice.index_of`), and `num_steps` an int or an int32 array: traced, they are
    chosen at run time, so one program serves every value. z and the model input are kept in `dtype`;
    the update arithmetic is float32. t_start < 1 with z_init an image diffused to t_start (`diffuse`) is
    SDEdit: the time grid is scaled into [0, t_start], so every step is spent below it.
    """
    if isinstance(sampler, str):
        choice.check_name(sampler, SAMPLERS, "sampler")
    if isinstance(time_grid, str):
        choice.check_name(time_grid, TIME_GRIDS, "time grid")
    if isinstance(num_steps, int) and num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    init_key, loop_key = jax.random.split(rng)
    z = jax.random.normal(init_key, shape, dtype) if z_init is None else jnp.asarray(z_init, dtype)
    # No noise draws in deterministic DDIM (a python eta of 0 is known to be deterministic).
    deterministic_ddim = isinstance(eta, (int, float)) and eta == 0
    batch = shape[0]

    def logsnr_at(j):  # log-SNR at grid point t_j, j = N..0
        u = jnp.maximum(j, 0) / num_steps  # clamped: iteration N asks for t_{-1}, see below
        u = jnp.where(choice.equals(time_grid, "quadratic", TIME_GRIDS), jnp.square(u), u)
        return schedule.logsnr(t_start * u)

    # The four updates from z_t to z_s. Each draws its own noise, so a sampler chosen at run time draws
    # only what it uses, and the same numbers as when it is chosen by name.
    def noise(key):
        return jax.random.normal(key, shape, jnp.float32)

    def ddpm(zf, x0_hat, eps_hat, d, lt, ls, key):
        del eps_hat, d
        return ddpm_step(zf, x0_hat, logsnr_t=lt, logsnr_s=ls, noise=noise(key))

    def ddim(zf, x0_hat, eps_hat, d, lt, ls, key):
        del zf, d
        drawn = None if deterministic_ddim else noise(key)
        return ddim_step(x0_hat, eps_hat, logsnr_t=lt, logsnr_s=ls, eta=eta, noise=drawn)

    def dpmpp2m(zf, x0_hat, eps_hat, d, lt, ls, key):
        del x0_hat, eps_hat, key
        return dpmpp_step(zf, d, logsnr_t=lt, logsnr_s=ls)

    def dpmpp2m_sde(zf, x0_hat, eps_hat, d, lt, ls, key):
        # An ancestral step from the extrapolated prediction.
        del x0_hat, eps_hat
        return ddpm_step(zf, d, logsnr_t=lt, logsnr_s=ls, noise=noise(key))

    def body(i, carry):
        z, x0_prev, logsnr_prev = carry
        # Iteration i < N steps from t_{N-i} to t_{N-i-1}. Iteration N (t=0) only denoises; it sits in the
        # loop rather than after it so a large model is traced once, and its step is a no-op (s = t).
        logsnr_t, logsnr_s = logsnr_at(num_steps - i), logsnr_at(num_steps - i - 1)
        x0_hat, eps_hat = denoise_fn(z, jnp.full((batch,), logsnr_t, jnp.float32))
        x0_hat, eps_hat = x0_hat.astype(jnp.float32), eps_hat.astype(jnp.float32)
        # The 2M samplers' prediction. First step: no history. Step into t=0: first order, since the
        # log-SNR jump there is the largest on any grid and extrapolating x0_hat over it overshoots
        # (DPM-Solver's "lower order final"). Unused by the other samplers (and removed by XLA when the
        # sampler is named).
        first = (i == 0) | (i >= num_steps - 1)
        d = extrapolated_x0(
            x0_hat, x0_prev, logsnr_prev=logsnr_prev, logsnr_t=logsnr_t, logsnr_s=logsnr_s, first=first
        )
        z_s = choice.switch(
            sampler,
            SAMPLERS,
            "sampler",
            (ddpm, ddim, dpmpp2m, dpmpp2m_sde),
            z.astype(jnp.float32),
            x0_hat,
            eps_hat,
            d,
            logsnr_t,
            logsnr_s,
            jax.random.fold_in(loop_key, i),
        )
        z_next = jnp.where(i == num_steps, x0_hat, z_s).astype(dtype)
        return z_next, x0_hat, logsnr_t

    carry = (z, jnp.zeros(shape, jnp.float32), jnp.zeros((), jnp.float32))
    x0, _, _ = jax.lax.fori_loop(0, num_steps + 1, body, carry)
    return x0
