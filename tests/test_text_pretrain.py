"""Span-corruption pretraining of a small T5 encoder: the noise mask, span corruption, the decoder, a short
pretraining run that must learn, and the Hugging Face save -> load round trip."""

import json
import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from imagen_jax.errors import ConfigError, NonFiniteError
from imagen_jax.text import encoder as encoder_lib
from imagen_jax.text import hf_loader, pretrain
from imagen_jax.text.t5 import T5Config, T5Encoder, T5EncoderDecoder, relative_position_buckets
from imagen_jax.text.tokenizers import EOS_ID, make_tokenizer

TINY = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=1)
MAX_LENGTH = 24
COLORS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
CAPTIONS = [f"a small {color} {shape}" for color in COLORS for shape in SHAPES]  # 20 captions


def test_noise_mask_counts_and_determinism():
    length, density, mean_span = 40, 0.15, 3.0  # 6 noise tokens in round(6 / 3) = 2 spans
    mask = pretrain.random_spans_noise_mask(length, density, mean_span, np.random.default_rng(7))
    assert mask.dtype == np.bool_ and mask.shape == (length,)
    assert mask.sum() == 6
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert starts.sum() == 2
    assert not mask[0]  # starts with kept tokens
    again = pretrain.random_spans_noise_mask(length, density, mean_span, np.random.default_rng(7))
    np.testing.assert_array_equal(mask, again)
    # Clipping: at least one noise token, at least one kept token.
    assert pretrain.random_spans_noise_mask(3, 0.01, 3.0, np.random.default_rng(0)).sum() == 1
    assert pretrain.random_spans_noise_mask(3, 0.99, 3.0, np.random.default_rng(0)).sum() == 2
    # The mask's spans vary with the seed.
    masks = {pretrain.random_spans_noise_mask(length, density, mean_span, np.random.default_rng(s)).tobytes()
             for s in range(10)}
    assert len(masks) > 5


def _reconstruct(inputs, targets, vocab_size):
    """Each sentinel in inputs replaced by the tokens that follow the same sentinel in targets."""
    is_sentinel = lambda t: t >= vocab_size - 100
    spans, current = {}, None
    for t in targets[:-1]:
        if is_sentinel(t):
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    out = []
    for t in inputs[:-1]:
        out.extend(spans.pop(int(t)) if is_sentinel(t) else [int(t)])
    assert not spans  # every target span was used
    return out


def test_span_corruption_reconstructs_the_ids():
    ids = np.arange(10, 30)
    for seed in range(5):
        inputs, targets = pretrain.span_corruption(ids, np.random.default_rng(seed), noise_density=0.3,
                                                   mean_span_length=2.0, vocab_size=384)
        assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
        assert inputs.dtype == np.int32 and targets.dtype == np.int32
        # round(20 * 0.3) = 6 noise tokens in 3 spans: sentinels 383, 382, 381 in order, in both.
        sentinels = [t for t in targets if t >= 300]
        assert sentinels == [383, 382, 381] == [t for t in inputs if t >= 300]
        assert targets[0] == 383 and len(targets) == 6 + 3 + 1 and len(inputs) == 20 - 6 + 3 + 1
        assert _reconstruct(inputs, targets, 384) == list(ids)
    # Rolled masks (pretrain_t5's default): spans anywhere, a wrapped span splits in two; still exact.
    first_noise, ends_kept = 0, 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        mask = pretrain.random_spans_noise_mask(20, 0.3, 2.0, rng, random_roll=True)
        assert mask.sum() == 6
        first_noise += mask[0]
        ends_kept += not mask[-1]
        inputs, targets = pretrain.span_corruption(ids, rng, noise_density=0.3, mean_span_length=2.0,
                                                   vocab_size=384, random_roll=True)
        assert _reconstruct(inputs, targets, 384) == list(ids)
        assert len(targets) <= pretrain.max_target_length(21, 0.3, 2.0, random_roll=True)
    assert first_noise > 0 and ends_kept > 0
    # No room for sentinels above the ids -> a clear error.
    with pytest.raises(ConfigError, match="no room"):
        pretrain.span_corruption(np.arange(3, 259), np.random.default_rng(0), vocab_size=259)
    with pytest.raises(ValueError, match="no pad"):
        pretrain.span_corruption(np.array([5, 6, EOS_ID]), np.random.default_rng(0), vocab_size=384)


def test_make_batch_shapes_and_shift():
    tokenizer = make_tokenizer("byte", MAX_LENGTH)
    batch = pretrain.make_batch(CAPTIONS[:3] + ["x"], tokenizer, np.random.default_rng(0),
                                input_length=MAX_LENGTH, vocab_size=384)
    target_length = pretrain.max_target_length(MAX_LENGTH)
    assert batch["input_ids"].shape == batch["input_mask"].shape == (4, MAX_LENGTH)
    assert batch["target_ids"].shape == batch["decoder_input_ids"].shape == (4, target_length)
    assert all(v.dtype == np.int32 for v in batch.values())
    np.testing.assert_array_equal(batch["decoder_input_ids"][:, 0], 0)
    np.testing.assert_array_equal(batch["decoder_input_ids"][:, 1:], batch["target_ids"][:, :-1])
    ids, mask = batch["input_ids"][0], batch["input_mask"][0].astype(bool)
    assert ids[mask][-1] == EOS_ID and (ids[~mask] == 0).all()
    # A one-token caption has no room for noise: input is the token and EOS, target only EOS.
    assert list(batch["input_ids"][3, :3]) == [ord("x") + 3, EOS_ID, 0]
    assert list(batch["target_ids"][3, :2]) == [EOS_ID, 0]


def test_tags_land_on_the_tokens_of_their_words(shared_dir):
    caption = "a red square left of a blue circle"
    spans = [(2, 5, (1, 0)), (6, 12, (1, 0)), (23, 27, (0, 1)), (28, 34, (0, 1))]  # red square | blue circle
    # Bytes: one token per character, so each word's tokens are its characters.
    byte_tags = pretrain.tag_tokens([caption, "x"], [spans, []], make_tokenizer("byte", 64), 2)
    expected = np.full((len(caption), 2), -1)
    for a, b, tags in spans:
        expected[a:b] = tags
    np.testing.assert_array_equal(byte_tags[0], expected)
    np.testing.assert_array_equal(byte_tags[1], [[-1, -1]])
    # T5's SentencePiece vocabulary: each word here is one or more pieces ("▁red"), and every piece of a
    # tagged word gets its tags.
    tokenizer = make_tokenizer(str(shared_dir / "data" / "t5_spiece.model"), 16)
    pieces = tokenizer.hf_tokenizer.convert_ids_to_tokens(tokenizer.encode_batch([caption])[0])
    tags = pretrain.tag_tokens([caption], [spans], tokenizer, 2)[0]
    assert pieces[:6] == ["▁", "a", "▁red", "▁square", "▁left", "▁of"] or pieces[:5] == [
        "▁a", "▁red", "▁square", "▁left", "▁of"], pieces
    by_piece = [(piece, tuple(t)) for piece, t in zip(pieces, tags.tolist(), strict=True)]
    assert {("▁red", (1, 0)), ("▁square", (1, 0)), ("▁left", (-1, -1))} <= set(by_piece)
    blue = pieces.index("▁blue")
    assert all(t == (0, 1) for _, t in by_piece[blue:])  # "blue", "circle" and its pieces
    assert all(t == (-1, -1) for _, t in by_piece[blue - 2 : blue])  # "of a"
    # Cut to the tokenizer's max_length - 1 tokens, like the captions' ids.
    cut = pretrain.tag_tokens([caption], [spans], make_tokenizer("byte", 8), 2)[0]
    assert cut[:, 0].tolist() == [-1, -1, 1, 1, 1, -1, 1]
    # The caller's ids (pretrain_t5 has them already) give the same tags.
    ids = pretrain.tokenize_captions([caption], make_tokenizer("byte", 8))
    given = pretrain.tag_tokens([caption], [spans], make_tokenizer("byte", 8), 2, caption_ids=ids)[0]
    np.testing.assert_array_equal(given, cut)
    # -1: a tag that does not apply to this word (masked out of the loss, like untagged tokens).
    partial = pretrain.tag_tokens([caption], [[(2, 5, (-1, 1))]], tokenizer, 2)[0]
    assert partial[pieces.index("▁red")].tolist() == [-1, 1]
    with pytest.raises(ValueError, match=r"each word has 2 tags of 0, 1 or -1 \(does not apply\), got"):
        pretrain.tag_tokens([caption], [[(2, 5, (1, 2))]], tokenizer, 2)


def test_tagged_batches_add_the_whole_caption_beside_span_corruption():
    tokenizer = make_tokenizer("byte", MAX_LENGTH)
    ids = pretrain.tokenize_captions(["red left of blue", "a small red circle"], tokenizer)
    tags = [np.where(np.arange(ids[0].size) < 3, 1, -1)[:, None], None]
    plain = pretrain.batch_from_ids(ids, np.random.default_rng(0), input_length=MAX_LENGTH,
                                    target_length=MAX_LENGTH, vocab_size=384)
    batch = pretrain.batch_from_ids(ids, np.random.default_rng(0), input_length=MAX_LENGTH,
                                    target_length=MAX_LENGTH, vocab_size=384, tags=tags)
    assert all(v.dtype == np.int32 for v in batch.values())
    # Span corruption is what it is without tags (same random stream), on every row.
    for key, value in plain.items():
        np.testing.assert_array_equal(batch[key], value)
    # The whole caption and EOS, and its tags (-1 elsewhere and on the untagged row).
    n = ids[0].size
    np.testing.assert_array_equal(batch["caption_ids"][0, : n + 1], np.append(ids[0], EOS_ID))
    assert (batch["caption_ids"][0, n + 1 :] == 0).all()
    np.testing.assert_array_equal(batch["caption_mask"][0], batch["caption_ids"][0] > 0)
    assert batch["tags"].shape == (2, MAX_LENGTH, 1)
    assert batch["tags"][0, :3, 0].tolist() == [1, 1, 1] and (batch["tags"][0, 3:] == -1).all()
    assert (batch["tags"][1] == -1).all()
    with pytest.raises(ConfigError, match=r"tag_weight=1.0 needs one list of tag spans per caption \(2\)"):
        pretrain.pretrain_t5(TINY, tokenizer, ["a", "b"], num_steps=1, batch_size=1, learning_rate=1e-3,
                             seed=0, tag_spans=[[]], tag_weight=1.0)
    with pytest.raises(ConfigError, match="tag_weight=-1 must be >= 0"):
        pretrain.pretrain_t5(TINY, tokenizer, ["a"], num_steps=1, batch_size=1, learning_rate=1e-3, seed=0,
                             tag_weight=-1)
    with pytest.raises(ConfigError, match="span_weight and tag_weight are both 0: pretraining would learn"):
        pretrain.pretrain_t5(TINY, tokenizer, ["a"], num_steps=1, batch_size=1, learning_rate=1e-3, seed=0,
                             span_weight=0)


def test_diverged_pretraining_is_a_user_error_naming_the_key():
    with pytest.raises(NonFiniteError, match=r"nan in steps 1..2; lower config.text.pretrain.learning_rate"):
        pretrain.pretrain_t5(TINY, make_tokenizer("byte", 16), ["a red circle", "a blue square"], num_steps=4,
                             batch_size=2, learning_rate=float("inf"), seed=0, decoder_layers=1, log_every=2,
                             warmup_steps=0)


def test_pretraining_pads_to_the_longest_caption_and_further_padding_changes_nothing(caplog):
    """`pretrain_t5` runs at `fitted_input_length`, not the tokenizer's max_length: a step on the same
    captions, corruptions and tags padded to either length gives the same losses, accuracies and new
    weights (T5's positions are relative, and padding is masked in its attention and in both losses)."""
    tokenizer = make_tokenizer("byte", 48)
    captions = CAPTIONS[:8]
    ids = pretrain.tokenize_captions(captions, tokenizer)
    fitted = pretrain.fitted_input_length(ids)
    assert fitted == max(len(c) for c in captions) + 1 == 23
    tags = [np.where(np.arange(row.size) < 5, row.size % 2, -1)[:, None] for row in ids]
    model = T5EncoderDecoder(TINY, decoder_layers=1)
    optimizer = optax.adamw(1e-2)
    step = jax.jit(pretrain.make_train_step(model, optimizer, span_weight=1.0, tag_weight=1.0))
    ones = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), ones, ones > 0, ones)["params"])
    encoded = jnp.zeros((1, 4, TINY.d_model))
    params["tag_head"] = pretrain.TagHead(1).init(jax.random.PRNGKey(1), encoded)["params"]
    stepped = []
    for length in (fitted, tokenizer.max_length):
        batch = pretrain.batch_from_ids(
            ids, np.random.default_rng(0), input_length=length, vocab_size=TINY.vocab_size,
            target_length=pretrain.max_target_length(length, random_roll=True), random_roll=True, tags=tags,
        )
        assert batch["input_ids"].shape == (8, length)
        stepped.append(jax.device_get(step((params, optimizer.init(params)), batch)))
    (fitted_params, _), fitted_metrics = stepped[0]
    (padded_params, _), padded_metrics = stepped[1]
    assert fitted_metrics["span_loss"] > 1.0 and fitted_metrics["loss"] > fitted_metrics["span_loss"]
    for key in ("loss", "span_loss", "accuracy", "tag_accuracy"):
        np.testing.assert_allclose(fitted_metrics[key], padded_metrics[key], rtol=1e-5, err_msg=key)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, fitted_params, padded_params)
    with caplog.at_level(logging.INFO, logger="imagen_jax"):
        pretrain.pretrain_t5(TINY, tokenizer, captions, num_steps=1, batch_size=4, learning_rate=1e-3, seed=0,
                             decoder_layers=1)
    assert "input length 23 (the longest caption; served at 48)" in caplog.text, caplog.text


def _spans(caption: str, words: dict[str, tuple[int, ...]]) -> list[tuple[int, int, tuple[int, ...]]]:
    return [(caption.index(word), caption.index(word) + len(word), tag) for word, tag in words.items()]


def test_pretraining_learns_tags_that_are_an_exclusive_or(caplog):
    """Which colour is on the left: the first named after "left of", the second after "right of". Neither
    the word order nor the relation alone says it; the linear head can read it only once the encoder has
    computed it into each colour's output. The two facts it combines are tags beside it, as in
    `data.shapes.object_tags`."""
    captions, spans = [], []
    for c, d in [(c, d) for c in COLORS for d in COLORS if c != d]:
        for relation, c_left in (("left", 1), ("right", 0)):
            captions.append(f"{c} {relation} of {d}")
            spans.append(_spans(captions[-1], {c: (c_left, 1, c_left), d: (1 - c_left, 0, c_left)}))
    with caplog.at_level(logging.INFO, logger="imagen_jax"):
        params, _ = pretrain.pretrain_t5(
            TINY, make_tokenizer("byte", MAX_LENGTH), captions, num_steps=300, batch_size=16,
            learning_rate=3e-3, seed=0, decoder_layers=1, log_every=50, tag_spans=spans, tag_weight=10.0,
        )
    right = [[float(x) for x in m.split("/")] for m in re.findall(r"tags right ([0-9./]+),", caplog.text)]
    assert len(right) == 6 and all(len(r) == 3 for r in right), caplog.text
    assert right[0][0] < 0.7 and right[-1][0] >= 0.95, right
    # The encoder alone: the head and the decoder are dropped.
    ids = np.ones((1, 4), np.int32)
    assert set(params) == set(T5Encoder(TINY).init(jax.random.PRNGKey(0), ids, ids > 0)["params"])


def test_unidirectional_buckets_known_values():
    b = np.asarray(relative_position_buckets(400, 1, 32, 128, bidirectional=False))[:, 0]  # query - key
    assert b[0] == 0 and b[1] == 1 and b[15] == 15  # exact up to num_buckets / 2
    assert b[16] == 16 and b[127] == 31 and b[399] == 31  # then logarithmic, capped
    future = np.asarray(relative_position_buckets(1, 50, 32, 128, bidirectional=False))[0]
    assert (future == 0).all()  # keys after the query share bucket 0


def _init_encoder_decoder():
    model = T5EncoderDecoder(TINY, decoder_layers=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 259, (2, 10)), jnp.int32)
    mask = jnp.arange(10)[None, :] < jnp.array([[10], [6]])
    dec = jnp.asarray(np.random.default_rng(1).integers(3, 259, (2, 7)), jnp.int32)
    params = jax.jit(lambda r: nn.unbox(model.init(r, ids, mask, dec)["params"]))(jax.random.PRNGKey(0))
    return model, params, ids, mask, dec


def test_decoder_is_causal():
    model, params, ids, mask, dec = _init_encoder_decoder()
    apply = jax.jit(model.apply)
    logits = np.asarray(apply({"params": params}, ids, mask, dec))
    assert logits.shape == (2, 7, 384) and np.isfinite(logits).all()
    changed = np.asarray(apply({"params": params}, ids, mask, dec.at[:, 4].set(200)))
    np.testing.assert_allclose(changed[:, :4], logits[:, :4], rtol=1e-6, atol=1e-6)
    assert np.abs(changed[:, 4:] - logits[:, 4:]).max() > 1e-3
    # Padding keys of the encoder output do not reach the decoder.
    garbage = ids.at[1, 6:].set(7)
    np.testing.assert_allclose(np.asarray(apply({"params": params}, garbage, mask, dec))[1], logits[1],
                               rtol=1e-5, atol=1e-5)


def test_encoder_subtree_is_a_t5_encoder():
    model, params, ids, mask, dec = _init_encoder_decoder()
    encoder = T5Encoder(TINY)
    reference = encoder_lib.init_params(encoder, jax.random.PRNGKey(0))
    shapes = lambda tree: jax.tree.map(lambda p: (p.shape, p.dtype), tree)
    assert shapes(params["encoder"]) == shapes(reference)
    assert set(params) == {"encoder", "decoder", "lm_head"}
    assert params["lm_head"]["kernel"].shape == (32, 384)
    # The encoder half of the model computes exactly what T5Encoder computes with those params.
    capture = lambda mdl, _: isinstance(mdl, T5Encoder)
    run = lambda p: model.apply({"params": p}, ids, mask, dec, capture_intermediates=capture)
    _, captured = jax.jit(run)(params)
    inside = captured["intermediates"]["encoder"]["__call__"][0]
    alone = jax.jit(encoder.apply)({"params": params["encoder"]}, ids, mask)
    np.testing.assert_array_equal(np.asarray(inside), np.asarray(alone))


@pytest.fixture(scope="module")
def pretrained():
    tokenizer = make_tokenizer("byte", MAX_LENGTH)
    params, losses = pretrain.pretrain_t5(
        TINY, tokenizer, CAPTIONS, num_steps=150, batch_size=16, learning_rate=3e-3, seed=0,
        decoder_layers=1, log_every=50,
    )
    return tokenizer, params, losses


def test_pretraining_lowers_the_loss(pretrained):
    tokenizer, params, losses = pretrained
    assert len(losses) == 150 and np.isfinite(losses).all()
    first, last = np.mean(losses[:5]), np.mean(losses[-20:])
    # Start: about ln(384) = 5.95 (unit-scale logits); a broken gradient stays near it. Measured: 6.6 ->
    # 0.8. (A decoder trained with a blind encoder also gets to 1.2 on this tiny corpus: the encoder's
    # share of the learning is checked below, by its weights moving.)
    assert first > 4.0, losses[:5]
    assert last < 0.25 * first, (first, last)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    # The same seed's initial encoder: every encoder matrix moved far more than weight decay alone
    # (0.01 x lr x 150 steps ~ 0.5%) would move it, so gradients reach the encoder.
    ids = jnp.zeros((1, MAX_LENGTH), jnp.int32)
    dec = jnp.zeros((1, pretrain.max_target_length(MAX_LENGTH, random_roll=True)), jnp.int32)
    model = T5EncoderDecoder(TINY, decoder_layers=1)
    init = jax.jit(lambda rng: nn.unbox(model.init(rng, ids, ids > 0, dec)["params"]["encoder"]))
    initial = traverse_util.flatten_dict(init(jax.random.PRNGKey(0)))
    for path, value in traverse_util.flatten_dict(params).items():
        if value.ndim == 2 and path[0] != "shared":  # embedding rows of unused bytes only decay
            moved = np.linalg.norm(np.asarray(value) - initial[path]) / np.linalg.norm(initial[path])
            assert moved > 0.05, (path, moved)


def test_progress_lines_and_time_budget(caplog):
    tokenizer = make_tokenizer("byte", MAX_LENGTH)
    with caplog.at_level(logging.INFO, logger="imagen_jax"):
        _, losses = pretrain.pretrain_t5(
            TINY, tokenizer, CAPTIONS[:4], num_steps=1000, batch_size=4, learning_rate=1e-3, seed=1,
            decoder_layers=1, log_every=1, time_budget_s=1e-3,
        )
    assert len(losses) == 1  # the budget ran out during the first step
    lines = [r.getMessage() for r in caplog.records]
    assert any("step 1/1000" in m and "loss" in m and "accuracy" in m and "ETA" in m for m in lines), lines
    assert any("time budget" in m for m in lines), lines


def test_save_and_load_round_trip(pretrained, tmp_path):
    tokenizer, params, _ = pretrained
    folder = tmp_path / "t5_pretrained"
    folder.mkdir()
    (folder / "stale.txt").write_text("replaced")  # an older save is replaced as a whole
    assert pretrain.save_encoder(folder, TINY, params) == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5_pretrained"]  # no temporary folders left
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["T5EncoderModel"]
    assert hf_loader.read_t5_config(folder) == TINY

    loaded = hf_loader.load_t5_encoder(folder, tokenizer="byte", max_length=MAX_LENGTH)
    flat_saved = traverse_util.flatten_dict(params)
    flat_loaded = traverse_util.flatten_dict(loaded.params)
    assert set(flat_saved) == set(flat_loaded)
    for path, value in flat_saved.items():
        np.testing.assert_array_equal(np.asarray(flat_loaded[path]), np.asarray(value), err_msg=str(path))
    emb, mask = loaded.encode(CAPTIONS[:3])
    original = encoder_lib.TextEncoder(T5Encoder(TINY), tokenizer, params, TINY.d_model)
    expected, expected_mask = original.encode(CAPTIONS[:3])
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(expected_mask))
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(expected))
