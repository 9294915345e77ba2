"""The fused GroupNorm (+ FiLM, + SiLU) op: the unfused layers' function and gradients, their parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.models.group_norm import GroupNorm, group_norm_act


def _unfused(x, gamma, beta, film, groups, silu):
    """What the U-Net computed before the op: flax's GroupNorm in float32, then FiLM, then SiLU."""
    h = nn.GroupNorm(num_groups=groups, dtype=jnp.float32).apply(
        {"params": {"scale": gamma, "bias": beta}}, x
    )
    if film is not None:
        scale, shift = (f.reshape(f.shape[0], *([1] * (x.ndim - 2)), f.shape[-1]) for f in film)
        h = h * (1.0 + scale) + shift
    return jax.nn.silu(h) if silu else h


def _case(shape, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    b, c = shape[0], shape[-1]
    x = 2.0 * jax.random.normal(k[0], shape) + 0.5  # off-centre and wide: the centring and scaling matter
    gamma = 1.0 + 0.2 * jax.random.normal(k[1], (c,))
    beta = 0.2 * jax.random.normal(k[2], (c,))
    film = (0.3 * jax.random.normal(k[3], (b, c)), 0.3 * jax.random.normal(k[4], (b, c)))
    weights = jax.random.normal(k[5], shape)  # a loss that weighs every output differently
    return x, gamma, beta, film, weights


@pytest.mark.parametrize("use_film", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape", [(3, 6, 5, 16), (2, 7, 12)])  # an image, a sequence (rank 3)
def test_fused_op_is_the_unfused_function_with_its_gradients(use_film, silu, shape):
    x, gamma, beta, film, weights = _case(shape)
    film = film if use_film else None
    groups = 4
    fused = lambda *a: group_norm_act(*a, groups, silu, jnp.float32)  # noqa: E731
    unfused = lambda *a: _unfused(*a, groups, silu)  # noqa: E731
    np.testing.assert_allclose(
        fused(x, gamma, beta, film), unfused(x, gamma, beta, film), atol=2e-6, rtol=1e-5
    )

    grads = [
        jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2, 3))(x, gamma, beta, film)
        for f in (fused, unfused)
    ]
    assert jax.tree.structure(grads[0]) == jax.tree.structure(grads[1])
    for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()), rtol=0)
    # Not a vacuous comparison: every gradient is far from zero.
    assert all(float(jnp.abs(g).max()) > 1e-2 for g in jax.tree.leaves(grads[0]))


def test_op_under_remat_and_jit_gives_the_same_gradients():
    """The op inside `jax.checkpoint` (the U-Net's remat) and jit gives the same gradients as outside it."""
    x, gamma, beta, film, weights = _case((2, 4, 4, 8), seed=1)

    def loss(x, gamma):
        return jnp.sum(group_norm_act(x, gamma, beta, film, 2, True, jnp.float32) * weights)

    plain = jax.grad(loss, argnums=(0, 1))(x, gamma)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(x, gamma)
    for a, b in zip(plain, remat, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bfloat16_input_keeps_dtypes_and_float32_statistics():
    x, gamma, beta, film, weights = _case((2, 8, 8, 16), seed=2)
    xb = x.astype(jnp.bfloat16)
    out = group_norm_act(xb, gamma, beta, film, 4, True, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    # The same as normalising the bf16 values in float32 and rounding the result once.
    want = _unfused(xb.astype(jnp.float32), gamma, beta, film, 4, True).astype(jnp.bfloat16)
    np.testing.assert_allclose(out.astype(jnp.float32), want.astype(jnp.float32), atol=1e-2, rtol=1e-2)
    dx, dgamma, dfilm = jax.grad(
        lambda x, g, f: jnp.sum(group_norm_act(x, g, beta, f, 4, True, jnp.bfloat16) * weights),
        argnums=(0, 1, 2),
    )(xb, gamma, film)
    assert dx.dtype == jnp.bfloat16 and dgamma.dtype == jnp.float32 and dfilm[0].dtype == jnp.float32


def test_module_has_flax_groupnorms_parameters_and_axes():
    """Checkpoints written with `nn.GroupNorm` restore: the same names, shapes and logical axes; groups
    that do not divide the channels fall back to their greatest common divisor, as before."""
    x = jnp.ones((2, 4, 4, 12))
    ours = GroupNorm(num_groups=8).init(jax.random.key(0), x)["params"]
    assert set(ours) == {"scale", "bias"}
    assert ours["scale"].names == ours["bias"].names == ("norm",)
    values = nn.unbox(ours)
    theirs = nn.GroupNorm(num_groups=4).init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, values) == jax.tree.map(jnp.shape, theirs)
    x = jax.random.normal(jax.random.key(1), x.shape)
    np.testing.assert_allclose(
        GroupNorm(num_groups=8).apply({"params": values}, x),
        nn.GroupNorm(num_groups=4).apply({"params": theirs}, x),
        atol=1e-6,
    )
