"""The Flax T5 encoder: shapes, padding invariance, both FFN types, logical annotations, the text encoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from imagen_jax.parallel import axes
from imagen_jax.text import encoder as encoder_lib
from imagen_jax.text import t5 as t5_lib
from imagen_jax.text.build import build_text_encoder
from imagen_jax.text.t5 import T5Config, T5Encoder, relative_position_buckets

TINY = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2)


def _init(cfg: T5Config, dtype=jnp.float32):
    module = T5Encoder(cfg, dtype=dtype)
    return module, encoder_lib.init_params(module, jax.random.PRNGKey(0))


def _apply(module, params, ids, mask):
    # Jitted: one compile per shape is much faster on CPU than eager op-by-op dispatch.
    return jax.jit(module.apply)({"params": params}, ids, mask)


def _ids(lengths, total, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros((len(lengths), total), bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, 384, n)
        ids[i, n - 1] = 1
        mask[i, :n] = True
    return ids, mask


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_output_shape_and_padding_invariance(feed_forward):
    module, params = _init(T5Config(**TINY, feed_forward=feed_forward))
    ids, mask = _ids([5, 9, 3], 12)
    out = _apply(module, params, ids, mask)
    assert out.shape == (3, 12, 32) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    # The same prompts with much more padding (and garbage ids under the padding) give the same outputs.
    long_ids = np.pad(ids, ((0, 0), (0, 20)))
    long_ids[:, 12:] = 7  # masked, so their ids must not matter
    long_mask = np.pad(mask, ((0, 0), (0, 20)))
    out_long = _apply(module, params, long_ids, long_mask)
    np.testing.assert_allclose(
        np.asarray(out_long)[:, :12][mask], np.asarray(out)[mask], atol=1e-5, rtol=1e-5
    )
    # A prompt alone at its exact length (no padding at all) matches its row in the batch.
    alone = _apply(module, params, ids[1:2, :9], mask[1:2, :9])
    np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(out)[1, :9], atol=1e-5, rtol=1e-5)


def test_layers_are_traced_once_and_compute_the_plain_layers(monkeypatch):
    """Applied, every layer is the same nested jit (JAX traces one layer, not each); initialised, the plain
    layers, so a seed keeps its weights; the outputs are the plain layers'."""
    cfg = T5Config(**{**TINY, "num_layers": 3})
    ids, mask = _ids([5, 3], 8)
    module, params = _init(cfg)
    jaxpr = jax.make_jaxpr(lambda p: module.apply({"params": p}, ids, mask))(params).jaxpr
    layers = [e for e in jaxpr.eqns if "jaxpr" in e.params and e.params.get("name") == "core_fn"]
    assert len(layers) == 3 and len({id(e.params["jaxpr"]) for e in layers}) == 1
    out = _apply(module, params, ids, mask)

    monkeypatch.setattr(t5_lib, "_JITTED_BLOCK", t5_lib.T5Block)
    plain, plain_params = _init(cfg)
    for a, b in zip(jax.tree.leaves(plain_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    jaxpr = jax.make_jaxpr(lambda p: plain.apply({"params": p}, ids, mask))(params).jaxpr
    assert not [e for e in jaxpr.eqns if e.params.get("name") == "core_fn"]
    out_plain = jax.jit(lambda p: plain.apply({"params": p}, ids, mask))(params)  # not `_apply`s program
    np.testing.assert_allclose(np.asarray(out_plain), np.asarray(out), rtol=1e-6, atol=1e-6)


def test_feed_forward_param_names():
    _, gated = _init(T5Config(**TINY, feed_forward="gated-gelu"))
    _, relu = _init(T5Config(**TINY, feed_forward="relu"))
    assert set(gated["block_0"]["mlp"]) == {"wi_0", "wi_1", "wo"}
    assert set(relu["block_0"]["mlp"]) == {"wi", "wo"}
    assert set(gated) == {"shared", "relative_attention_bias", "block_0", "block_1", "final_norm"}
    assert gated["block_1"]["attention"]["q"]["kernel"].shape == (32, 32)
    assert gated["block_1"]["mlp"]["wo"]["kernel"].shape == (48, 32)


def test_logical_annotations():
    specs = encoder_lib.param_logical_axes(T5Encoder(T5Config(**TINY)))
    assert specs["shared"]["embedding"] == P(axes.VOCAB, axes.EMBED)
    assert specs["relative_attention_bias"]["embedding"] == P(axes.REL_BUCKETS, axes.HEADS)
    attn = specs["block_0"]["attention"]
    assert all(attn[n]["kernel"] == P(axes.EMBED, axes.HEADS) for n in "qkv")
    assert attn["o"]["kernel"] == P(axes.HEADS, axes.EMBED)
    assert specs["block_0"]["mlp"]["wi_0"]["kernel"] == P(axes.EMBED, axes.MLP)
    assert specs["block_0"]["mlp"]["wo"]["kernel"] == P(axes.MLP, axes.EMBED)
    assert specs["block_1"]["attention_norm"]["scale"] == P(axes.NORM)
    assert specs["final_norm"]["scale"] == P(axes.NORM)
    # Every parameter carries a name for each dimension.
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
        assert isinstance(spec, P) and all(name is not None for name in spec)


def test_relative_position_buckets_known_values():
    b = np.asarray(relative_position_buckets(1, 400, 32, 128))[0]  # key - query = 0..399
    assert b[0] == 0 and b[1] == 17 and b[7] == 23  # exact buckets, keys after the query in 16..31
    assert b[8] == 24 and b[127] == 31 and b[399] == 31  # log buckets, capped beyond max_distance
    b = np.asarray(relative_position_buckets(400, 1, 32, 128))[:, 0]  # key - query = 0..-399
    assert b[1] == 1 and b[8] == 8 and b[127] == 15 and b[399] == 15
    assert np.all(np.diff(b) >= 0)


def test_bfloat16_close_to_float32():
    cfg = T5Config(**TINY)
    module, params = _init(cfg)
    ids, mask = _ids([6, 4], 8)
    ref = _apply(module, params, ids, mask)
    bf = _apply(T5Encoder(cfg, dtype=jnp.bfloat16), jax.tree.map(lambda p: p.astype(jnp.bfloat16), params),
                ids, mask)
    assert bf.dtype == jnp.float32
    err = np.abs(np.asarray(bf) - np.asarray(ref))[mask].max()
    assert err < 0.1, err


def test_configs():
    xxl = T5Config.preset("google/t5-v1_1-xxl")
    assert (xxl.d_model, xxl.d_ff, xxl.num_heads, xxl.num_layers, xxl.feed_forward) == (
        4096, 10240, 64, 24, "gated-gelu"
    )
    assert T5Config.preset("google/flan-t5-xl") == T5Config.preset("t5-v1_1-xl")
    assert T5Config.preset("t5-base").feed_forward == "relu"
    hf = dict(model_type="t5", vocab_size=100, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_layers=2,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=16)
    cfg = T5Config.from_hf_config(hf)
    assert cfg.relative_attention_num_buckets == 16 and cfg.relative_attention_max_distance == 128
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_hf_config({**hf, "feed_forward_proj": "gated-silu"})
    with pytest.raises(ValueError, match="umt5"):
        T5Config.from_hf_config({**hf, "model_type": "umt5"})
    with pytest.raises(ValueError, match="unknown T5 preset"):
        T5Config.preset("t5-huge")


def _random_text_config(**overrides):
    cfg = ml_collections.ConfigDict(
        dict(encoder="random", tokenizer="byte", max_length=16, dtype="float32", seed=3, t5=TINY)
    )
    cfg.update(overrides)
    return cfg


def test_build_random_text_encoder_and_encode():
    te = build_text_encoder(_random_text_config())
    assert te.embed_dim == 32 and te.max_length == 16
    assert not any(isinstance(x, nn.LogicallyPartitioned) for x in jax.tree.leaves(
        te.params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
    emb, mask = te.encode(["a corgi", "", "sushi house"])
    assert emb.shape == (3, 16, 32) and mask.shape == (3, 16) and emb.dtype == jnp.float32
    assert int(mask[0].sum()) == 8 and not bool(mask[1].any())
    assert float(jnp.abs(emb[1]).max()) == 0.0  # unconditional prompt: all zeros
    assert float(jnp.abs(emb[0, 8:]).max()) == 0.0  # padding zeroed
    # Same seed -> same params; the jitted path equals the pure function.
    again = build_text_encoder(_random_text_config())
    emb2, _ = again.encode(["a corgi", "", "sushi house"])
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(emb2))


def test_build_rejects_bad_config():
    with pytest.raises(ValueError, match="unknown keys"):
        build_text_encoder(_random_text_config(t5={**TINY, "d_modle": 3}))
    with pytest.raises(ValueError, match="vocab_size"):
        build_text_encoder(_random_text_config(t5={**TINY, "vocab_size": 100}))
    with pytest.raises(ValueError, match="dtype"):
        build_text_encoder(_random_text_config(dtype="fp8"))
