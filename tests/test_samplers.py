"""Samplers (imagen_jax.diffusion.samplers): one-step updates alone, then whole loops with exact denoisers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import (
    SAMPLERS,
    THRESHOLD_KINDS,
    TIME_GRIDS,
    alpha_sigma,
    choice,
    ddim_step,
    ddpm_step,
    diffuse,
    dpmpp_step,
    eps_from_x,
    expand_to,
    extrapolated_x0,
    get_schedule,
    make_denoise_fn,
    sample,
    target,
)

MU, STD = 0.5, 0.3  # 1-D Gaussian data N(MU, STD^2)


def gaussian_denoiser(z, logsnr):
    """Exact E[x|z], E[eps|z] for x ~ N(MU, STD^2): z = alpha x + sigma eps has variance a^2 s^2 + sigma^2."""
    alpha, sigma = alpha_sigma(expand_to(logsnr, z))
    var = alpha**2 * STD**2 + sigma**2
    resid = z - alpha * MU
    return MU + alpha * STD**2 / var * resid, sigma / var * resid


def point_denoiser(x_true):
    """Exact denoiser for data that is always x_true: x0_hat = x_true, eps_hat consistent with z."""
    return lambda z, logsnr: (jnp.broadcast_to(x_true, z.shape), eps_from_x(x_true, z, logsnr))


def _jit_sample(denoise_fn, **static):
    return jax.jit(functools.partial(sample, denoise_fn, **static))


# ------------------------------------------------------------------------------------------ single steps


def _on_trajectory(logsnr_t, logsnr_s, seed=0):
    kx, ke = jax.random.split(jax.random.key(seed))
    x, eps = jax.random.normal(kx, (8, 5)), jax.random.normal(ke, (8, 5))
    z_t = diffuse(x, eps, jnp.full((8,), logsnr_t))
    z_s = diffuse(x, eps, jnp.full((8,), logsnr_s))
    return x, eps, z_t, z_s


@pytest.mark.parametrize("logsnr_t,logsnr_s", [(-8.0, -3.0), (0.0, 0.5), (4.0, 9.0)])
def test_deterministic_steps_exact_for_known_x(logsnr_t, logsnr_s):
    # With the true (x, eps) every deterministic update lands exactly on z_s = alpha_s x + sigma_s eps;
    # for 2M the extrapolation is exact too because x0_hat does not change along the path.
    x, eps, z_t, z_s = _on_trajectory(logsnr_t, logsnr_s)
    lt, ls = jnp.float32(logsnr_t), jnp.float32(logsnr_s)
    np.testing.assert_allclose(ddim_step(x, eps, logsnr_t=lt, logsnr_s=ls), z_s, atol=1e-5)
    for first in (True, False):
        d = extrapolated_x0(x, x, logsnr_prev=lt - 1.0, logsnr_t=lt, logsnr_s=ls, first=first)
        np.testing.assert_allclose(dpmpp_step(z_t, d, logsnr_t=lt, logsnr_s=ls), z_s, atol=1e-5)


def test_dpmpp_2m_second_order_term():
    # x0_hat linear in lambda = logsnr/2: x0(lambda) = a + b*lambda. 2M uses D = x0_t + h/(2 h_prev) *
    # (x0_t - x0_prev), i.e. exactly x0 at the midpoint lambda_t + h/2.
    lt, ls, lp = jnp.float32(0.0), jnp.float32(2.0), jnp.float32(-1.0)
    x_at = lambda lam: 0.3 + 0.2 * lam / 2.0
    d = extrapolated_x0(x_at(lt), x_at(lp), logsnr_prev=lp, logsnr_t=lt, logsnr_s=ls, first=False)
    np.testing.assert_allclose(d, x_at(lt + (ls - lt) / 2.0), atol=1e-6)


def test_extrapolated_x0_is_2ms_prediction_and_x0_hat_when_first():
    lt, ls, lp = jnp.float32(-1.0), jnp.float32(1.5), jnp.float32(-3.0)
    x, x_prev = jnp.linspace(-1.0, 1.0, 5) * 0.4, jnp.linspace(-1.0, 1.0, 5) * -0.2
    kw = dict(logsnr_prev=lp, logsnr_t=lt, logsnr_s=ls)
    np.testing.assert_array_equal(extrapolated_x0(x, x_prev, first=True, **kw), x)
    # D = x + h / (2 h_prev) * (x - x_prev), h and h_prev in lambda = logsnr / 2.
    k = (2.5 / 2) / (2 * 2.0 / 2)
    np.testing.assert_allclose(extrapolated_x0(x, x_prev, first=False, **kw), x + k * (x - x_prev), atol=1e-6)


def test_ddpm_step_is_gaussian_posterior():
    # Reference posterior q(z_s | z_t, x) by Gaussian conditioning in float64, independent of the
    # expm1-based formula: z_s = a_s x + s_s e1, z_t = a_t x + s_t e where Cov(z_s, z_t) = a_t/a_s * s_s^2.
    lt, ls = -1.0, 1.5
    a_t, s_t = np.sqrt(1 / (1 + np.exp(-lt))), np.sqrt(1 / (1 + np.exp(lt)))
    a_s, s_s = np.sqrt(1 / (1 + np.exp(-ls))), np.sqrt(1 / (1 + np.exp(ls)))
    cov_st = a_t / a_s * s_s**2
    x, z_t = 0.7, np.array([-1.2, 0.1, 2.0])
    mean_ref = a_s * x + cov_st / s_t**2 * (z_t - a_t * x)
    std_ref = np.sqrt(s_s**2 - cov_st**2 / s_t**2)
    zt32, x32 = jnp.asarray(z_t, jnp.float32), jnp.full((3,), x, jnp.float32)
    step = functools.partial(ddpm_step, zt32, x32, logsnr_t=jnp.float32(lt), logsnr_s=jnp.float32(ls))
    mean = step(noise=jnp.zeros(3))
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5)
    np.testing.assert_allclose(step(noise=jnp.ones(3)) - mean, std_ref, rtol=1e-5)


# ------------------------------------------------------------------------------------------ whole loops


@pytest.mark.parametrize(
    "schedule,sampler,num_steps,time_grid,tol",
    [
        ("cosine", "ddim", 500, "uniform", 0.02),
        ("cosine", "dpmpp2m", 20, "quadratic", 0.02),
        ("cosine", "ddpm", 1000, "uniform", 0.02),
        ("linear", "ddim", 500, "uniform", 0.02),
        ("linear", "dpmpp2m", 50, "quadratic", 0.02),
        # Few uniform steps end with a big log-SNR jump into t=0; the first-order final step keeps 2M at
        # ~-1.6% std here, extrapolating over it would give ~+12%.
        ("cosine", "dpmpp2m", 20, "uniform", 0.03),
        ("cosine", "dpmpp2m_sde", 25, "quadratic", 0.02),
        ("linear", "dpmpp2m_sde", 50, "quadratic", 0.02),
    ],
)
def test_sampler_reproduces_gaussian(schedule, sampler, num_steps, time_grid, tol):
    n = 20000
    run = _jit_sample(
        gaussian_denoiser,
        shape=(n,),
        schedule=get_schedule(schedule),
        sampler=sampler,
        num_steps=num_steps,
        time_grid=time_grid,
    )
    x = np.asarray(run(rng=jax.random.key(0)), np.float64)
    # Sampling error of the statistics at n=20000 is ~0.4% (mean) and ~0.5% (std) of these values.
    assert abs(x.mean() / MU - 1) < tol, x.mean()
    assert abs(x.std() / STD - 1) < tol, x.std()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_deterministic_samplers_recover_point_data(sampler):
    # Data that is always x_true: with its exact denoiser the deterministic samplers must return x_true.
    x_true = jnp.linspace(-1.0, 1.0, 6)
    run = _jit_sample(
        point_denoiser(x_true), shape=(4, 6), schedule=get_schedule("cosine"), sampler=sampler, num_steps=7
    )
    np.testing.assert_allclose(run(rng=jax.random.key(1)), jnp.broadcast_to(x_true, (4, 6)), atol=1e-5)


def test_ddim_eta_one_equals_ancestral():
    common = dict(shape=(64,), schedule=get_schedule("cosine"), num_steps=30)
    ddpm = _jit_sample(gaussian_denoiser, sampler="ddpm", **common)(rng=jax.random.key(5))
    ddim1 = _jit_sample(gaussian_denoiser, sampler="ddim", eta=1.0, **common)(rng=jax.random.key(5))
    ddim0 = _jit_sample(gaussian_denoiser, sampler="ddim", eta=0.0, **common)(rng=jax.random.key(5))
    np.testing.assert_allclose(ddim1, ddpm, atol=1e-4)
    assert not np.allclose(ddim0, ddpm, atol=1e-2)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m", "dpmpp2m_sde"])
def test_determinism_and_single_compile(sampler):
    traces = []

    def denoise(z, logsnr):
        traces.append(z.shape)  # runs at trace time only
        return gaussian_denoiser(z, logsnr)

    run = _jit_sample(
        denoise, shape=(2, 3, 3, 1), schedule=get_schedule("cosine"), sampler=sampler, num_steps=5
    )
    a = run(rng=jax.random.key(0))
    b = run(rng=jax.random.key(0))
    c = run(rng=jax.random.key(1))
    assert len(traces) == 1, f"denoiser traced {len(traces)} times; expected one trace for the whole loop"
    assert a.shape == (2, 3, 3, 1) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize(
    "sampler,num_steps,time_grid", [("ddpm", 500, "uniform"), ("dpmpp2m_sde", 25, "quadratic")]
)
def test_sampling_from_t_start_keeps_the_data_distribution(sampler, num_steps, time_grid):
    # SDEdit: data diffused to t_start is the schedule's marginal there, so integrating from t_start with
    # the exact denoiser gives the data distribution back. Each result is a posterior draw given its z, so
    # its correlation with the data point it started from is corr(x, z)^2 = a^2 s^2 / (a^2 s^2 + sigma^2).
    n, t_start, schedule = 20000, 0.3, get_schedule("cosine")
    logsnr = schedule.logsnr(t_start)
    kx, ke = jax.random.split(jax.random.key(3))
    x = MU + STD * jax.random.normal(kx, (n,))
    z = diffuse(x, jax.random.normal(ke, (n,)), jnp.full((n,), logsnr))
    run = _jit_sample(
        gaussian_denoiser, shape=(n,), schedule=schedule, sampler=sampler, num_steps=num_steps,
        time_grid=time_grid,
    )
    out = np.asarray(run(rng=jax.random.key(4), z_init=z, t_start=t_start), np.float64)
    assert abs(out.mean() / MU - 1) < 0.03 and abs(out.std() / STD - 1) < 0.03, (out.mean(), out.std())
    alpha, sigma = (float(v) for v in alpha_sigma(logsnr))
    expected = alpha**2 * STD**2 / (alpha**2 * STD**2 + sigma**2)  # 0.26 here
    assert abs(np.corrcoef(out, np.asarray(x))[0, 1] - expected) < 0.03
    # From t=1 the same z is only noise: the data points are forgotten.
    whole = np.asarray(run(rng=jax.random.key(4), z_init=z), np.float64)
    assert abs(np.corrcoef(whole, np.asarray(x))[0, 1]) < 0.05


def test_options_chosen_at_run_time_sample_as_named_ones_from_one_program():
    # The sampler, its step count and time grid as inputs of one program give what each named program
    # gives; the model is traced once for all of them.
    traces = []

    def denoise(z, logsnr):
        traces.append(z.shape)
        return gaussian_denoiser(z, logsnr)

    common = dict(shape=(64,), schedule=get_schedule("cosine"))

    @jax.jit
    def chosen(rng, sampler, num_steps, time_grid, eta):
        return sample(denoise, rng=rng, sampler=sampler, num_steps=num_steps, time_grid=time_grid, eta=eta,
                      **common)

    cases = [
        ("ddpm", 7, "uniform", 0.0),
        ("ddim", 5, "quadratic", 0.0),
        ("ddim", 4, "uniform", 0.7),
        ("dpmpp2m", 6, "quadratic", 0.0),
        ("dpmpp2m", 1, "uniform", 0.0),
        ("dpmpp2m_sde", 3, "uniform", 0.0),
    ]
    for sampler, num_steps, time_grid, eta in cases:
        named = _jit_sample(
            gaussian_denoiser, sampler=sampler, num_steps=num_steps, time_grid=time_grid, eta=eta, **common
        )(rng=jax.random.key(3))
        at_run_time = chosen(
            jax.random.key(3),
            choice.index_of(sampler, SAMPLERS, "sampler"),
            jnp.int32(num_steps),
            choice.index_of(time_grid, TIME_GRIDS, "time grid"),
            jnp.float32(eta),
        )
        np.testing.assert_allclose(at_run_time, named, rtol=1e-5, atol=1e-6, err_msg=f"{sampler} {num_steps}")
    assert len(traces) == 1


def test_z_init_and_bfloat16():
    z_init = jnp.full((4,), 0.25)
    kw = dict(shape=(4,), schedule=get_schedule("cosine"), sampler="ddim", num_steps=8, z_init=z_init)
    a = sample(gaussian_denoiser, rng=jax.random.key(0), **kw)
    b = sample(gaussian_denoiser, rng=jax.random.key(9), **kw)
    np.testing.assert_allclose(a, b)  # deterministic DDIM from a given start ignores rng
    low = sample(gaussian_denoiser, rng=jax.random.key(0), dtype=jnp.bfloat16, **kw)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), a, atol=2e-2)


def test_unknown_names_raise():
    kw = dict(shape=(2,), rng=jax.random.key(0), schedule=get_schedule("cosine"), num_steps=2)
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp2m"):
        sample(gaussian_denoiser, sampler="euler", **kw)
    with pytest.raises(ValueError, match="uniform, quadratic"):
        sample(gaussian_denoiser, sampler="ddim", time_grid="karras", **kw)


# ------------------------------------------------------------------------------------------ make_denoise_fn


def test_make_denoise_fn_objective_guidance_threshold():
    x_true = jnp.array([[0.2, -0.4, 1.8]])  # one value outside [-1, 1]
    z = jnp.array([[0.3, -0.1, 0.9]])
    logsnr = jnp.array([1.0])
    calls = []

    def model_fn(z_in, logsnr_in, cond):
        # v-prediction model that is exact for x_true when cond == 1 and predicts x=0 when cond == 0.
        calls.append(z_in.shape[0])
        x = x_true * cond[:, None]
        return target(x, eps_from_x(x, z_in, logsnr_in), logsnr_in, objective="v")

    cond, uncond = jnp.ones((1,)), jnp.zeros((1,))
    x0, eps = make_denoise_fn(model_fn, objective="v", cond=cond)(z, logsnr)
    np.testing.assert_allclose(x0, x_true, atol=1e-5)
    np.testing.assert_allclose(eps, eps_from_x(x_true, z, logsnr), atol=1e-5)
    # Guidance w=2: x0 = 0 + 2 * (x_true - 0), one doubled forward.
    calls.clear()
    fn = make_denoise_fn(model_fn, objective="v", cond=cond, uncond=uncond, guidance_weight=2.0)
    np.testing.assert_allclose(fn(z, logsnr)[0], 2.0 * x_true, atol=1e-5)
    assert calls == [2]
    # Static thresholding clips x0 and recomputes eps from it, so (x0, eps) stay consistent with z.
    fn = make_denoise_fn(model_fn, objective="v", cond=cond, threshold="static")
    x0, eps = fn(z, logsnr)
    np.testing.assert_allclose(x0, jnp.clip(x_true, -1.0, 1.0), atol=1e-5)
    alpha, sigma = alpha_sigma(expand_to(logsnr, z))
    np.testing.assert_allclose(alpha * x0 + sigma * eps, z, atol=1e-5)
    # Thresholding chosen at run time (with a traced percentile) gives what each name gives.
    def denoise(kind, percentile):
        return make_denoise_fn(model_fn, objective="v", cond=cond, threshold=kind, percentile=percentile)

    for kind in THRESHOLD_KINDS:
        named = denoise(kind, 90.0)(z, logsnr)
        index = choice.index_of(kind, THRESHOLD_KINDS, "threshold")
        at_run_time = jax.jit(lambda k, p: denoise(k, p)(z, logsnr))(index, jnp.float32(90.0))
        for a, b in zip(at_run_time, named, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=kind)
    # (At the 90th percentile the dynamic threshold scales x0 down, unlike the static one.)
    assert not np.allclose(denoise("dynamic", 90.0)(z, logsnr)[0], denoise("static", 90.0)(z, logsnr)[0])
    with pytest.raises(ValueError, match="none, static, dynamic"):
        make_denoise_fn(model_fn, objective="v", cond=cond, threshold="soft")
