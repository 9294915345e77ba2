"""The T5 embedding cache: build once, look up equal to encoding on the fly; bf16; sharded build; errors."""

import jax
import ml_collections
import numpy as np
import pytest

from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text.build import build_text_encoder
from imagen_jax.text.embedding_cache import EmbeddingCache, caption_key

TINY = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2)
CAPTIONS = ["a corgi", "sushi house", "a corgi", "", "x" * 40, "  ", "a very long caption about a dog"]


@pytest.fixture(scope="module")
def text_encoder():
    cfg = ml_collections.ConfigDict(
        dict(encoder="random", tokenizer="byte", max_length=24, dtype="float32", seed=0, t5=TINY))
    return build_text_encoder(cfg)


@pytest.fixture(scope="module")
def cache(text_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "emb"
    with pytest.warns(UserWarning, match="2 captions were longer than max_length=24"):
        return EmbeddingCache.build(CAPTIONS, text_encoder, out, batch_size=2, dtype="float32",
                                    encoder_name="random-tiny", progress=False)


def test_lookup_matches_encoding(cache, text_encoder):
    assert len(cache) == 4  # distinct non-empty captions
    assert cache.length == 24 and cache.embed_dim == 32  # longest caption (truncated) sets the length
    assert "a corgi" in cache and "a dog" not in cache
    queries = ["sushi house", "", "a corgi", "a very long caption about a dog", "x" * 40]
    emb, mask = cache.lookup(queries)
    assert emb.shape == (5, 24, 32) and emb.dtype == np.float32 and mask.dtype == np.bool_
    with pytest.warns(UserWarning, match="truncated"):
        ref_emb, ref_mask = text_encoder.encode(queries)
    np.testing.assert_array_equal(mask, np.asarray(ref_mask))
    np.testing.assert_allclose(emb, np.asarray(ref_emb), atol=1e-5)
    assert not mask[1].any() and not emb[1].any()  # unconditional: zeros, all-False mask
    assert not emb[~mask].any()


def test_bfloat16_cache_and_short_length(text_encoder, tmp_path):
    cache = EmbeddingCache.build(["a corgi", "sushi"], text_encoder, tmp_path / "bf", dtype="bfloat16",
                                 batch_size=4, progress=False)
    assert cache.length == 8  # "a corgi" is 7 bytes + EOS: trimmed, not max_length
    # Records hold real tokens only, 2 bytes each: "sushi" + EOS = 6 tokens.
    sushi = int(np.searchsorted(cache.keys, caption_key("sushi")))
    assert len(cache._read([sushi])[0]) == 6 * 32 * 2
    emb, mask = cache.lookup(["sushi", "a corgi"], dtype=np.float32)
    ref, ref_mask = text_encoder.encode(["sushi", "a corgi"])
    np.testing.assert_array_equal(mask, np.asarray(ref_mask)[:, :8])
    np.testing.assert_allclose(emb, np.asarray(ref)[:, :8], atol=2e-2, rtol=1e-2)
    assert cache.lookup(["sushi"])[0].dtype.name == "bfloat16"
    # Padded to the tokenizer's max length, it is exactly what encoding gives (the U-Net's text shape).
    emb, mask = cache.lookup(["sushi", "a corgi"], dtype=np.float32, length=24)
    assert emb.shape == (2, 24, 32)
    np.testing.assert_array_equal(mask, np.asarray(ref_mask))
    np.testing.assert_allclose(emb, np.asarray(ref), atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="shorter than the cached captions"):
        cache.lookup(["sushi"], length=4)


def test_sharded_build_matches(text_encoder, cache, tmp_path):
    mesh = mesh_lib.make_mesh([("data", -1)])
    with pytest.warns(UserWarning, match="truncated"):
        sharded = EmbeddingCache.build(CAPTIONS, text_encoder, tmp_path / "sh", batch_size=8, dtype="float32",
                                       mesh=mesh, rules=None, progress=False)
    np.testing.assert_array_equal(sharded.keys, cache.keys)
    a, ma = sharded.lookup(CAPTIONS)
    b, mb = cache.lookup(CAPTIONS)
    np.testing.assert_array_equal(ma, mb)
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="batch size 6 does not divide"):
        EmbeddingCache.build(CAPTIONS, text_encoder, tmp_path / "x", batch_size=6, mesh=mesh, progress=False)
    assert jax.device_count() == 8


def test_errors(cache, text_encoder, tmp_path):
    with pytest.raises(KeyError, match="1 captions are not in the embedding cache.*'a dog'"):
        cache.lookup(["a corgi", "a dog"])
    with pytest.raises(TypeError, match="caption 1 is int"):
        cache.lookup(["a corgi", 3])
    with pytest.raises(ValueError, match="empty"):
        cache.lookup([])
    with pytest.raises(TypeError, match="caption 0 is NoneType"):
        EmbeddingCache.build([None], text_encoder, tmp_path / "n", progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        EmbeddingCache.build(["a"], text_encoder, cache.path, progress=False)
    with pytest.raises(FileNotFoundError, match="no embedding cache"):
        EmbeddingCache.open(tmp_path / "nothing")
    cache.check(embed_dim=32, encoder="random-tiny")
    with pytest.raises(ValueError, match="embed_dim 32, model expects 64"):
        cache.check(embed_dim=64)
    with pytest.raises(ValueError, match="built with encoder 'random-tiny'"):
        cache.check(encoder="google/t5-v1_1-xxl")
