"""The T5 encoder in Flax (Linen): the frozen text encoder of Imagen.

Architecture (Raffel et al. 2020; v1.1 / FLAN changes): token embedding, `num_layers` pre-norm blocks of
self-attention and feed-forward with residuals, a final RMSNorm. T5 specifics kept here on purpose:
- no 1/sqrt(d_kv) scaling of attention logits (T5 folds it into the initialisation of q);
- one relative position bias (bidirectional log buckets) computed once and added in every layer;
- RMSNorm without mean subtraction or bias, computed in float32 (as Hugging Face does);
- no biases in any dense layer; dropout omitted (the encoder is frozen, used for inference only).

Parameter tree (names chosen so the Hugging Face safetensors mapping is one table, see `hf_loader.py`):
  shared/embedding                       [vocab, d_model]       (VOCAB, EMBED)
  relative_attention_bias/embedding      [buckets, heads]       (REL_BUCKETS, HEADS)
  block_{i}/attention_norm/scale         [d_model]              (NORM,)
  block_{i}/attention/{q,k,v}/kernel     [d_model, heads*d_kv]  (EMBED, HEADS)
  block_{i}/attention/o/kernel           [heads*d_kv, d_model]  (HEADS, EMBED)
  block_{i}/mlp_norm/scale               [d_model]              (NORM,)
  block_{i}/mlp/{wi | wi_0, wi_1}/kernel [d_model, d_ff]        (EMBED, MLP)
  block_{i}/mlp/wo/kernel                [d_ff, d_model]        (MLP, EMBED)
  final_norm/scale                       [d_model]              (NORM,)
Attention kernels stay 2-D (heads*d_kv fused, named HEADS) so a Hugging Face weight maps by a transpose;
sharding that dimension over a mesh axis whose size divides num_heads splits on head boundaries.

`T5Decoder` / `T5EncoderDecoder` exist only to pretrain a small encoder (`pretrain.py`): params
{"encoder": the tree above, "decoder": blocks with attention (causal, unidirectional position bias),
cross_attention and mlp plus their norms, "lm_head": {"kernel"}}; the decoder embeds with encoder/shared.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.errors import ConfigError
from imagen_jax.parallel import axes

FEED_FORWARDS = ("gated-gelu", "relu")

# (vocab_size, d_model, d_kv, d_ff, num_heads, num_layers, feed_forward) of the published checkpoints.
_PRESETS: dict[str, tuple[int, int, int, int, int, int, str]] = {
    "t5-v1_1-small": (32128, 512, 64, 1024, 6, 8, "gated-gelu"),
    "t5-v1_1-base": (32128, 768, 64, 2048, 12, 12, "gated-gelu"),
    "t5-v1_1-large": (32128, 1024, 64, 2816, 16, 24, "gated-gelu"),
    "t5-v1_1-xl": (32128, 2048, 64, 5120, 32, 24, "gated-gelu"),
    "t5-v1_1-xxl": (32128, 4096, 64, 10240, 64, 24, "gated-gelu"),
    "t5-small": (32128, 512, 64, 2048, 8, 6, "relu"),
    "t5-base": (32128, 768, 64, 3072, 12, 12, "relu"),
    "t5-large": (32128, 1024, 64, 4096, 16, 24, "relu"),
}

# Logits added at masked (padding) keys. Finite, so a fully masked row (the unconditional prompt) gives
# a uniform softmax instead of NaN; its outputs are zeroed by `encode_tokens` anyway.
_MASK_BIAS = -1e9


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes of a T5 encoder. `feed_forward`: "gated-gelu" (v1.1, FLAN, mT5) or "relu" (original T5)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_heads: int = 6
    num_layers: int = 8
    feed_forward: str = "gated-gelu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        if self.feed_forward not in FEED_FORWARDS:
            raise ConfigError(
                f"T5Config.feed_forward={self.feed_forward!r}; expected one of {FEED_FORWARDS}."
            )
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"T5Config.{name} must be positive, got {getattr(self, name)}.")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def preset(cls, name: str) -> T5Config:
        """A published size by name: "t5-v1_1-xxl", "google/flan-t5-xl" (FLAN = v1.1 sizes), "t5-small"..."""
        key = name.split("/")[-1].lower().replace("flan-t5-", "t5-v1_1-")
        if key not in _PRESETS:
            raise ConfigError(f"unknown T5 preset {name!r}; known: {sorted(_PRESETS)} (and flan-t5-*).")
        vocab, d_model, d_kv, d_ff, heads, layers, ff = _PRESETS[key]
        return cls(vocab, d_model, d_kv, d_ff, heads, layers, ff)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> T5Config:
        """Reads a Hugging Face T5 `config.json` dict; raises ValueError for unsupported architectures."""
        model_type = hf.get("model_type", "t5")
        if model_type not in ("t5", "mt5"):
            # UMT5 has a relative bias per layer, LongT5 other attention: different parameter trees.
            raise ConfigError(
                f"model_type={model_type!r} is not supported; only T5 (original, v1.1, FLAN) and mT5 "
                "encoders load. Use a checkpoint whose config.json has model_type 't5'."
            )
        proj = hf.get("feed_forward_proj", "relu")
        if proj not in FEED_FORWARDS:
            raise ConfigError(
                f"feed_forward_proj={proj!r} is not supported; expected one of {FEED_FORWARDS} "
                "(original T5 uses 'relu', v1.1 and FLAN 'gated-gelu')."
            )
        required = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"T5 config.json lacks keys {missing}.")
        return cls(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["d_model"]),
            d_kv=int(hf["d_kv"]),
            d_ff=int(hf["d_ff"]),
            num_heads=int(hf["num_heads"]),
            num_layers=int(hf["num_layers"]),
            feed_forward=proj,
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        )


def _partitioned_normal(stddev: float, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def relative_position_buckets(
    query_len: int, key_len: int, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> jax.Array:
    """T5 buckets [query_len, key_len] of key - query: exact for small distances, then logarithmic up to
    max_distance (everything further shares the last bucket).

    bidirectional (encoder): half the buckets per direction, exact up to num_buckets/4 positions.
    unidirectional (decoder self-attention, HF `bidirectional=False`): keys after the query all share
    bucket 0 (the causal mask hides them anyway), so every bucket goes to the past, exact up to
    num_buckets/2 positions.
    """
    rel = jnp.arange(key_len)[None, :] - jnp.arange(query_len)[:, None]  # key - query
    if bidirectional:
        per_direction = num_buckets // 2
        buckets = jnp.where(rel > 0, per_direction, 0)
        dist = jnp.abs(rel)
    else:
        per_direction = num_buckets
        buckets = jnp.zeros_like(rel)
        dist = jnp.maximum(-rel, 0)
    max_exact = per_direction // 2
    # max(dist, 1) keeps log finite for the exact (small) positions whose value `where` discards.
    ratio = jnp.maximum(dist, 1).astype(jnp.float32) / max_exact
    log_ratio = jnp.log(ratio) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (per_direction - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, per_direction - 1)
    return buckets + jnp.where(dist < max_exact, dist, large)


class RMSNorm(nn.Module):
    """T5 LayerNorm: x / rms(x) * scale, in float32; returns float32 (callers cast)."""

    epsilon: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return x * scale.astype(jnp.float32)


class RelativePositionBias(nn.Module):
    """The shared relative position bias [1, heads, L, L] (Hugging Face keeps it in layer 0's attention).
    `bidirectional=False` is the decoder's self-attention variant (see `relative_position_buckets`)."""

    config: T5Config
    param_dtype: Any = jnp.float32
    bidirectional: bool = True

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        cfg = self.config
        table = self.param(
            "embedding",
            _partitioned_normal(cfg.d_model**-0.5, (axes.REL_BUCKETS, axes.HEADS)),
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            self.param_dtype,
        )
        buckets = relative_position_buckets(
            length,
            length,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
            self.bidirectional,
        )
        bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [L, L, H]
        return jnp.transpose(bias, (2, 0, 1))[None]


def _dense(
    name: str, features: int, stddev: float, names: tuple[str, str], *, dtype: Any, param_dtype: Any
) -> nn.Dense:
    """A bias-free dense layer with T5's scaled-normal init and logical axis names."""
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_partitioned_normal(stddev, names),
        name=name,
    )


class SelfAttention(nn.Module):
    """Multi-head attention without logit scaling; `bias` holds position bias + key mask.

    Self-attention by default; given `kv` [B, S, d_model] (the encoder output, in the decoder), keys and
    values come from it instead: cross-attention with the same parameter names.
    """

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, kv: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        kv = x if kv is None else kv

        dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)

        in_axes, out_axes = (axes.EMBED, axes.HEADS), (axes.HEADS, axes.EMBED)
        # T5's init folds the missing 1/sqrt(d_kv) into q.
        q = dense("q", cfg.inner_dim, (cfg.d_model * cfg.d_kv) ** -0.5, in_axes)(x)
        k = dense("k", cfg.inner_dim, cfg.d_model**-0.5, in_axes)(kv)
        v = dense("v", cfg.inner_dim, cfg.d_model**-0.5, in_axes)(kv)
        split = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.d_kv)
        q, k, v = split(q), split(k), split(v)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # softmax in float32, as HF
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:2], cfg.inner_dim)
        return dense("o", cfg.d_model, cfg.inner_dim**-0.5, out_axes)(out)


class FeedForward(nn.Module):
    """ReLU (original T5) or gated-GELU with the tanh approximation (v1.1, HF's "gelu_new")."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config

        dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)

        up = (axes.EMBED, axes.MLP)
        if cfg.feed_forward == "gated-gelu":
            gate = jax.nn.gelu(dense("wi_0", cfg.d_ff, cfg.d_model**-0.5, up)(x), approximate=True)
            h = gate * dense("wi_1", cfg.d_ff, cfg.d_model**-0.5, up)(x)
        else:
            h = jax.nn.relu(dense("wi", cfg.d_ff, cfg.d_model**-0.5, up)(x))
        return dense("wo", cfg.d_model, cfg.d_ff**-0.5, (axes.MLP, axes.EMBED))(h)


class T5Block(nn.Module):
    """Pre-norm self-attention and feed-forward, each added to the float32 residual stream."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.layer_norm_epsilon, self.param_dtype, name="attention_norm")(x).astype(self.dtype)
        x = x + SelfAttention(cfg, **kw, name="attention")(h, bias).astype(jnp.float32)
        h = RMSNorm(cfg.layer_norm_epsilon, self.param_dtype, name="mlp_norm")(x).astype(self.dtype)
        x = x + FeedForward(cfg, **kw, name="mlp")(h).astype(jnp.float32)
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, None))


# Applied, every layer is the same nested jit: JAX traces and differentiates one layer, not each of them,
# and XLA inlines the calls. Initialised, the plain layers: flax's lifted jit draws from other random
# streams, and a seed keeps its weights.
_JITTED_BLOCK = nn.jit(T5Block)


class T5Encoder(nn.Module):
    """T5 encoder: (input_ids int32 [B, L], mask bool [B, L]) -> float32 hidden states [B, L, d_model].

    `dtype` is the compute dtype of the matmuls; the residual stream, norms and softmax stay float32 (cheap
    for an encoder and keeps bf16 outputs close to fp32). Padding keys are masked out of attention, so the
    outputs at real tokens do not depend on how much padding follows; outputs at padding positions are
    meaningless (zero them, see `encoder.encode_tokens`).
    """

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            embedding_init=_partitioned_normal(1.0, (axes.VOCAB, axes.EMBED)),
            name="shared",
        )
        x = embed(input_ids.astype(jnp.int32))
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, None))
        position_bias = RelativePositionBias(cfg, self.param_dtype, name="relative_attention_bias")(
            input_ids.shape[1]
        )
        mask_bias = jnp.where(mask.astype(bool)[:, None, None, :], 0.0, _MASK_BIAS).astype(jnp.float32)
        bias = position_bias + mask_bias  # [B, H, L, L], shared by all layers
        block = T5Block if self.is_initializing() else _JITTED_BLOCK  # see _JITTED_BLOCK
        for i in range(cfg.num_layers):
            x = block(cfg, self.dtype, self.param_dtype, name=f"block_{i}")(x, bias)
        return RMSNorm(cfg.layer_norm_epsilon, self.param_dtype, name="final_norm")(x)


class T5DecoderBlock(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the encoder output, and feed-forward."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, self_bias: jax.Array, encoded: jax.Array, cross_bias: jax.Array
    ) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, self.param_dtype, name=name)
        h = norm("attention_norm")(x).astype(self.dtype)
        x = x + SelfAttention(cfg, **kw, name="attention")(h, self_bias).astype(jnp.float32)
        h = norm("cross_attention_norm")(x).astype(self.dtype)
        cross = SelfAttention(cfg, **kw, name="cross_attention")(h, cross_bias, kv=encoded)
        x = x + cross.astype(jnp.float32)
        h = norm("mlp_norm")(x).astype(self.dtype)
        x = x + FeedForward(cfg, **kw, name="mlp")(h).astype(jnp.float32)
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, None))


_JITTED_DECODER_BLOCK = nn.jit(T5DecoderBlock)


class T5Decoder(nn.Module):
    """T5 decoder (for pretraining the encoder; Imagen never runs it): (decoder_input_ids [B, T], encoder
    output [B, S, d_model], encoder mask [B, S], token embedding table [vocab, d_model]) -> float32 hidden
    states [B, T, d_model] after the final norm.

    The embedding table is an input because T5 ties the decoder's input embedding to the encoder's
    `shared` table, which lives in the encoder's parameter tree. Self-attention is causal with its own
    unidirectional relative position bias; cross-attention has no position bias (as in T5).
    """

    config: T5Config
    num_layers: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, decoder_input_ids: jax.Array, encoded: jax.Array, encoder_mask: jax.Array, embedding: jax.Array
    ) -> jax.Array:
        cfg = self.config
        length = decoder_input_ids.shape[1]
        x = jnp.take(embedding.astype(jnp.float32), decoder_input_ids.astype(jnp.int32), axis=0)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, None))
        position_bias = RelativePositionBias(
            cfg, self.param_dtype, bidirectional=False, name="relative_attention_bias"
        )(length)
        causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]  # [query, key]
        self_bias = position_bias + jnp.where(causal, 0.0, _MASK_BIAS)[None, None].astype(jnp.float32)
        cross_mask = encoder_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, S]: padding keys hidden
        cross_bias = jnp.where(cross_mask, 0.0, _MASK_BIAS).astype(jnp.float32)
        encoded = encoded.astype(self.dtype)
        block = T5DecoderBlock if self.is_initializing() else _JITTED_DECODER_BLOCK
        for i in range(self.num_layers):
            x = block(cfg, self.dtype, self.param_dtype, name=f"block_{i}")(
                x, self_bias, encoded, cross_bias
            )
        return RMSNorm(cfg.layer_norm_epsilon, self.param_dtype, name="final_norm")(x)


class T5EncoderDecoder(nn.Module):
    """T5 v1.1 encoder-decoder for span-corruption pretraining: (input_ids [B, S], input_mask [B, S],
    decoder_input_ids [B, T]) -> float32 logits [B, T, vocab].

    Params: {"encoder": exactly `T5Encoder`'s tree (so it loads and saves as a frozen encoder),
    "decoder": `T5Decoder`'s tree, "lm_head": {"kernel": [d_model, vocab]}}. v1.1 style: the decoder's
    input embedding is the encoder's `shared` table; the output projection is untied and not rescaled.
    `decoder_layers` None = the encoder's num_layers.
    """

    config: T5Config
    decoder_layers: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, input_mask: jax.Array, decoder_input_ids: jax.Array
    ) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        encoder = T5Encoder(cfg, **kw, name="encoder")
        encoded = encoder(input_ids, input_mask)
        # The encoder created its `shared` table above; read it from there so the decoder shares it
        # without a second copy in the tree (unbox: during init it is still a logically named box).
        embedding = nn.unbox(encoder.variables["params"]["shared"]["embedding"])
        layers = cfg.num_layers if self.decoder_layers is None else self.decoder_layers
        decoder = T5Decoder(cfg, layers, **kw, name="decoder")
        hidden = decoder(decoder_input_ids, encoded, input_mask, embedding)
        # std d_model**-0.5 (flaxformer's fan-in init) gives unit-scale logits at the start.
        lm_head = _dense("lm_head", cfg.vocab_size, cfg.d_model**-0.5, (axes.EMBED, axes.VOCAB), **kw)
        return lm_head(hidden.astype(self.dtype)).astype(jnp.float32)
