"""Schedules, objective conversions, losses, guidance and thresholding (imagen_jax.diffusion)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import (
    OBJECTIVES,
    Schedule,
    alpha_sigma,
    classifier_free_guidance,
    diffuse,
    diffusion_loss,
    eps_from_x,
    get_schedule,
    guided_model,
    loss_weight,
    prediction_to_x_eps,
    shift_logsnr,
    target,
    threshold_x0,
    v_from_x_eps,
    x_eps_from_v,
    x_from_eps,
)


def _data(n=256, d=6, lo=-10.0, hi=10.0, seed=0):
    kx, ke, kl = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, d))
    eps = jax.random.normal(ke, (n, d))
    logsnr = jax.random.uniform(kl, (n,), minval=lo, maxval=hi)
    return x, eps, logsnr, diffuse(x, eps, logsnr)


# ------------------------------------------------------------------------------------------ schedules


def test_alpha_sigma_variance_preserving():
    logsnr = jnp.linspace(-20.0, 20.0, 401)
    alpha, sigma = alpha_sigma(logsnr)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(jnp.log(alpha**2 / sigma**2), logsnr, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("bounds", [(-20.0, 20.0), (-5.0, 5.0), (-15.0, 3.0)])
def test_logsnr_strictly_decreasing(name, bounds):
    sched = get_schedule(name, logsnr_min=bounds[0], logsnr_max=bounds[1])
    t = jnp.linspace(0.0, 1.0, 20001)  # includes both endpoints
    lam = np.asarray(sched.logsnr(t))
    assert np.all(np.isfinite(lam))
    bad = np.asarray(t)[1:][np.diff(lam) >= 0]
    assert bad.size == 0, f"log-SNR not strictly decreasing at t={bad[:5]}"
    assert lam.max() <= bounds[1] + 1e-4 and lam.min() >= bounds[0] - 1e-4


def test_cosine_endpoints_and_shape():
    natural_max = -2 * math.log(math.tan(0.5 * math.pi * 0.008 / 1.008))  # ~8.77, inside (-20, 20)
    lam = get_schedule("cosine").logsnr(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(lam, [natural_max, -20.0], atol=1e-4)
    lam = get_schedule("cosine", logsnr_min=-5.0, logsnr_max=5.0).logsnr(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(lam, [5.0, -5.0], atol=1e-4)
    # In the interior the default schedule is the plain cosine formula (the squeeze to -20 is tiny).
    t = np.linspace(0.05, 0.95, 19)
    ref = -2 * np.log(np.tan(0.5 * np.pi * (t + 0.008) / 1.008))
    np.testing.assert_allclose(get_schedule("cosine").logsnr(jnp.asarray(t, jnp.float32)), ref, atol=2e-3)


def test_linear_endpoints_and_clipping():
    lam = get_schedule("linear").logsnr(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(lam, [-math.log(math.expm1(1e-4)), -math.log(math.expm1(10.0001))], rtol=1e-5)
    lam = get_schedule("linear", logsnr_min=-5.0, logsnr_max=5.0).logsnr(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(lam, [5.0, -5.0], atol=1e-4)


def test_linear_schedule_matches_discrete_ddpm():
    # The continuous form is log(alpha^2) = -(1e-4 t + 10 t^2)-ish integral of beta, not a copy of the
    # discrete product: they differ by up to ~0.011 in alpha^2.
    betas = np.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = np.cumprod(1.0 - betas)
    t = jnp.arange(1, 1001, dtype=jnp.float32) / 1000.0
    alpha2 = np.asarray(jax.nn.sigmoid(get_schedule("linear").logsnr(t)))
    assert np.max(np.abs(alpha2 - alphas_cumprod)) < 0.015


def test_get_schedule_errors_and_hashable():
    with pytest.raises(ValueError, match="cosine, linear"):
        get_schedule("sigmoid")
    with pytest.raises(ValueError, match="logsnr_min < logsnr_max"):
        get_schedule("cosine", logsnr_min=3.0, logsnr_max=-3.0)
    assert hash(get_schedule("cosine")) == hash(Schedule("cosine", -20.0, 20.0))


def test_training_logsnr_shift_moves_levels_and_stays_in_range():
    schedule = get_schedule("cosine", logsnr_min=-20.0, logsnr_max=20.0)
    logsnr = schedule.logsnr(jnp.linspace(0.0, 1.0, 101))
    assert shift_logsnr(logsnr, 0.0, schedule) is logsnr
    shifted = shift_logsnr(logsnr, -2.0 * math.log(3.0), schedule)  # the SNR over 9
    inside = logsnr - 2.0 * math.log(3.0) > -20.0
    np.testing.assert_allclose(shifted[inside], logsnr[inside] - 2.0 * math.log(3.0), rtol=1e-6)
    np.testing.assert_array_equal(shifted[~inside], -20.0)  # the noisiest levels clip at logsnr_min
    assert int((~inside).sum()) == 1  # only t=1 leaves the range
    # A uniform draw of t now lands below log-SNR -5 (where the demo lays out its scene) ~3x as often.
    t = jnp.linspace(0.0, 1.0, 10_001)
    before = float(jnp.mean(schedule.logsnr(t) < -5.0))
    after = float(jnp.mean(shift_logsnr(schedule.logsnr(t), -2.0 * math.log(3.0), schedule) < -5.0))
    assert 0.04 < before < 0.06 and 2.5 < after / before < 3.5, (before, after)


def test_diffuse_broadcasts_per_example():
    x = jnp.ones((3, 4, 4, 2))
    eps = jnp.zeros_like(x)
    logsnr = jnp.array([-2.0, 0.0, 2.0])
    z = diffuse(x, eps, logsnr)
    assert z.shape == x.shape
    np.testing.assert_allclose(z[:, 0, 0, 0], jnp.sqrt(jax.nn.sigmoid(logsnr)), rtol=1e-6)


# ------------------------------------------------------------------------------------------ objectives


def test_v_conversions_round_trip():
    x, eps, logsnr, z = _data()
    v = v_from_x_eps(x, eps, logsnr)
    x2, eps2 = x_eps_from_v(v, z, logsnr)
    np.testing.assert_allclose(x2, x, atol=1e-5)
    np.testing.assert_allclose(eps2, eps, atol=1e-5)


def test_x_eps_conversions_round_trip():
    x, eps, logsnr, z = _data()
    alpha, sigma = alpha_sigma(logsnr[:, None])
    # x from eps divides by alpha and eps from x by sigma: float32 rounding of z is amplified by
    # 1/alpha (1/sigma), so the tolerance is 1e-5 only where that factor is < 10.
    err_x = np.abs(x_from_eps(eps, z, logsnr) - x)
    err_eps = np.abs(eps_from_x(x, z, logsnr) - eps)
    assert np.all(err_x <= 1e-5 * np.maximum(1.0, 0.1 / alpha))
    assert np.all(err_eps <= 1e-5 * np.maximum(1.0, 0.1 / sigma))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_prediction_to_x_eps_inverts_target(objective):
    x, eps, logsnr, z = _data(lo=-6.0, hi=6.0)
    pred = target(x, eps, logsnr, objective=objective)
    x2, eps2 = prediction_to_x_eps(pred, z, logsnr, objective=objective)
    np.testing.assert_allclose(x2, x, atol=1e-4)
    np.testing.assert_allclose(eps2, eps, atol=1e-4)


def test_unknown_objective_and_weighting():
    x, eps, logsnr, z = _data(n=2)
    with pytest.raises(ValueError, match="v, eps, x0"):
        target(x, eps, logsnr, objective="score")
    with pytest.raises(ValueError, match="none, min_snr, snr_trunc"):
        diffusion_loss(x, x, eps, logsnr, objective="v", weighting="p2")


def _preds_for_same_x_hat(x, eps, logsnr, z, seed=1):
    """Predictions of all objectives that decode to the same (wrong) x_hat for z."""
    x_hat = x + 0.3 * jax.random.normal(jax.random.key(seed), x.shape)
    eps_hat = eps_from_x(x_hat, z, logsnr)
    return {"x0": x_hat, "eps": eps_hat, "v": v_from_x_eps(x_hat, eps_hat, logsnr)}


@pytest.mark.parametrize("weighting", ["min_snr", "snr_trunc"])
def test_weightings_are_the_same_loss_in_x0_space(weighting):
    x, eps, logsnr, z = _data(n=512, lo=-6.0, hi=6.0)
    preds = _preds_for_same_x_hat(x, eps, logsnr, z)
    losses = {
        o: diffusion_loss(preds[o], x, eps, logsnr, objective=o, weighting=weighting, min_snr_gamma=5.0)
        for o in OBJECTIVES
    }
    np.testing.assert_allclose(losses["eps"], losses["x0"], rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(losses["v"], losses["x0"], rtol=2e-3, atol=1e-6)
    # And the x0-space weight is the documented one.
    mse_x = jnp.mean(jnp.square(preds["x0"] - x), axis=1)
    snr = jnp.exp(logsnr)
    w_x = jnp.minimum(snr, 5.0) if weighting == "min_snr" else jnp.maximum(snr, 1.0)
    np.testing.assert_allclose(losses["x0"], w_x * mse_x, rtol=1e-4)
    # Plain MSE ("none") is a different loss per objective; make sure the test could tell them apart.
    plain = {o: diffusion_loss(preds[o], x, eps, logsnr, objective=o) for o in OBJECTIVES}
    assert not np.allclose(plain["eps"], plain["x0"], rtol=0.1)


def test_min_snr_weight_values_and_extremes():
    logsnr = jnp.array([-20.0, 0.0, math.log(5.0), 20.0])
    snr = np.exp(np.float64(logsnr))
    for objective, expect in [
        ("x0", np.minimum(snr, 5.0)),
        ("eps", np.minimum(snr, 5.0) / snr),
        ("v", np.minimum(snr, 5.0) / (snr + 1.0)),
    ]:
        w = loss_weight(logsnr, objective=objective, weighting="min_snr", min_snr_gamma=5.0)
        assert np.all(np.isfinite(w))
        np.testing.assert_allclose(w, expect, rtol=1e-5, atol=1e-30)


def test_plain_loss_and_mask():
    x, eps, logsnr, z = _data(n=4, d=8)
    pred = target(x, eps, logsnr, objective="v") + 0.5
    loss = diffusion_loss(pred, x, eps, logsnr, objective="v")
    np.testing.assert_allclose(loss, 0.25, rtol=1e-5)
    exact = diffusion_loss(target(x, eps, logsnr, objective="eps"), x, eps, logsnr, objective="eps")
    np.testing.assert_allclose(exact, 0.0, atol=1e-10)
    # Pixel mask: only unmasked pixels count, mean taken over them.
    pred = target(x, eps, logsnr, objective="x0").at[:, :4].add(1.0)
    mask = jnp.concatenate([jnp.ones((4, 4)), jnp.zeros((4, 4))], axis=1)
    loss = diffusion_loss(pred, x, eps, logsnr, objective="x0", mask=mask)
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
    # Per-example mask [B]: a dropped example has loss 0, no NaN.
    loss = diffusion_loss(pred, x, eps, logsnr, objective="x0", mask=jnp.array([1.0, 0.0, 1.0, 1.0]))
    np.testing.assert_allclose(loss, [0.5, 0.0, 0.5, 0.5], rtol=1e-6)


# ------------------------------------------------------------------------------------------ guidance


def test_cfg_weights():
    cond, uncond = jnp.full((2, 3), 2.0), jnp.full((2, 3), -1.0)
    np.testing.assert_allclose(classifier_free_guidance(cond, uncond, 1.0), cond)
    np.testing.assert_allclose(classifier_free_guidance(cond, uncond, 0.0), uncond)
    np.testing.assert_allclose(classifier_free_guidance(cond, uncond, 3.0), -1.0 + 3.0 * 3.0)
    per_example = classifier_free_guidance(cond, uncond, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(per_example, [[-1.0] * 3, [2.0] * 3])


def test_cfg_on_v_equals_cfg_on_eps():
    # The comment in guidance.py: conversions are affine in the prediction, so guiding v == guiding eps.
    _, _, logsnr, z = _data(n=16)
    k1, k2 = jax.random.split(jax.random.key(3))
    v_c, v_u = jax.random.normal(k1, z.shape), jax.random.normal(k2, z.shape)
    v_guided = classifier_free_guidance(v_c, v_u, 4.0)
    _, eps_of_guided_v = prediction_to_x_eps(v_guided, z, logsnr, objective="v")
    eps_c = prediction_to_x_eps(v_c, z, logsnr, objective="v")[1]
    eps_u = prediction_to_x_eps(v_u, z, logsnr, objective="v")[1]
    np.testing.assert_allclose(eps_of_guided_v, classifier_free_guidance(eps_c, eps_u, 4.0), atol=1e-5)


class _CountingModel:
    """Toy model depending on z, logsnr and a pytree cond; records every call's batch size."""

    def __init__(self):
        self.batches = []

    def __call__(self, z, logsnr, cond):
        self.batches.append(z.shape[0])
        text = jnp.sum(cond["emb"] * cond["mask"][..., None], axis=(1, 2))
        return jnp.tanh(z) * (1.0 + text[:, None]) + logsnr[:, None] * 0.1


def _guidance_inputs():
    k1, k2 = jax.random.split(jax.random.key(7))
    z = jax.random.normal(k1, (3, 5))
    logsnr = jnp.array([-1.0, 0.5, 2.0])
    cond = {"emb": jax.random.normal(k2, (3, 4, 2)), "mask": jnp.ones((3, 4))}
    uncond = {"emb": jnp.zeros((3, 4, 2)), "mask": jnp.zeros((3, 4))}
    return z, logsnr, cond, uncond


def test_guided_model_single_doubled_forward():
    z, logsnr, cond, uncond = _guidance_inputs()
    model = _CountingModel()
    guided = guided_model(model, 3.0)(z, logsnr, cond, uncond)
    assert model.batches == [6], "expected one forward on the doubled batch"
    expect = classifier_free_guidance(model(z, logsnr, cond), model(z, logsnr, uncond), 3.0)
    np.testing.assert_allclose(guided, expect, rtol=1e-6, atol=1e-6)


def test_guided_model_weight_one_and_zero_skip_doubling():
    z, logsnr, cond, uncond = _guidance_inputs()
    model = _CountingModel()
    np.testing.assert_allclose(guided_model(model, 1.0)(z, logsnr, cond, uncond), model(z, logsnr, cond))
    np.testing.assert_allclose(guided_model(model, 0.0)(z, logsnr, cond, uncond), model(z, logsnr, uncond))
    assert model.batches == [3, 3, 3, 3]
    assert not np.allclose(model(z, logsnr, cond), model(z, logsnr, uncond))  # the branches differ
    with pytest.raises(ValueError, match="uncond"):
        guided_model(model, 2.0)(z, logsnr, cond)


# ------------------------------------------------------------------------------------------ thresholding


def test_static_threshold():
    x0 = jnp.array([[-3.0, -0.5, 0.2, 1.7]])
    np.testing.assert_allclose(threshold_x0(x0, kind="static"), [[-1.0, -0.5, 0.2, 1.0]])
    np.testing.assert_allclose(threshold_x0(x0, kind="none"), x0)
    with pytest.raises(ValueError, match="none, static, dynamic"):
        threshold_x0(x0, kind="soft")


def test_dynamic_threshold():
    # Sample 0: all |x| < 1, unchanged. Sample 1: |x| = 0, 0.01, ..., 2.00 (alternating signs), whose
    # 99.5th percentile is exactly element 199 = 1.99 (linear interpolation at index 0.995 * 200).
    mags = np.linspace(0.0, 2.0, 201)
    big = mags * np.where(np.arange(201) % 2 == 0, 1.0, -1.0)
    small = 0.9 * np.sin(np.arange(201.0))
    x0 = jnp.asarray(np.stack([small, big]).reshape(2, 201, 1, 1), jnp.float32)
    out = np.asarray(threshold_x0(x0, kind="dynamic"))
    np.testing.assert_allclose(out[0], x0[0], rtol=1e-6)
    assert np.abs(out[1]).max() <= 1.0 + 1e-6
    np.testing.assert_allclose(out[1].ravel(), np.clip(big, -1.99, 1.99) / 1.99, rtol=1e-5, atol=1e-6)
    # Percentile is configurable: p=90 -> s = 1.8.
    out90 = np.asarray(threshold_x0(x0, kind="dynamic", percentile=90.0))
    np.testing.assert_allclose(out90[1].ravel(), np.clip(big, -1.8, 1.8) / 1.8, rtol=1e-5, atol=1e-6)
