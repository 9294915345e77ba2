"""U-Net building blocks: embeddings, residual blocks with FiLM, self- and cross-attention, resampling.

Every parameter carries logical axis names (`imagen_jax.parallel.axes`) so a sharding rules table can
place it without touching this file.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.models.group_norm import GroupNorm
from imagen_jax.parallel import axes
from imagen_jax.parallel import mesh as mesh_lib

Dtype = Any

# Spatial kernel dims are never sharded (and flax forbids a name twice in one array), so they stay None.
CONV_AXES = (None, None, axes.CONV_IN, axes.CONV_OUT)


def _init(init_fn: Any, names: tuple[str, ...]) -> Any:
    return nn.with_logical_partitioning(drawn_as_matrix(init_fn), names)


def drawn_as_matrix(init_fn: Any) -> Any:
    """`init_fn`, drawing a weight of rank > 2 as the matrix [prod(shape[:-1]), shape[-1]] and reshaping it.

    The values are the same: JAX's threefry numbers each random element by its flat index, and the
    initialisers used here (zeros, ones, normal, lecun_normal) either ignore the shape or read fan-in as
    prod(shape[:-1]) in both shapes (not true of fan-out or fan-avg initialisers). Why: XLA:CPU generates
    a random draw's code once per shape, and for a rank-4 convolution kernel that takes it about twice as
    long as for the kernel's matrix view. The train state's init program compiles 1.2-1.3x faster for the
    demo, the bench configs and the paper's base U-Net (docs/benchmarks.md).
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        if len(shape) <= 2:
            return init_fn(key, shape, dtype)
        return init_fn(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)

    return init


def dense(
    features: int,
    *,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    zero: bool = False,
    in_axis: str = axes.EMBED,
    out_axis: str = axes.MLP,
    use_bias: bool = True,
) -> nn.Dense:
    kernel = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
    return nn.Dense(
        features,
        name=name,
        dtype=dtype,
        param_dtype=param_dtype,
        use_bias=use_bias,
        kernel_init=_init(kernel, (in_axis, out_axis)),
        bias_init=_init(nn.initializers.zeros, (out_axis,)),
    )


def conv(
    features: int,
    *,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    kernel: int = 3,
    strides: int = 1,
    zero: bool = False,
) -> nn.Conv:
    init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding="SAME",
        name=name,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_init(init, CONV_AXES),
        bias_init=_init(nn.initializers.zeros, (axes.CONV_OUT,)),
    )


def group_norm(groups: int, *, name: str, param_dtype: Dtype) -> GroupNorm:
    # Statistics in float32 whatever the compute dtype: bf16 variance over large maps is too coarse.
    return GroupNorm(num_groups=groups, name=name, param_dtype=param_dtype)


def layer_norm(*, name: str, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        name=name,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=_init(nn.initializers.ones, (axes.NORM,)),
        bias_init=_init(nn.initializers.zeros, (axes.NORM,)),
    )


def sinusoidal_embedding(x: jax.Array, dim: int, *, min_period: float, max_period: float) -> jax.Array:
    """Sin/cos features of a scalar per example ([B] -> [B, dim]) with geometrically spaced periods."""
    half = dim // 2
    periods = jnp.exp(jnp.linspace(math.log(min_period), math.log(max_period), half))
    angles = x.astype(jnp.float32)[:, None] * (2 * math.pi / periods)[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, FiLM (scale-shift) from the conditioning vector, GroupNorm-SiLU-Conv, residual."""

    channels: int
    norm_groups: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: group_norm(self.norm_groups, name=name, param_dtype=self.param_dtype)  # noqa: E731
        h = norm("norm1")(x, silu=True, dtype=self.dtype)
        h = conv(self.channels, name="conv1", **kw)(h)
        film = dense(2 * self.channels, name="film", in_axis=axes.EMBED, out_axis=axes.CONV_OUT, **kw)(
            nn.silu(cond)
        )
        scale, shift = jnp.split(film.astype(jnp.float32), 2, axis=-1)
        h = norm("norm2")(h, (scale, shift), silu=True, dtype=self.dtype)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        # Zero-initialised last conv: every block starts as the identity, which keeps deep nets stable.
        h = conv(self.channels, name="conv2", zero=True, **kw)(h)
        if x.shape[-1] != self.channels:
            x = conv(self.channels, kernel=1, name="skip", **kw)(x.astype(self.dtype))
        return (x + h).astype(self.dtype)


def _heads_proj(
    num_heads: int, head_dim: int, *, name: str, dtype: Dtype, param_dtype: Dtype
) -> nn.DenseGeneral:
    return nn.DenseGeneral(
        (num_heads, head_dim),
        name=name,
        dtype=dtype,
        param_dtype=param_dtype,
        use_bias=False,
        kernel_init=_init(nn.initializers.lecun_normal(), (axes.EMBED, axes.HEADS, axes.KV)),
    )


def _out_proj(channels: int, *, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.DenseGeneral:
    # Zero init: a freshly added attention layer starts as the identity of its residual branch.
    return nn.DenseGeneral(
        channels,
        axis=(-2, -1),
        name=name,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_init(nn.initializers.zeros, (axes.HEADS, axes.KV, axes.EMBED)),
        bias_init=_init(nn.initializers.zeros, (axes.EMBED,)),
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention over all spatial positions, residual."""

    num_heads: int
    head_dim: int
    norm_groups: int
    implementation: str = "xla"  # jax.nn.dot_product_attention's: "xla", or "cudnn" (fused, GPU, bf16)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.norm_groups, name="norm", param_dtype=self.param_dtype)(x, dtype=self.dtype)
        h = h.reshape(b, hh * ww, c)
        q = _heads_proj(self.num_heads, self.head_dim, name="query", **kw)(h)
        k = _heads_proj(self.num_heads, self.head_dim, name="key", **kw)(h)
        v = _heads_proj(self.num_heads, self.head_dim, name="value", **kw)(h)
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        out = _out_proj(c, name="out", **kw)(out)
        return (x + out.reshape(b, hh, ww, c)).astype(self.dtype)


class CrossAttention(nn.Module):
    """Image positions attend to text tokens (plus one learned null token that is always visible), residual.

    The null token keeps the softmax defined for the unconditional case (all text masked out), so dropped
    captions and empty prompts take the same path in training and sampling. `learned_null=False` makes it
    the zero embedding of the paper's null-text rule.
    """

    num_heads: int
    head_dim: int
    learned_null: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, text: jax.Array, text_mask: jax.Array) -> jax.Array:
        """x: [B,H,W,C]; text: [B*L, D], the tokens flattened over the batch; text_mask: [B,L]."""
        b, hh, ww, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(name="norm", param_dtype=self.param_dtype)(x.reshape(b, hh * ww, c)).astype(self.dtype)
        q = _heads_proj(self.num_heads, self.head_dim, name="query", **kw)(h)
        kv_shape = text_mask.shape + (self.num_heads, self.head_dim)
        k = _heads_proj(self.num_heads, self.head_dim, name="key", **kw)(text).reshape(kv_shape)
        v = _heads_proj(self.num_heads, self.head_dim, name="value", **kw)(text).reshape(kv_shape)
        if self.learned_null:
            null_kv = self.param(
                "null_kv",
                _init(nn.initializers.normal(0.02), (axes.HEADS, axes.KV, axes.NORM)),
                (self.num_heads, self.head_dim, 2),
                self.param_dtype,
            ).astype(self.dtype)
        else:  # the paper's rule: the null text is a zero embedding, whose bias-free key and value are 0
            null_kv = jnp.zeros((self.num_heads, self.head_dim, 2), self.dtype)
        k = jnp.concatenate([jnp.broadcast_to(null_kv[None, None, ..., 0], (b, 1) + k.shape[2:]), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(null_kv[None, None, ..., 1], (b, 1) + v.shape[2:]), v], axis=1)
        mask = jnp.concatenate([jnp.ones((b, 1), bool), text_mask], axis=1)[:, None, None, :]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        out = _out_proj(c, name="out", **kw)(out)
        return (x + out.reshape(b, hh, ww, c)).astype(self.dtype)


class AttentionPool(nn.Module):
    """Attention pooling of text tokens into one vector (a learned query over [null, tokens])."""

    num_heads: int
    head_dim: int
    learned_null: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text: jax.Array, text_mask: jax.Array) -> jax.Array:
        b = text.shape[0]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = text.shape[-1]
        query = self.param(
            "query",
            _init(nn.initializers.normal(0.02), (axes.NORM, axes.EMBED)),
            (1, width),
            self.param_dtype,
        )
        if self.learned_null:
            null = self.param(
                "null",
                _init(nn.initializers.normal(0.02), (axes.NORM, axes.EMBED)),
                (1, width),
                self.param_dtype,
            )
        else:
            null = jnp.zeros((1, width), self.param_dtype)
        tokens = jnp.concatenate(
            [jnp.broadcast_to(null[None], (b, 1, width)).astype(text.dtype), text], axis=1
        )
        mask = jnp.concatenate([jnp.ones((b, 1), bool), text_mask], axis=1)[:, None, None, :]
        q = _heads_proj(self.num_heads, self.head_dim, name="query_proj", **kw)(
            jnp.broadcast_to(query[None], (b, 1, width)).astype(self.dtype)
        )
        k = _heads_proj(self.num_heads, self.head_dim, name="key", **kw)(tokens)
        v = _heads_proj(self.num_heads, self.head_dim, name="value", **kw)(tokens)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)[:, 0]
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            name="out",
            **kw,
            kernel_init=_init(nn.initializers.lecun_normal(), (axes.HEADS, axes.KV, axes.EMBED)),
            bias_init=_init(nn.initializers.zeros, (axes.EMBED,)),
        )(out)


class Downsample(nn.Module):
    """Strided 3x3 convolution (halves H and W)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(self.channels, strides=2, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 convolution."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        # Without this the SPMD partitioner may gather the whole batch here and split channels instead.
        x = mesh_lib.constrain_batch(x)
        return conv(self.channels, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
