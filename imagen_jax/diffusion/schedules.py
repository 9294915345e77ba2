"""Noise schedules in continuous time, parametrised by log-SNR.

Time t runs over [0, 1]: t=0 is (almost) clean data, t=1 (almost) pure noise. A schedule maps t to
lambda(t) = log(alpha^2 / sigma^2), strictly decreasing, with alpha^2 = sigmoid(lambda) and
sigma^2 = sigmoid(-lambda) (variance preserving: alpha^2 + sigma^2 = 1), and z_t = alpha*x + sigma*eps.

Clipping to [logsnr_min, logsnr_max] is done by squeezing t into the sub-interval of the natural schedule
whose log-SNR lies in that range (as google-research diffusion_distillation does), not by clamping lambda:
clamping would make lambda flat near the ends, so a sampler would spend steps that do nothing and the
time -> log-SNR map would no longer be invertible.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

SCHEDULE_NAMES = ("cosine", "linear")

_COSINE_S = 0.008  # Nichol & Dhariwal offset that keeps the t=0 noise level non-zero
_LINEAR_BETA0 = 1e-4  # DDPM beta_1
_LINEAR_DBETA = 10.0  # (beta_T - beta_1) * T / 2 with beta_T=0.02, T=1000, in continuous time


def expand_to(v: jax.Array, like: jax.Array) -> jax.Array:
    """Reshape a per-example array [B] (or a scalar) so it broadcasts over `like` [B, ...].

    The one broadcasting helper of the diffusion package: log-SNR, alpha, sigma and loss weights are all
    per example and must multiply images of any rank.
    """
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (jnp.ndim(like) - v.ndim))


def _cosine_angles(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    """Angles a in (0, pi/2) with lambda = -2 log tan(a) at t=0 and t=1, clipped to the natural range."""
    # Natural cosine: a(t) = pi/2 * (t + s) / (1 + s). a(0) gives lambda ~ 8.77; a(1) = pi/2 gives -inf.
    a_natural_0 = 0.5 * math.pi * _COSINE_S / (1.0 + _COSINE_S)
    a_lo = max(math.atan(math.exp(-0.5 * logsnr_max)), a_natural_0)
    a_hi = math.atan(math.exp(-0.5 * logsnr_min))  # always < pi/2 for finite logsnr_min
    return a_lo, a_hi


def _linear_logsnr_natural(t):
    return -jnp.log(jnp.expm1(_LINEAR_BETA0 + _LINEAR_DBETA * jnp.square(t)))


def _linear_t_of_logsnr(logsnr: float) -> float:
    # Inverse of lambda = -log(expm1(q)), q = beta0 + dbeta t^2: q = log1p(exp(-lambda)) = softplus(-lambda).
    q = max(-logsnr, 0.0) + math.log1p(math.exp(-abs(logsnr)))
    return math.sqrt(max(q - _LINEAR_BETA0, 0.0) / _LINEAR_DBETA)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A named log-SNR schedule restricted to [logsnr_min, logsnr_max].

    Frozen (hence hashable), so it can be a static argument of `jax.jit`. The endpoints are
    lambda(0) = min(logsnr_max, natural lambda(0)) and lambda(1) = max(logsnr_min, natural lambda(1)).
    """

    name: str
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0

    def __post_init__(self):
        if self.name not in SCHEDULE_NAMES:
            raise ValueError(f"Unknown schedule {self.name!r}; allowed: {', '.join(SCHEDULE_NAMES)}")
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"Need logsnr_min < logsnr_max, got {self.logsnr_min} and {self.logsnr_max}")

    def logsnr(self, t: jax.Array) -> jax.Array:
        """log-SNR at time(s) t in [0, 1]; strictly decreasing in t."""
        t = jnp.asarray(t, dtype=jnp.result_type(t, jnp.float32))
        if self.name == "cosine":
            a_lo, a_hi = _cosine_angles(self.logsnr_min, self.logsnr_max)
            c_lo, c_hi = 0.5 * math.pi - a_lo, 0.5 * math.pi - a_hi
            # lambda = -2 log tan(a) = 2 (log sin(pi/2 - a) - log sin(a)). Each angle is formed from the end
            # where it is small, so neither tan(a) near pi/2 nor pi/2 - a suffers cancellation in float32.
            a = a_lo + t * (a_hi - a_lo)
            c = c_hi + (1.0 - t) * (c_lo - c_hi)
            return 2.0 * (jnp.log(jnp.sin(c)) - jnp.log(jnp.sin(a)))
        # linear: natural range is about [-10.0, 9.21]; squeeze t only where the config is tighter.
        t_lo = _linear_t_of_logsnr(self.logsnr_max) if self.logsnr_max < -math.log(math.expm1(1e-4)) else 0.0
        t_hi = min(_linear_t_of_logsnr(self.logsnr_min), 1.0)
        return _linear_logsnr_natural(t_lo + t * (t_hi - t_lo))


def get_schedule(name: str, *, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> Schedule:
    """Schedule by name ("cosine" or "linear"); raises ValueError listing the names for an unknown one."""
    return Schedule(name=name, logsnr_min=float(logsnr_min), logsnr_max=float(logsnr_max))


def shift_logsnr(logsnr: jax.Array, shift: float, schedule: Schedule) -> jax.Array:
    """`logsnr` moved by `shift` (log-SNR units: the SNR times exp(shift)), clipped to the schedule's range.

    For training times only: drawing t uniformly and shifting its log-SNR down spends more of training at
    high noise, where a text-to-image model decides the layout, while sampling keeps the schedule (the
    model is conditioned on log-SNR, so it is the same function at every level). The shifted noise
    schedules of Hoogeboom et al. (simple diffusion) and SD3's time shift move the noise level this way.
    """
    if shift == 0:
        return logsnr
    return jnp.clip(logsnr + shift, schedule.logsnr_min, schedule.logsnr_max)


def alpha_sigma(logsnr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) for a log-SNR; sigmoid keeps both accurate at extreme log-SNR."""
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def diffuse(x: jax.Array, eps: jax.Array, logsnr: jax.Array) -> jax.Array:
    """Sample q(z_t | x): z = alpha*x + sigma*eps, with per-example log-SNR [B] broadcast over x [B, ...]."""
    alpha, sigma = alpha_sigma(expand_to(logsnr, x))
    return alpha * x + sigma * eps
