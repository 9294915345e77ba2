"""U-Net: shapes, finite gradients, an exact hand count of parameters, logical axis annotations."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.errors import ConfigError
from imagen_jax.models import layers
from imagen_jax.models import unet as unet_lib
from imagen_jax.models.unet import UNet, compute_dtype, convert_layout, unet_from_config

TEXT_D = 12
SMALL = dict(
    channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    self_attention=(False, True),
    cross_attention=(False, True),
    head_dim=8,
    cond_dim=16,
    text_dim=16,
    norm_groups=4,
)


def _inputs(batch=2, res=16, length=5, lowres=None):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    z = jax.random.normal(k[0], (batch, res, res, 3))
    logsnr = jnp.linspace(-5.0, 5.0, batch)
    text = jax.random.normal(k[1], (batch, length, TEXT_D))
    mask = jnp.arange(length)[None, :] < jnp.array([length, 2] + [3] * (batch - 2))[:, None]
    return z, logsnr, text, mask


def _perturbed(params, scale=0.05, seed=3):
    """`params` unboxed plus small noise, so that zero-initialised output layers pass gradients and the
    output depends on every input. NumPy noise: drawing it with jax op by op compiles a program per shape."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), nn.unbox(params))


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ---- hand count helpers: each mirrors one layer's parameters ----
def conv(cin, cout, k=3):
    return k * k * cin * cout + cout


def dense(i, o, bias=True):
    return i * o + (o if bias else 0)


def norm(c):
    return 2 * c


def res(cin, cout, cond):
    return (
        norm(cin)
        + conv(cin, cout)
        + dense(cond, 2 * cout)
        + norm(cout)
        + conv(cout, cout)
        + (conv(cin, cout, 1) if cin != cout else 0)
    )


def self_attn(c, heads, hd):
    return norm(c) + 3 * c * heads * hd + heads * hd * c + c


def cross_attn(c, text, heads, hd, learned):
    return (
        norm(c)
        + c * heads * hd
        + 2 * text * heads * hd
        + heads * hd * c
        + c
        + (2 * heads * hd if learned else 0)
    )


def pool(width, heads, hd, learned):
    return width + (width if learned else 0) + 3 * width * heads * hd + heads * hd * width + width


@pytest.mark.parametrize(
    "null_text,text_positions,image_positions",
    [("zero", False, False), ("learned", False, False), ("zero", True, False), ("zero", False, True)],
)
def test_parameter_count_matches_hand_count(null_text, text_positions, image_positions):
    model = UNet(**SMALL, null_text=null_text, text_positions=text_positions, image_positions=image_positions)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), *_inputs())["params"]))
    learned = null_text == "learned"
    c0, c1, cond, td = 8, 16, 16, 16
    expected = (
        norm(TEXT_D)
        + dense(TEXT_D, td)  # text LayerNorm + projection
        + (5 * td if text_positions else 0)  # one learned position per text token (length 5)
        + dense(cond, cond) * 2  # noise-level MLP
        + pool(td, 2, 8, learned)
        + dense(td, cond)  # attention pooling + its projection
        + conv(3, c0)  # conv_in
        + (dense(2 + 4 * 4, c0) if image_positions else 0)  # (y, x) and sin/cos at 4 frequencies each
        + res(c0, c0, cond)  # level 0, block 0 (no attention)
        + conv(c0, c0)  # downsample
        + res(c0, c1, cond)
        + self_attn(c1, 2, 8)
        + cross_attn(c1, td, 2, 8, learned)  # level 1
        + res(c1, c1, cond)
        + self_attn(c1, 2, 8)
        + cross_attn(c1, td, 2, 8, learned)  # middle
        + res(c1, c1, cond)  # middle, second block
        + res(c1 + c1, c1, cond)
        + self_attn(c1, 2, 8)
        + cross_attn(c1, td, 2, 8, learned)  # up level 1
        + res(c1 + c0, c1, cond)
        + self_attn(c1, 2, 8)
        + cross_attn(c1, td, 2, 8, learned)
        + conv(c1, c1)  # upsample
        + res(c1 + c0, c0, cond)
        + res(c0 + c0, c0, cond)  # up level 0
        + norm(c0)
        + conv(c0, 3)  # output head
    )
    assert _count(params) == expected


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(efficient=True, num_res_blocks=(1, 2)),
        dict(patch_size=2),
        dict(lowres_cond=True),
    ],
)
def test_output_shape_and_finite_gradients(variant):
    model = UNet(**{**SMALL, **variant})
    z, logsnr, text, mask = _inputs()
    extra = {}
    if variant.get("lowres_cond"):
        extra = dict(lowres=jnp.zeros((2, 4, 4, 3)), aug_logsnr=jnp.zeros((2,)))
    params = _perturbed(model.init(jax.random.PRNGKey(1), z, logsnr, text, mask, **extra)["params"], 0.01)
    apply = jax.jit(lambda p: model.apply({"params": p}, z, logsnr, text, mask, **extra))  # not op by op
    out = apply(params)
    assert out.shape == z.shape and out.dtype == jnp.float32

    grads = jax.jit(jax.grad(lambda p: jnp.mean(apply(p) ** 2)))(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(g).all() for g in leaves)
    assert all(np.any(np.asarray(g) != 0) for g in leaves), "some parameters get no gradient"


@pytest.mark.parametrize("text_positions", [False, True])
def test_unconditional_rows_ignore_text_and_padding_is_ignored(text_positions):
    model = UNet(**SMALL, text_positions=text_positions)
    z, logsnr, text, mask = _inputs()
    params = _perturbed(model.init(jax.random.PRNGKey(1), z, logsnr, text, mask)["params"])
    apply = jax.jit(lambda t, m: model.apply({"params": params}, z, logsnr, t, m))
    null = jnp.zeros_like(mask)
    # All-masked rows are the null text whatever the embedding values.
    np.testing.assert_allclose(apply(text, null), apply(text * 0 + 7.0, null), atol=1e-5)
    # Values at padded positions never reach the output.
    noisy = jnp.where(mask[..., None], text, 100.0)
    np.testing.assert_allclose(apply(text, mask), apply(noisy, mask), atol=1e-5)
    assert not np.allclose(apply(text, mask), apply(text, null), atol=1e-4)


def test_each_image_reads_only_its_own_caption():
    # The tokens reach the attention layers flattened over the batch: a batch must compute what its rows
    # compute one at a time.
    model = UNet(**SMALL, text_positions=True)
    z, logsnr, text, mask = _inputs(batch=3)
    params = _perturbed(model.init(jax.random.PRNGKey(1), z, logsnr, text, mask)["params"])
    apply = jax.jit(lambda *args: model.apply({"params": params}, *args))
    batched = apply(z, logsnr, text, mask)
    for i in range(3):
        row = apply(z[i : i + 1], logsnr[i : i + 1], text[i : i + 1], mask[i : i + 1])
        np.testing.assert_allclose(batched[i : i + 1], row, atol=2e-5)
    assert not np.allclose(batched[0], apply(z[:1], logsnr[:1], text[1:2], mask[1:2])[0], atol=1e-4)


def test_word_order_reaches_the_unet_only_through_text_positions():
    z, logsnr, text, _ = _inputs()
    mask = jnp.ones(text.shape[:2], bool)
    reversed_text = text[:, ::-1]
    for text_positions in (False, True):
        model = UNet(**SMALL, text_positions=text_positions)
        params = _perturbed(model.init(jax.random.PRNGKey(1), z, logsnr, text, mask)["params"])
        out, out_rev = (model.apply({"params": params}, z, logsnr, t, mask) for t in (text, reversed_text))
        # Attention over tokens is permutation invariant; learned positions make order visible.
        assert np.allclose(out, out_rev, atol=1e-5) != text_positions


def test_left_differs_from_right_only_with_image_positions():
    # A flat image, far from the borders that zero padding marks: without image positions every cell there
    # computes the same function of the same inputs (convolutions and attention are blind to place).
    z = jnp.full((1, 96, 96, 3), 0.3)
    logsnr, text = jnp.zeros((1,)), jax.random.normal(jax.random.PRNGKey(0), (1, 4, TEXT_D))
    mask = jnp.ones((1, 4), bool)
    for image_positions in (False, True):
        model = UNet(**SMALL, image_positions=image_positions)
        params = _perturbed(model.init(jax.random.PRNGKey(1), z, logsnr, text, mask)["params"])
        out = model.apply({"params": params}, z, logsnr, text, mask)
        left, right = out[0, 48, 40], out[0, 48, 56]  # 40 pixels from every border
        assert np.allclose(left, right, atol=1e-5) != image_positions


def test_parameters_carry_logical_axis_names():
    model = UNet(**SMALL)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_inputs())["params"])
    specs = jax.tree.leaves(
        nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    assert len(specs) == len(jax.tree.leaves(nn.unbox(boxed)))
    assert all(isinstance(s, jax.sharding.PartitionSpec) and len(s) > 0 for s in specs)
    conv_in = nn.get_partition_spec(boxed)["conv_in"]["kernel"]
    assert tuple(conv_in) == (None, None, "conv_in", "conv_out")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("self_attention", (True, False, True), "model.self_attention has 3 entries"),
        ("channels", 0, "model.channels=0 must be an int >= 1"),
        ("channels", -1, "model.channels=-1 must be an int >= 1"),
        ("channel_mults", (1, 0), r"model.channel_mults=\(1, 0\) must be a non-empty tuple of ints >= 1"),
        ("num_res_blocks", (1, -1), r"num_res_blocks=\(1, -1\): each level's count must be an int >= 0"),
        ("head_dim", 0, "model.head_dim=0 must be >= 1 and divide the width of every level with attention"),
        ("head_dim", 3, r"every level with attention \[16\] and model.text_dim=16"),
        ("num_heads", 3, "model.num_heads=3 must divide the width of every level with attention"),
        ("norm_groups", 0, "model.norm_groups=0 must be an int >= 1"),
        ("cond_dim", 0, "model.cond_dim=0"),
        ("text_dim", 12, "model.text_dim=12"),  # head_dim 8 does not divide it
        ("patch_size", 0, "model.patch_size=0"),
        ("out_channels", 0, "model.out_channels=0"),
        ("dropout", 1.0, r"model.dropout=1.0 must be in \[0, 1\)"),
        ("null_text", "none", "model.null_text='none': use one of"),
        ("remat_policy", "dots", "model.remat_policy='dots' is not one of"),
        ("logsnr_min_period", 0.0, "must satisfy 0 < min < max"),
    ],
)
def test_bad_fields_fail_at_construction_naming_the_field(field, value, message):
    """Before any tracing (and so before a run's data and text encoder are prepared): one ConfigError
    naming the field, where the trace would fail with a shape error, a division by zero, or not at all."""
    with pytest.raises(ConfigError, match=message):
        UNet(**{**SMALL, field: value})


def test_lowres_upsample_is_checked_where_used_and_legal_extremes_still_trace():
    with pytest.raises(ConfigError, match="model.lowres_upsample='bicubik' is not a jax.image.resize method"):
        UNet(**SMALL, lowres_cond=True, lowres_upsample="bicubik")
    UNet(**SMALL, lowres_upsample="bicubik")  # a base stage never resizes: not its concern
    # No blocks in a level; groups that do not divide the width (gcd); a level without attention whose
    # width (12) head_dim 8 does not divide.
    odd_widths = {**SMALL, "channels": 12, "num_res_blocks": 0, "norm_groups": 5}
    for fields in (odd_widths, {**odd_widths, "num_heads": 2, "channels": 8}):
        efficient = "num_heads" in fields
        extreme = UNet(**fields, efficient=efficient)
        out = jax.eval_shape(lambda m=extreme: m.init_with_output(jax.random.PRNGKey(0), *_inputs())[0])
        assert out.shape == (2, 16, 16, 3)


def test_remat_keeps_parameters_outputs_and_gradients():
    """Recomputing blocks changes memory, not maths: same parameters, outputs and gradients (with dropout)."""
    z, logsnr, text, mask = _inputs()
    plain, remat = (UNet(**SMALL, dropout=0.1, remat=r) for r in (False, True))
    boxed = jax.jit(plain.init)(jax.random.PRNGKey(1), z, logsnr, text, mask)["params"]
    boxed_remat = jax.eval_shape(lambda: remat.init(jax.random.PRNGKey(1), z, logsnr, text, mask)["params"])
    assert jax.tree.structure(nn.get_partition_spec(boxed)) == jax.tree.structure(
        nn.get_partition_spec(boxed_remat)
    )
    assert nn.get_partition_spec(boxed) == nn.get_partition_spec(boxed_remat)
    params = _perturbed(boxed, seed=2)

    def loss(model, p):
        out = model.apply(
            {"params": p}, z, logsnr, text, mask, train=True, rngs={"dropout": jax.random.PRNGKey(4)}
        )
        return jnp.mean(out**2)

    (l_plain, g_plain), (l_remat, g_remat) = (
        jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(m, params) for m in (plain, remat)
    )
    np.testing.assert_allclose(l_plain, l_remat, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The remat model really recomputes: its gradient program holds checkpoint regions, the plain one none.
    jaxprs = [
        str(jax.make_jaxpr(jax.grad(loss, argnums=1), static_argnums=0)(m, params)) for m in (plain, remat)
    ]
    regions = [len(re.findall(r"\b(?:remat\w*|checkpoint)\[", j)) for j in jaxprs]  # the name varies by jax
    assert regions[0] == 0 and regions[1] >= 3, regions


@pytest.mark.parametrize("efficient,remat", [(False, False), (True, True)])
def test_scanned_blocks_compute_the_unrolled_function(efficient, remat):
    """`scan_blocks` changes the program, not the maths: the unrolled parameters, stacked by
    `convert_layout`, are exactly the scanned model's own layout and give the same outputs and gradients
    (also with the blocks rematerialised inside the scan)."""
    z, logsnr, text, mask = _inputs()
    config = {**SMALL, "num_res_blocks": 3, "cross_attention": (True, True), "efficient": efficient}
    unrolled = UNet(**config, scan_blocks=False)
    scanned = UNet(**config, scan_blocks=True, remat=remat)
    runs = [r for r in scanned.block_runs() if r.count > 1]
    assert len(runs) >= 3
    boxed = jax.jit(unrolled.init)(jax.random.PRNGKey(1), z, logsnr, text, mask)["params"]
    params = _perturbed(boxed, seed=2)
    stacked = convert_layout(params, scanned, scanned=True)
    own = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(1), z, logsnr, text, mask)["params"])
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, nn.unbox(own))
    for run in runs:
        assert all(not k.startswith(tuple(f"{n}_" for n in run.block_names())) for k in stacked)
        assert stacked[run.scan_name]["res"]["conv1"]["kernel"].shape[0] == run.count
        # The stacking axis has its own logical name (replicated by the default rules).
        assert tuple(nn.get_partition_spec(own)[run.scan_name]["res"]["conv1"]["kernel"]) == (
            "layers", None, None, "conv_in", "conv_out"
        )

    def loss(model, p):
        return jnp.mean(model.apply({"params": p}, z, logsnr, text, mask) ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    (l_unrolled, g_unrolled), (l_scanned, g_scanned) = grad(unrolled, params), grad(scanned, stacked)
    np.testing.assert_allclose(l_unrolled, l_scanned, rtol=1e-6)
    g_scanned = convert_layout(g_scanned, scanned, scanned=False)
    for a, b in zip(jax.tree.leaves(g_unrolled), jax.tree.leaves(g_scanned), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    back = convert_layout(stacked, scanned, scanned=False)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    # Converting is idempotent: a tree already in the asked layout comes back as it is.
    assert convert_layout(stacked, scanned, scanned=True).keys() == stacked.keys()


def block_calls(jaxpr: jax.extend.core.Jaxpr) -> list[jax.extend.core.JaxprEqn]:
    """The nested jits of flax's lifted jit (its function is `core_fn`) at the top of `jaxpr`."""
    return [e for e in jaxpr.eqns if "jaxpr" in e.params and e.params.get("name") == "core_fn"]


def test_identical_blocks_are_traced_once_and_compute_the_plain_function(monkeypatch):
    """Applied, every block is a nested jit: JAX traces and differentiates one body per distinct block and
    input shape, not one per block. Initialised, the blocks are the plain modules, so a seed keeps its
    weights; applied, the jitted blocks compute the plain blocks' outputs and gradients."""
    z, logsnr, text, mask = _inputs()
    model = UNet(**{**SMALL, "num_res_blocks": 2})

    def loss(p):
        return jnp.mean(model.apply({"params": p}, z, logsnr, text, mask) ** 2)

    def run():
        unet_lib._block_modules.cache_clear()  # it caches the module classes it picked
        boxed = jax.jit(model.init)(jax.random.PRNGKey(1), z, logsnr, text, mask)["params"]
        return nn.unbox(boxed), jax.jit(jax.value_and_grad(loss))(_perturbed(boxed, seed=2))

    params = _perturbed(model.init(jax.random.PRNGKey(1), z, logsnr, text, mask)["params"], seed=2)
    forward = block_calls(jax.make_jaxpr(loss)(params).jaxpr)
    gradient = block_calls(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    signatures = {tuple(str(v.aval) for v in e.invars) for e in forward}
    assert len(forward) == sum(k.rsplit("_", 1)[-1] in unet_lib.BLOCK_PARTS for k in params) == 24
    assert len({id(e.params["jaxpr"]) for e in forward}) == len(signatures) < len(forward)
    assert len({id(e.params["jaxpr"]) for e in gradient}) < len(gradient) == 2 * len(forward)

    init_jitted, (loss_jitted, grads_jitted) = run()
    monkeypatch.setattr(unet_lib, "_JITTED_BLOCKS", unet_lib._PLAIN_BLOCKS)
    try:
        init_plain, (loss_plain, grads_plain) = run()
        assert not block_calls(jax.make_jaxpr(lambda p: loss(p))(params).jaxpr)  # not the cached trace
    finally:
        unet_lib._block_modules.cache_clear()
    for a, b in zip(jax.tree.leaves(init_plain), jax.tree.leaves(init_jitted), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loss_plain, loss_jitted, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_plain), jax.tree.leaves(grads_jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _largest_draw_rank(fn, *args) -> int:
    """The largest rank of the random draws in `fn`'s jaxpr (its printed form lists nested programs)."""
    shapes = re.findall(r"random_bits\[[^\]]*?shape=\(([^)]*)\)", str(jax.make_jaxpr(fn)(*args)))
    return max(len([d for d in shape.split(",") if d.strip()]) for shape in shapes)


def test_weights_drawn_as_matrices_are_the_initialisers_values_at_their_own_shapes(monkeypatch):
    """Each initialiser the layers use gives the same bits drawn as a matrix and reshaped as at the
    weight's own shape (a fan-out initialiser would not: the wrapper is only for fan-in ones); the whole
    U-Net initialises to the same weights with and without it, and with it draws nothing of rank > 2."""
    key = jax.random.PRNGKey(7)
    used = [nn.initializers.lecun_normal(), nn.initializers.normal(0.02), nn.initializers.zeros]
    for init in used + [nn.initializers.ones]:
        for shape in [(3, 3, 8, 16), (1, 1, 8, 4), (2, 4, 8), (8, 16)]:
            np.testing.assert_array_equal(layers.drawn_as_matrix(init)(key, shape), init(key, shape))
    fan_out, conv_kernel = nn.initializers.variance_scaling(1.0, "fan_out", "truncated_normal"), (3, 3, 8, 16)
    assert not np.array_equal(layers.drawn_as_matrix(fan_out)(key, conv_kernel), fan_out(key, conv_kernel))

    z, logsnr, text, mask = _inputs()
    model = UNet(**SMALL)
    as_matrices = jax.jit(lambda r: nn.unbox(model.init(r, z, logsnr, text, mask)["params"]))
    drawn = jax.tree.leaves(as_matrices(key))
    assert _largest_draw_rank(as_matrices, key) == 2
    monkeypatch.setattr(layers, "drawn_as_matrix", lambda init_fn: init_fn)
    own_shapes = jax.jit(lambda r: nn.unbox(model.init(r, z, logsnr, text, mask)["params"]))
    assert _largest_draw_rank(own_shapes, key) == 4
    for a, b in zip(drawn, jax.tree.leaves(own_shapes(key)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_block_runs_of_the_paper_base_unet():
    from configs import imagen_base64

    unet = unet_from_config(imagen_base64.get_config("bench").model)
    runs = unet.block_runs()
    assert sum(r.count for r in runs) == 4 * 3 + 4 * 4  # 3 blocks a level down, 3 + 1 up
    assert [r.scan_name for r in runs if r.count > 1] == [
        "down0_0to2",  # every block reads the 512-wide stem
        "down1_1to2",  # block 0 of levels 1-3 widens the downsampled features
        "down2_1to2",
        "down3_1to2",
        "up3_0to2",  # up blocks concatenate a skip: the last of a level reads the previous level's width
        "up2_1to2",
        "up1_1to2",
        "up0_1to3",
    ]


def test_auto_compute_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators():
    assert compute_dtype("auto", "cpu") == "float32"
    assert compute_dtype("auto", "gpu") == compute_dtype("auto", "tpu") == "bfloat16"
    assert compute_dtype("bfloat16", "cpu") == "bfloat16" and compute_dtype("float32", "gpu") == "float32"
    unet = unet_from_config({**SMALL, "dtype": "auto", "param_dtype": "float32"})
    assert unet.dtype == jnp.float32 and unet.param_dtype == jnp.float32  # the tests run on CPU
